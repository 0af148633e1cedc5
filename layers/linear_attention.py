"""Scalar-gated linear attention in the layers: S_t = exp(g_t) S_{t-1} + v_t k_t^T, y_t = S_t q_t per head.

The chunked algorithm (training, prefill), the recurrent step (decoding) and the quadratic reference
(tests) live in kernels/linear_attention/reference.py, whose docstring gives the equations, the chunked
form and the packed-document rule; they are re-exported here. Training and prefill go through
kernels/linear_attention/ops.py (impl: model.linear_attention_impl). Mamba2's SSD is layers/ssm.py; Based
(below) is this recurrence with g = 0 on Taylor features. Everything runs in fp32 (inputs are upcast).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.kernels.linear_attention.reference import (  # noqa: F401  (the core lives with its kernel)
    _check, _new_document_BT, chunked, quadratic, recurrent, segment_sums, step)
from effax.kernels.linear_attention import ops as la_ops
from effax.layers.conv import require_fields
from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.norms import flat_rows
from effax.layers.sharding import logical_init

F32 = jnp.float32


def chunked_flops(cfg_chunk: int, seq_len: int, *, K: int, H: int, N: int, P: int) -> float:
    """Forward FLOPs per token of `chunked`: intra-chunk scores (2QN per group) and outputs (2QP per head),
    chunk contributions and reads of the entering state (2NP each per head); Q = min(chunk, T)."""
    Q = min(cfg_chunk, seq_len)
    return 2 * Q * N * K + 2 * Q * P * H + 4 * N * P * H


def write_state(state, i, new):
    """Writes one layer's new decode state (a pytree) at repeat index i of the stacked state."""
    return jax.tree.map(lambda s, n: s.at[i].set(n.astype(s.dtype)), state, new)


def read_state(state, i):
    return jax.tree.map(lambda s: s[i], state)


def projection(rngs: nnx.Rngs, cfg, shape, axes, *, out: bool = False) -> nnx.Param:
    """A bias-free projection at the skeleton's init: normal(init_std), or out_init_std for one that
    writes into the residual stream."""
    std = cfg.out_init_std if out else cfg.init_std
    init = logical_init(nnx.initializers.normal(std), axes)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))


# --- Based ----------------------------------------------------------------------------------------------


def taylor_features(x):
    """Based's feature map on the last axis (d = its size): phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))],
    1 + d + d^2 features, so phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d): the 2nd-order Taylor
    expansion of exp(q.k / sqrt(d))."""
    if x.ndim > 2 and x.shape[0] == 1:  # a batch of one on flat rows: XLA:CPU's batch-1 kernel (norms.flat_rows)
        return taylor_features(flat_rows(x)).reshape(*x.shape[:-1], -1)
    d = x.shape[-1]
    x = x.astype(F32)
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / d**0.25, outer / (math.sqrt(2) * math.sqrt(d))], axis=-1)


@register_mixer("based")
class Based(Layer):
    """Based's linear attention (Arora et al. 2024; HazyResearch/based `LinearAttention` with `TaylorExp`):

        q, k = x W_q, x W_k   [B, T, H, f]  (f = model.feature_dim, 16 in Based)
        v = x W_v             [B, T, H, P]  (P = the head dim, d_model / n_heads)
        y_t = sum_{s <= t} phi(q_t).phi(k_s) v_s / sum_{s <= t} phi(q_t).phi(k_s),   out = y W_o

    no decay (g = 0), no RoPE, no biases. The denominator rides along as a column of ones appended to v,
    so the numerator and the normaliser are one pass of the chunked algorithm; phi(q).phi(k) >= 1/2, so it
    never vanishes (Based adds eps = 1e-12; not needed). Decode state: [B, H, P + 1, 1 + f + f^2]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        require_fields(cfg, "feature_dim", "chunk_size", mixer="based")
        D, H, P, f = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.feature_dim
        self.dtype, self.chunk_size = jnp.dtype(cfg.dtype), cfg.chunk_size
        self.la_impl = cfg.linear_attention_impl  # kernels/linear_attention/ops.py
        self.q = projection(rngs, cfg, (D, H, f), ("embed", "heads", None))
        self.k = projection(rngs, cfg, (D, H, f), ("embed", "heads", None))
        self.v = projection(rngs, cfg, (D, H, P), ("embed", "heads", "head_dim"))
        self.o = projection(rngs, cfg, (H, P, D), ("heads", "head_dim", "embed"), out=True)

    @staticmethod
    def state_size(cfg) -> int:
        return 1 + cfg.feature_dim + cfg.feature_dim**2

    @classmethod
    def param_count(cls, cfg) -> int:
        return cfg.d_model * cfg.n_heads * (2 * cfg.feature_dim + 2 * cfg.dim_per_head)

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        H = cfg.n_heads
        return 2 * cls.param_count(cfg) + chunked_flops(cfg.chunk_size, seq_len, K=H, H=H, N=cls.state_size(cfg),
                                                        P=cfg.dim_per_head + 1)

    def _qkv(self, x_BTD):
        dt = self.dtype
        x_BTD = x_BTD.astype(dt)
        proj = lambda w: jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(dt))  # noqa: E731
        v = proj(self.v).astype(F32)
        v_ones = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # the last column sums the normaliser
        return taylor_features(proj(self.q)), taylor_features(proj(self.k)), v_ones

    def _out(self, y_BTHP1):
        y_BTHP = y_BTHP1[..., :-1] / y_BTHP1[..., -1:]
        return jnp.einsum("bthp,hpd->btd", y_BTHP.astype(self.dtype), self.o[...].astype(self.dtype))

    def __call__(self, x_BTD, ctx: LayerContext):
        q, k, v = self._qkv(x_BTD)
        y, _ = la_ops.linear_attention(q, k, v, jnp.zeros(v.shape[:3], F32), chunk_size=self.chunk_size, impl=self.la_impl, segment_ids_BT=ctx.segment_ids_BT)
        return self._out(y)

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype):
        return jnp.zeros((batch, cfg.n_heads, cfg.dim_per_head + 1, cls.state_size(cfg)), F32)  # fp32 whatever dtype

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        q, k, v = self._qkv(x_BTD)
        k = jnp.where(ctx.valid_BT[:, :, None, None], k, 0.0)  # padding writes nothing (phi(k) has a constant 1)
        y, final = la_ops.linear_attention(q, k, v, jnp.zeros(v.shape[:3], F32), chunk_size=self.chunk_size, impl=self.la_impl)
        return self._out(y), write_state(state, i, final)

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        q, k, v = self._qkv(x_BTD)
        y, final = recurrent(q, k, v, jnp.zeros(v.shape[:3], F32), valid_BT=ctx.valid_BT, state_BHPN=state[i])
        return self._out(y), write_state(state, i, final)
