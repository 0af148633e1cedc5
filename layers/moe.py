"""The Mixture-of-Experts feed-forward "moe": router -> dispatch -> experts -> combine (docs/moe.md).

    y = Σ_{chosen i} gate_i · FFN_i(x)  +  Σ_shared FFN_s(x)

Configured by the model config's MoE fields (models/moe.py: MoEConfig, which documents each key):
  router    topk (token choice, softmax or sigmoid scores), moge (top-k/G inside each of G expert groups),
            expert_choice (each expert takes its top-C tokens of the sequence; non-causal: no decoding)
  balance   aux_loss (Switch/GShard), aux_free (DeepSeek-V3 selection bias, a Buffer updated each training
            step), none; the router z-loss is separate
  experts   E routed SwiGLU experts of width expert_d_ff (fine-grained), S always-on shared experts
            (DeepSeekMoE), MoE++'s zero / copy / constant experts and gating residual, BigMac's
            down-projection before dispatch and up-projection after combine
  dispatch  dropless (sort -> grouped matmul -> unsort) or capacity (per-sequence slots; drops reported)
The router runs in fp32. Reports: moe/aux_loss, moe/z_loss (losses), moe/load (share of assignments per
expert, a histogram), moe/maxvio, moe/dropped (capacity), moe/{zero,copy,constant}_frac (MoE++).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers import moe_dispatch, moe_routing
from effax.layers.mixer import Buffer, Layer, LayerContext, register_ffn
from effax.layers.mlp import SwiGLU
from effax.layers.sharding import logical_init

CARRY = "moe/router_logits"  # the previous MoE layer's router logits (MoE++ gating residual)
ROUTER_MLP_MULT = 8  # MoE++'s two-layer router: D -> 8 O -> O with tanh (official code; O router outputs)


def expert_width(cfg) -> int:
    """expert_d_ff, or the dense width split over the active experts (top_k routed + shared): the active
    FFN parameters then equal the dense model's (MoEConfig.validate checks the division)."""
    return cfg.expert_d_ff or cfg.ffn_dim // (cfg.top_k + cfg.n_shared_experts)


def n_routed(cfg) -> int:
    """All router outputs: FFN experts, then zero, copy and constant experts (MoE++)."""
    return cfg.n_experts + cfg.n_zero_experts + cfg.n_copy_experts + cfg.n_constant_experts


