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
from typing import Literal

from effax.models.decoder import Decoder, DecoderConfig
from effax.models.moe import MoEConfig
from effax.models.registry import ConfigError, register


def _halves(n_layers: int, arch: str) -> int:
    if n_layers % 4 or n_layers < 4:
        raise ConfigError(f"the {arch} preset needs model.n_layers divisible by 4 (ArchScale's rule), got {n_layers}")
    return n_layers // 2


def sambay_pattern(n_layers: int) -> tuple[str, ...]:
    """SambaY (ArchScale, `gmu_yoco`): layers < L/2 Samba (Mamba at even, sliding window at odd indices); L/2 the
    Mamba whose pre-gate output is the memory; L/2 + 1 full attention whose KV is the cross-decoder's cache; after
    it GMUs at even and cross-attention at odd indices. MLP in every layer."""
    h = _halves(n_layers, "sambay")
    return (*("mamba2" if i % 2 == 0 else "swa" for i in range(h)), "mamba2_memory", "yoco_kv",
            *("gmu" if i % 2 == 0 else "yoco_cross" for i in range(h + 2, n_layers)))


def samba_yoco_pattern(n_layers: int) -> tuple[str, ...]:
    """Samba+YOCO (ArchScale's `sambayoco`, SambaY's baseline): SambaY with every cross-decoder layer cross-attention."""
    h = _halves(n_layers, "samba_yoco")
    return (*("mamba2" if i % 2 == 0 else "swa" for i in range(h + 1)), "yoco_kv", *("yoco_cross",) * (n_layers - h - 2))


def yoco_pattern(n_layers: int) -> tuple[str, ...]:
    """YOCO with a sliding-window self-decoder (ArchScale's `swayoco`): L/2 + 1 sliding-window layers, the full
    attention layer whose KV is the cache, then cross-attention."""
    h = _halves(n_layers, "yoco")
    return (*("swa",) * (h + 1), "yoco_kv", *("yoco_cross",) * (n_layers - h - 2))


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
    # SambaY (Ren et al. 2025, ArchScale's sambay_d*): decoder-hybrid-decoder, no positional encoding anywhere,
    # window 128. The pattern depends on n_layers (a function of it; config.json holds it spelt out).
    "sambay": dict(pattern=sambay_pattern, sliding_window=128, nope=True),
    # Its baseline Samba+YOCO (ArchScale's sambayoco_d*): the same with cross-attention in place of the GMUs.
    "samba_yoco": dict(pattern=samba_yoco_pattern, sliding_window=128, nope=True),
    # YOCO (Sun et al. 2024) with a sliding-window self-decoder (ArchScale's swayoco_d*: window 128, RoPE).
    "yoco": dict(pattern=yoco_pattern, sliding_window=128),
    # Hydra (Chaudhary & Browning 2025) as configuration: a Mamba2 backbone, block-sparse global attention in one
    # layer of four, chunk-level MoE feed-forwards, a product-key memory in one layer of four (model.type=hydra).
    "hydra": dict(pattern=("mamba2+chunk_moe", "mamba2+pkm", "mamba2+chunk_moe", "block_sparse+chunk_moe")),
}


