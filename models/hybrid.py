"""Hybrid SSM / linear-attention decoders: `model.type=hybrid`, the decoder skeleton with the sizes of the
sub-quadratic mixers (layers/ssm.py, layers/delta_rule.py, layers/linear_attention.py, layers/conv.py).

A hybrid is a layer pattern. The named presets below are the published ones; `HybridConfig.preset(name,
**fields)` builds one, experiments/hybrid/hybrid.py trains each, and any pattern of registered mixers works:

    effax train experiments/hybrid/hybrid.py:samba
    effax train experiments/hybrid/hybrid.py --set model.pattern=gdn,gdn,gdn,swa model.sliding_window=512

`model.pattern` stays the one source of truth (a preset only fills fields), so a run's config.json says
exactly which layers it had. docs/hybrid.md has each mixer's equations, keys and paper.
"""

from __future__ import annotations

import dataclasses

from effax.models.decoder import Decoder, DecoderConfig
from effax.models.registry import ConfigError, register

# name -> fields a preset sets (the rest keep the HybridConfig defaults)
PRESETS = {
    # Mamba2 (Dao & Gu 2024): every layer a Mamba2 block, no MLP.
    "mamba2": dict(pattern=("mamba2+none",)),
    # Samba (Ren et al. 2024): Mamba and sliding-window attention (window 2048) alternating, an MLP in every
    # layer. Samba's SSM is Mamba-1; here it is Mamba2 (see docs/hybrid.md).
    "samba": dict(pattern=("mamba2", "swa"), sliding_window=2048),
    # Gated DeltaNet + full attention 3:1 (the hybrids of Qwen3-Next / Kimi Linear style), MLP in every layer.
    "gdn": dict(pattern=("gdn", "gdn", "gdn", "attn")),
    # Based (Arora et al. 2024), 360M reference: per 5 layers, gated convolutions at 0, 3, 4, Taylor linear
    # attention at 1, sliding-window attention at 2; SwiGLU MLP in every layer; conv width 3, feature dim 16.
    "based": dict(pattern=("gated_conv", "based", "swa", "gated_conv", "gated_conv"), conv_kernel=3, feature_dim=16,
                  sliding_window=256),
}


@dataclasses.dataclass(frozen=True)
class HybridConfig(DecoderConfig):
    """The skeleton's fields plus the sub-quadratic mixers' sizes (defaults: the official ones).

    ssm_state:    N, Mamba2's state size per head (128)
    ssm_head_dim: P, Mamba2's head dim (64); heads = expand * d_model / ssm_head_dim
    expand:       inner width / d_model of Mamba2 and of Based's gated convolution (2)
    conv_kernel:  width of the short causal convolutions (Mamba2, GDN: 4; Based: 3)
    chunk_size:   chunk length of the chunked algorithms: speed and memory only, the result is the same (64)
    value_expand: gated DeltaNet's value head dim / key head dim (2); GDN uses n_heads heads of key dim
                  dim_per_head (set model.head_dim to 0.75 d_model / n_heads for the paper's 6 d_model^2 layer)
    feature_dim:  Based's projected q/k dim per head before the Taylor map (16); Based uses n_heads heads
    """

    type: str = "hybrid"
    ssm_state: int = 128
    ssm_head_dim: int = 64
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 64
    value_expand: int = 2
    feature_dim: int = 16

    @classmethod
    def preset(cls, name: str, **fields) -> "HybridConfig":
        """The named preset (PRESETS) with `fields` on top."""
        if name not in PRESETS:
            raise ConfigError(f"unknown hybrid preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **fields})

    def validate(self) -> None:
        super().validate()
        for key in ("ssm_state", "ssm_head_dim", "expand", "conv_kernel", "chunk_size", "value_expand", "feature_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        mixers = {s.mixer for s in self.layer_specs}
        if "mamba2" in mixers and (self.expand * self.d_model) % self.ssm_head_dim:
            raise ConfigError(f"model.ssm_head_dim={self.ssm_head_dim} must divide model.expand * model.d_model = "
                              f"{self.expand * self.d_model} (Mamba2 heads = expand * d_model / ssm_head_dim)")


@register("hybrid", HybridConfig)
class Hybrid(Decoder):
    pass
