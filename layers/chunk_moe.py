"""Chunk-level Mixture-of-Experts, the feed-forward "chunk_moe" (Hydra, Chaudhary & Browning 2025).

The MoE feed-forward of layers/moe.py (same router, experts, balancing, dispatch and keys: models/moe.py) with
one routing decision per chunk of model.moe_chunk tokens instead of per token: every token of a chunk uses the
router logits of the chunk's first token, so the whole chunk goes to the same experts with the same gates.

    chunk of token t = position_t // moe_chunk (positions restart per packed document, so chunks do too)
    logits_t = router(x_(first token of t's chunk))

Causal by construction: the decision is known when the chunk starts, so a token's output never depends on a
later token, and decoding needs only that decision (decode state: the chunk's router logits [B, O], fp32).
Hydra pools a chunk's representation to route it; pooling over the whole chunk would let a token's routing
depend on the tokens after it (no causal LM, no decoding), so we route by the chunk's first token
(docs/hybrid.md).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from effax.layers.mixer import LayerContext, register_ffn
from effax.layers.moe import MoE, n_routed

_DECIDED = "chunk_moe/decided"  # decode: the current chunk's logits, handed to _router_logits for one call
_ROUTED = "chunk_moe/routed"  # prefill / decode: the logits the call used, handed back


@register_ffn("chunk_moe")
class ChunkMoE(MoE):
    @classmethod
    def check_config(cls, cfg) -> None:
        if not hasattr(cfg, "moe_chunk"):
            raise ValueError("feed-forward 'chunk_moe' needs model.moe_chunk (model.type=hydra)")
        if cfg.moe_chunk < 1:
            raise ValueError(f"model.moe_chunk must be >= 1, got {cfg.moe_chunk}")
        if cfg.router == "expert_choice":
            raise ValueError("feed-forward 'chunk_moe' routes by token choice; model.router=expert_choice is not causal")

    def _router_logits(self, x_BTD, ctx: LayerContext):
        logits_BTO = super()._router_logits(x_BTD, ctx)
        offset_BT = ctx.positions_BT % self.cfg.moe_chunk  # tokens since the chunk's first
        if _DECIDED in ctx.carry:  # a decode step: a token that opens a chunk decides, the others follow
            logits_BTO = jnp.where((offset_BT == 0)[..., None], logits_BTO, ctx.carry[_DECIDED][:, None])
        else:
            T = x_BTD.shape[1]
            first_BT = jnp.clip(jnp.arange(T)[None, :] - offset_BT, 0, T - 1)
            logits_BTO = jnp.take_along_axis(logits_BTO, first_BT[..., None], axis=1)
        if _ROUTED in ctx.carry:
            ctx.carry[_ROUTED] = logits_BTO
        return logits_BTO

    # Decoding: the state is the current chunk's logits.

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype):
        return jnp.zeros((batch, n_routed(cfg)), jnp.float32)

    def _call(self, x_BTD, ctx: LayerContext, extra: dict):
        inner = dataclasses.replace(ctx, carry={**ctx.carry, **extra})
        y_BTD = self(x_BTD, inner)
        ctx.carry.update({k: v for k, v in inner.carry.items() if k in ctx.carry})  # MoE++'s residual, if any
        for name, value in inner.values.items():  # reports (decoding drops them, but keep them honest)
            ctx.values[name], ctx.reports[name] = value, inner.reports[name]
        return y_BTD, inner.carry[_ROUTED]

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        y_BTD, routed_BTO = self._call(x_BTD, ctx, {_ROUTED: None})
        last_B1O = jnp.take_along_axis(routed_BTO, (ctx.lengths_B - 1)[:, None, None], axis=1)
        return y_BTD, state.at[i].set(last_B1O[:, 0])

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        y_BTD, routed_BTO = self._call(x_BTD, ctx, {_DECIDED: state[i], _ROUTED: None})
        keep_B = ctx.valid_BT[:, 0]
        return y_BTD, state.at[i].set(jnp.where(keep_B[:, None], routed_BTO[:, 0], state[i]))