@register_ffn("moe")
class MoE(Layer):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        if not hasattr(cfg, "n_experts"):
            raise ValueError(f"feed-forward 'moe' needs model.type=moe (its config holds the MoE keys); got "
                             f"model.type={cfg.type!r}")
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        D, E, O, F = cfg.d_model, cfg.n_experts, n_routed(cfg), expert_width(cfg)
        width = cfg.bigmac_dim or D  # where the routed experts work
        pdt = jnp.dtype(cfg.param_dtype)

        def param(shape, axes, std=cfg.init_std):
            return nnx.Param(logical_init(nnx.initializers.normal(std), axes)(rngs.params(), shape, pdt))

        if cfg.router_mlp:
            self.router_hidden = param((D, ROUTER_MLP_MULT * O), ("embed", None))
            self.router = param((ROUTER_MLP_MULT * O, O), (None, None))
        else:
            self.router = param((D, O), ("embed", None))
        if cfg.gating_residual:
            self.gate_residual = param((O, O), (None, None))
        if cfg.balance == "aux_free":
            self.bias = Buffer(logical_init(nnx.initializers.zeros, (None,))(rngs.params(), (O,), jnp.float32))
        if cfg.bigmac_dim:
            self.bigmac_down = param((D, width), ("embed", None))
            self.bigmac_up = param((width, D), (None, "embed"), cfg.out_init_std)
        self.expert_gate = param((E, width, F), ("experts", "embed", "mlp"))
        self.expert_up = param((E, width, F), ("experts", "embed", "mlp"))
        self.expert_down = param((E, F, width), ("experts", "mlp", "embed"), cfg.out_init_std)
        if cfg.n_constant_experts:
            # MoE++ constant expert j: softmax(x W_j) mixes the input with a learned vector v_j (init N(0, 1)
            # as in the official code)
            self.constant_value = param((cfg.n_constant_experts, width), (None, "embed"), 1.0)
            self.constant_mix = param((cfg.n_constant_experts, width, 2), (None, "embed", None))
        if cfg.n_shared_experts:
            self.shared = SwiGLU(D, cfg.n_shared_experts * F, init_std=cfg.init_std, out_std=cfg.out_init_std,
                                 dtype=self.dtype, param_dtype=pdt, rngs=rngs)

    # --- counts ------------------------------------------------------------------------------------

    @classmethod
    def _counts(cls, cfg) -> dict:
        D, O, F = cfg.d_model, n_routed(cfg), expert_width(cfg)
        width = cfg.bigmac_dim or D
        router = (D * ROUTER_MLP_MULT * O + ROUTER_MLP_MULT * O * O) if cfg.router_mlp else D * O
        return {
            "router": router + (O * O if cfg.gating_residual else 0),
            "bigmac": 2 * D * width if cfg.bigmac_dim else 0,
            "expert": 3 * width * F,  # one routed expert
            "constant": cfg.n_constant_experts * 3 * width,
            "shared": 3 * D * cfg.n_shared_experts * F,
        }

    @classmethod
    def ffn_experts_per_token(cls, cfg) -> float:
        """FFN experts a token uses: top_k, less the share of choices that land on MoE++'s zero-computation
        experts when routing is balanced (uniform over all router outputs)."""
        return cfg.top_k * cfg.n_experts / n_routed(cfg)

    @classmethod
    def param_count(cls, cfg) -> int:
        c = cls._counts(cfg)
        return c["router"] + c["bigmac"] + cfg.n_experts * c["expert"] + c["constant"] + c["shared"]

    @classmethod
    def active_param_count(cls, cfg) -> int:
        c = cls._counts(cfg)
        return c["router"] + c["bigmac"] + round(cls.ffn_experts_per_token(cfg) * c["expert"]) + c["constant"] + c["shared"]

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        """2 × the matmul parameters a token goes through; zero / copy / constant experts are free."""
        c = cls._counts(cfg)
        return 2.0 * (c["router"] + c["bigmac"] + cls.ffn_experts_per_token(cfg) * c["expert"] + c["shared"])

    @classmethod
    def init_carry(cls, cfg, batch: int, seq_len: int) -> dict:
        return {CARRY: jnp.zeros((batch, seq_len, n_routed(cfg)), jnp.float32)} if cfg.gating_residual else {}

    # --- forward -----------------------------------------------------------------------------------

    def __call__(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        cfg = self.cfg
        x_BTD = x_BTD.astype(self.dtype)
        logits_BTO = self._router_logits(x_BTD, ctx)
        if cfg.z_loss_coef:
            ctx.aux_loss("moe/z_loss", cfg.z_loss_coef * moe_routing.router_z_loss(logits_BTO))
        scores_BTO = moe_routing.scores(logits_BTO, cfg.router_score)
        x_in = x_BTD @ self.bigmac_down[...].astype(self.dtype) if cfg.bigmac_dim else x_BTD
        w = moe_dispatch.ExpertWeights(*(p[...].astype(self.dtype) for p in (self.expert_gate, self.expert_up, self.expert_down)))
        if cfg.router == "expert_choice":
            y = self._expert_choice(x_in, scores_BTO, w, ctx)
        else:
            y = self._token_choice(x_in, scores_BTO, w, ctx)
        if cfg.bigmac_dim:
            y = y @ self.bigmac_up[...].astype(self.dtype)
        if cfg.n_shared_experts:
            y = y + self.shared(x_BTD)
        return y

    def _router_logits(self, x_BTD, ctx: LayerContext):
        x32 = x_BTD.astype(jnp.float32)
        if self.cfg.router_mlp:
            x32 = jnp.tanh(x32 @ self.router_hidden[...].astype(jnp.float32))
        logits_BTO = x32 @ self.router[...].astype(jnp.float32)
        if self.cfg.gating_residual:  # MoE++: this layer's logits + W_g · the previous MoE layer's
            logits_BTO = logits_BTO + ctx.carry[CARRY] @ self.gate_residual[...].astype(jnp.float32)
            ctx.carry[CARRY] = logits_BTO
        return logits_BTO

    def _expert_choice(self, x_BTD, scores_BTO, w, ctx: LayerContext):
        if ctx.valid_BT is not None:
            raise ValueError("model.router=expert_choice cannot decode: each expert takes its top-C tokens of the "
                             "whole sequence, so a token's output depends on later tokens (non-causal)")
        B, T, _ = x_BTD.shape
        capacity = min(T, math.ceil(T * self.cfg.top_k / self.cfg.n_experts))
        token_BEC, gate_BEC = moe_routing.expert_choice(scores_BTO, capacity)
        self._report_load(ctx, jnp.full((self.cfg.n_experts,), B * capacity, jnp.float32))  # every slot is filled
        return moe_dispatch.capacity(x_BTD, token_BEC, gate_BEC, w)

    def _token_choice(self, x_BTD, scores_BTO, w, ctx: LayerContext):
        cfg = self.cfg
        T = x_BTD.shape[1]
        bias_O = self.bias[...] if cfg.balance == "aux_free" else None
        expert_BTZ, gate_BTZ = moe_routing.token_choice(scores_BTO, cfg.top_k, renormalize=cfg.router_renormalize,
                                                        bias_O=bias_O, n_groups=cfg.n_groups if cfg.router == "moge" else 1)
        load_O = moe_routing.assignment_counts(expert_BTZ, n_routed(cfg))
        if cfg.balance == "aux_loss":
            ctx.aux_loss("moe/aux_loss", cfg.aux_loss_coef * moe_routing.balance_loss(scores_BTO, expert_BTZ, cfg.router_score))
        if cfg.balance == "aux_free" and ctx.train:  # selection bias: state outside the gradient
            self.bias[...] = moe_routing.aux_free_update(bias_O, load_O, cfg.bias_update_rate)
        self._report_load(ctx, load_O)
        if cfg.dispatch == "capacity" and ctx.valid_BT is None:
            # decoding computes every assignment: capacity is a training-time limit (docs/moe.md)
            capacity = min(T, math.ceil(T * cfg.top_k * cfg.capacity_factor / cfg.n_experts))
            token_BEC, slot_gate_BEC, kept, routed = moe_dispatch.capacity_slots(expert_BTZ, gate_BTZ, cfg.n_experts, capacity)
            ctx.diagnostic("moe/dropped", 1.0 - kept / jnp.maximum(routed, 1))
            y = moe_dispatch.capacity(x_BTD, token_BEC, slot_gate_BEC, w)
        else:
            y = moe_dispatch.dropless(x_BTD, expert_BTZ, gate_BTZ, w, impl=cfg.gmm_impl)
        if n_routed(cfg) > cfg.n_experts:
            y = y + self._zero_computation(x_BTD, expert_BTZ, gate_BTZ, ctx)
        return y

    def _zero_computation(self, x_BTD, expert_BTZ, gate_BTZ, ctx: LayerContext):
        """MoE++'s experts without an FFN: zero (adds nothing), copy (adds gate · x), constant j (adds
        gate · (a x + b v_j) with (a, b) = softmax(x W_j))."""
        cfg = self.cfg
        first = {"zero": cfg.n_experts, "copy": cfg.n_experts + cfg.n_zero_experts,
                 "constant": cfg.n_experts + cfg.n_zero_experts + cfg.n_copy_experts}
        count = {"zero": cfg.n_zero_experts, "copy": cfg.n_copy_experts, "constant": cfg.n_constant_experts}
        for kind in first:
            if count[kind]:
                chosen_BTZ = (expert_BTZ >= first[kind]) & (expert_BTZ < first[kind] + count[kind])
                ctx.diagnostic(f"moe/{kind}_frac", jnp.mean(chosen_BTZ.astype(jnp.float32)))
        x32 = x_BTD.astype(jnp.float32)
        copy_BT = jnp.sum(jnp.where((expert_BTZ >= first["copy"]) & (expert_BTZ < first["constant"]), gate_BTZ, 0.0), -1)
        y = copy_BT[..., None] * x32
        if cfg.n_constant_experts:  # per constant expert j: its gate [B, T, j], mix [B, T, j, 2], vector [j, D]
            const_gate = jnp.einsum("btz,btzj->btj", gate_BTZ, jax.nn.one_hot(expert_BTZ - first["constant"],
                                                                              cfg.n_constant_experts, dtype=jnp.float32))
            mix = jax.nn.softmax(jnp.einsum("btd,jdm->btjm", x32, self.constant_mix[...].astype(jnp.float32)), axis=-1)
            y = (y + jnp.einsum("btj,btd->btd", const_gate * mix[..., 0], x32)
                 + jnp.einsum("btj,jd->btd", const_gate * mix[..., 1], self.constant_value[...].astype(jnp.float32)))
        return y.astype(x_BTD.dtype)

    def _report_load(self, ctx: LayerContext, load_O):
        ctx.diagnostic("moe/load", load_O / jnp.maximum(jnp.sum(load_O), 1.0))
        ctx.diagnostic("moe/maxvio", moe_routing.max_violation(load_O))
