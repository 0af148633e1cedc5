"""Mixture-of-Experts decoders: the skeleton with the feed-forward "moe" (layers/moe.py) in some layers.

    effax train experiments/moe/moe.py:smoke-topk --set model.n_experts=16 model.top_k=4

Which layers are MoE: every layer by default (`model.ffn=moe`); `model.moe_every=k` keeps MoE in every
k-th layer (the others SwiGLU of width d_ff, GShard / Switch style with k=2); or list the layers with
`model.pattern`, e.g. `attn+swiglu,attn+moe` (alternate) or, for DeepSeek's first-k-dense, one entry per
layer: `attn+swiglu,attn+moe,attn+moe,attn+moe`. docs/moe.md explains every key with its paper.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from effax.kernels.gmm.ops import IMPLS as GMM_IMPLS
from effax.layers.moe import n_routed
from effax.models.decoder import Decoder, DecoderConfig, LayerSpec
from effax.models.registry import ConfigError, register


@dataclasses.dataclass(frozen=True)
class MoEConfig(DecoderConfig):
    type: str = "moe"
    ffn: str = "moe"
    moe_every: int = 1  # MoE in layers k-1, 2k-1, ... (0-based); the rest of the "moe" layers become swiglu
    # expert set
    n_experts: int = 8  # routed FFN experts E
    top_k: int = 2  # choices per token (expert choice: the capacity factor c, C = T c / E)
    expert_d_ff: int = 0  # width of each expert; 0: ffn_dim / (top_k + n_shared_experts), i.e. the active
    # FFN parameters of a dense model of width d_ff (DeepSeekMoE fine-grained experts at equal cost)
    n_shared_experts: int = 0  # always-on experts of the same width (DeepSeekMoE)
    n_zero_experts: int = 0  # MoE++ zero-computation experts: output 0
    n_copy_experts: int = 0  # MoE++: output = input
    n_constant_experts: int = 0  # MoE++: softmax(W x) mixes the input with a learned vector
    gating_residual: bool = False  # MoE++: router logits += W_g · the previous MoE layer's logits
    bigmac_dim: int = 0  # BigMac: experts work at this width between a down- and an up-projection; 0: off
    # router
    router: Literal["topk", "moge", "expert_choice"] = "topk"
    router_score: Literal["softmax", "sigmoid"] = "softmax"
    router_renormalize: bool = True  # gates / their sum over the k chosen
    router_mlp: bool = False  # MoE++'s router D -> 8 O -> O (O router outputs) with tanh, not one matrix
    n_groups: int = 2  # moge: expert groups G (one per device under expert parallelism), top-(k/G) in each
    # balancing
    balance: Literal["aux_loss", "aux_free", "none"] = "aux_loss"
    aux_loss_coef: float = 1e-2  # α of α E Σ f_i P_i (Switch: 1e-2)
    z_loss_coef: float = 1e-3  # router z-loss (ST-MoE: 1e-3); 0: off
    bias_update_rate: float = 1e-3  # aux_free: u of b_i += u sign(mean load - load_i) (DeepSeek-V3: 1e-3)
    # dispatch
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25  # capacity: C = ceil(T top_k factor / E) slots per expert and sequence
    gmm_impl: Literal["auto", "xla", "pallas", "megablox", "reference"] = "auto"  # dropless grouped matmul (kernels/gmm)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        specs = super().layer_specs
        return tuple(s if s.ffn != "moe" or (i + 1) % self.moe_every == 0 else LayerSpec(s.mixer, "swiglu")
                     for i, s in enumerate(specs))

    def validate(self) -> None:
        super().validate()
        for key in ("moe_every", "n_experts", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("expert_d_ff", "n_shared_experts", "n_zero_experts", "n_copy_experts", "n_constant_experts",
                    "bigmac_dim", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if self.top_k > n_routed(self):
            raise ConfigError(f"model.top_k={self.top_k} exceeds the {n_routed(self)} experts the router chooses from")
        if not self.expert_d_ff and self.ffn_dim % (self.top_k + self.n_shared_experts):
            raise ConfigError(f"model.expert_d_ff=0 splits the dense width {self.ffn_dim} over top_k + n_shared_experts = "
                              f"{self.top_k + self.n_shared_experts} experts, which does not divide it; set model.expert_d_ff "
                              f"or model.d_ff")
        if self.capacity_factor <= 0:
            raise ConfigError(f"model.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.gmm_impl not in GMM_IMPLS:
            raise ConfigError(f"model.gmm_impl={self.gmm_impl!r} is not one of {list(GMM_IMPLS)}")
        zero_computation = n_routed(self) > self.n_experts
        if self.router == "moge":
            if self.n_groups < 2 or self.n_experts % self.n_groups or self.top_k % self.n_groups:
                raise ConfigError(f"model.n_groups={self.n_groups} must be >= 2 and divide model.n_experts={self.n_experts} "
                                  f"and model.top_k={self.top_k} (MoGE takes top_k / n_groups experts in every group)")
            if zero_computation:
                raise ConfigError("model.router=moge groups FFN experts only; set model.n_zero/copy/constant_experts=0")
        if self.router == "expert_choice":
            if self.dispatch != "capacity":
                raise ConfigError("model.router=expert_choice fills every expert's C slots (the capacity path); "
                                  "set model.dispatch=capacity")
            if self.balance != "none":
                raise ConfigError("model.router=expert_choice is balanced by construction (every expert takes C tokens); "
                                  "set model.balance=none")
            if zero_computation:
                raise ConfigError("model.router=expert_choice routes to FFN experts only; set model.n_zero/copy/constant_experts=0")


@register("moe", MoEConfig)
class MoEModel(Decoder):
    def init_cache(self, batch: int, max_len: int, dtype=None):
        if self.cfg.router == "expert_choice" and any(s.ffn == "moe" for s in self.cfg.layer_specs):
            raise ConfigError("model.router=expert_choice cannot decode (generation, throughput, cached decoding): "
                              "each expert takes its top-C tokens of the whole sequence, so a token's output depends "
                              "on the tokens after it. Evaluate it with --suite loss,bpb")
        return super().init_cache(batch, max_len, dtype)