@dataclasses.dataclass(frozen=True)
class HybridConfig(DecoderConfig):
    """The skeleton's fields plus the sub-quadratic mixers' sizes (defaults: the official ones).

    ssm_state:    N, Mamba2's state size per head (128)
    ssm_head_dim: P, Mamba2's head dim (64); heads = expand * d_model / ssm_head_dim
    expand:       inner width / d_model of Mamba2 and of Based's gated convolution (2)
    conv_kernel:  width of the short causal convolutions (Mamba2, GDN: 4; Based: 3)
    chunk_size:   chunk length of the chunked algorithms: speed and memory only, the result is the same (64)
    linear_attention_impl: the chunked core of Mamba2 and Based (kernels/linear_attention/ops.py) and of GDN
                  (kernels/delta_rule/ops.py): xla (the plain-JAX chunked form, default), pallas (the Pallas
                  kernels; interpret mode off a GPU: tests only), auto (pallas on a GPU for Mamba2/Based, xla
                  for GDN). The default stays xla until the kernels are measured on a GPU (docs/kernels.md).
    value_expand: gated DeltaNet's value head dim / key head dim (2); GDN uses n_heads heads of key dim
                  dim_per_head (set model.head_dim to 0.75 d_model / n_heads for the paper's 6 d_model^2 layer)
    feature_dim:  Based's projected q/k dim per head before the Taylor map (16); Based uses n_heads heads
    nope:         no positional encoding in any attention layer (SambaY, Samba+YOCO: ArchScale's `nope`)
    gmu_norm:     the GMU normalises its gated memory, W_out(RMSNorm(m * silu(W_in x)) * w): ArchScale's GMU for
                  a Mamba2 memory (True); False: the paper's W_out(silu(W_in x) * m)
    pkm_heads, pkm_keys, pkm_topk, pkm_key_dim: the product-key memory "pkm" (Lample et al. 2019: 4 heads, 512
                  sub-keys per half (512^2 memory slots), top 32, query dim 512)
    """

    type: str = "hybrid"
    ssm_state: int = 128
    ssm_head_dim: int = 64
    expand: int = 2
    conv_kernel: int = 4
    chunk_size: int = 64
    linear_attention_impl: Literal["auto", "xla", "pallas"] = "xla"
    value_expand: int = 2
    feature_dim: int = 16
    nope: bool = False
    gmu_norm: bool = True
    pkm_heads: int = 4
    pkm_keys: int = 512
    pkm_topk: int = 32
    pkm_key_dim: int = 512

    @classmethod
    def preset(cls, name: str, **fields) -> "HybridConfig":
        """The named preset (PRESETS) with `fields` on top (Hydra's is a HydraConfig: model.type=hydra)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown hybrid preset {name!r}; valid: {', '.join(PRESETS)}")
        config_cls = HydraConfig if name == "hydra" else cls
        merged = {**PRESETS[name], **fields}
        if callable(merged["pattern"]):
            merged["pattern"] = merged["pattern"](merged.get("n_layers", config_cls.__dataclass_fields__["n_layers"].default))
        return config_cls(**merged)

    def validate(self) -> None:
        super().validate()
        for key in ("ssm_state", "ssm_head_dim", "expand", "conv_kernel", "chunk_size", "value_expand", "feature_dim",
                    "pkm_heads", "pkm_keys", "pkm_topk", "pkm_key_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.linear_attention_impl != "xla" and (self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1)):
            raise ConfigError(f"model.linear_attention_impl={self.linear_attention_impl} needs model.chunk_size a power "
                              f"of two >= 16 (Triton blocks), got {self.chunk_size}")
        mixers = {s.mixer for s in self.layer_specs}
        if mixers & {"mamba2", "mamba2_memory", "gmu"} and (self.expand * self.d_model) % self.ssm_head_dim:
            raise ConfigError(f"model.ssm_head_dim={self.ssm_head_dim} must divide model.expand * model.d_model = "
                              f"{self.expand * self.d_model} (Mamba2 heads = expand * d_model / ssm_head_dim)")


@register("hybrid", HybridConfig)
class Hybrid(Decoder):
    pass


@dataclasses.dataclass(frozen=True)
class HydraConfig(HybridConfig, MoEConfig):
    """Hydra: the hybrid keys plus the MoE keys (models/moe.py) for its chunk-level MoE feed-forward.

    moe_chunk: tokens per routing decision of "chunk_moe" (layers/chunk_moe.py): each chunk of positions is
               routed by its first token's router logits (64)
    """

    type: str = "hydra"
    ffn: str = "swiglu"
    moe_chunk: int = 64

    def validate(self) -> None:
        super().validate()
        if self.moe_chunk < 1:
            raise ConfigError(f"model.moe_chunk must be >= 1, got {self.moe_chunk}")


@register("hydra", HydraConfig)
class Hydra(Decoder):
    pass
