"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025), registered as the mixer "gdn": the delta rule with a
scalar gate per head and token, in three equivalent forms (chunked WY/UT for training and prefill, the
recurrent step for decoding, a quadratic reference for tests).

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        S_t: [P, N] per head
    y_t = S_t q_t

with q, k L2-normalised (q also scaled by 1/sqrt(N)), alpha_t = exp(g_t) in (0, 1], beta_t in (0, 1).
Written as S_t = alpha_t S_{t-1} + u_t k_t^T, the "pseudo-value" u_t = beta_t (v_t - alpha_t S_{t-1} k_t)
is what the delta rule adds.

The chunked WY/UT form (training, prefill), the recurrent step (decoding) and the quadratic reference
(tests) live in kernels/delta_rule/reference.py, whose docstring gives the chunked equations and the
packed-document rule; they are re-exported here. Training and prefill go through kernels/delta_rule/ops.py
(impl: model.linear_attention_impl, shared with Mamba2 and Based).

The layer (flash-linear-attention's `GatedDeltaNet`, which the paper's code uses):
    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))      (short convs, no bias)
    beta = sigmoid(x W_b),   g = -exp(A_log) softplus(x W_a + dt_bias)     (Mamba2's gate)
    out = (RMSNorm_per_head(y) * w * silu(x W_g)) W_o                      (norm before the output gate)
computed as one matmul over the six input projections' columns and one depthwise conv over q, k, v's
channels (the parameters stay fla's separate ones). H = n_heads heads of key dim N = head dim and value dim P = value_expand * N. Init as fla: A ~ U(0, 16)
stored as A_log, dt_bias as Mamba2's; A_log and dt_bias are not weight-decayed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effax.kernels.delta_rule import ops as dr_ops
from effax.kernels.delta_rule.reference import (  # noqa: F401  (the core lives with its kernel)
    _check, chunked, quadratic, recurrent, step)
from effax.layers import linear_attention as la
from effax.layers.conv import causal_conv, conv_weight, history_at, next_history, require_fields
from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.sharding import logical_init
from effax.layers.ssm import a_log_init, dt_bias_init, gated_rms_norm

F32 = jnp.float32
L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + eps)
A_INIT_RANGE = (0.0, 16.0)  # fla's GatedDeltaNet (Mamba2 uses (1, 16))


def l2_normalize(x):
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def chunked_flops(chunk: int, seq_len: int, *, H: int, N: int, P: int) -> float:
    """Forward FLOPs per token of `chunked`, per the terms above (Q = min(chunk, T)): K K^T and Q K^T
    (2QN each), the triangular solve (Q(P + N)), the intra-chunk output (2QP), and W S_0^T, the state
    read, the state update (2NP each)."""
    Q = min(chunk, seq_len)
    return H * (4 * Q * N + Q * (P + N) + 2 * Q * P + 6 * N * P)


def gdn_sizes(cfg) -> tuple[int, int, int]:
    """(H heads, N key dim, P value dim)."""
    return cfg.n_heads, cfg.dim_per_head, cfg.value_expand * cfg.dim_per_head


@register_mixer("gdn")
class GatedDeltaNet(Layer):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        require_fields(cfg, "value_expand", "conv_kernel", "chunk_size", mixer="gdn")
        H, N, P = gdn_sizes(cfg)
        D, W = cfg.d_model, cfg.conv_kernel
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.sizes, self.dtype, self.chunk_size, self.eps = (H, N, P), jnp.dtype(cfg.dtype), cfg.chunk_size, cfg.norm_eps
        self.la_impl = cfg.linear_attention_impl  # kernels/delta_rule/ops.py

        def param(init, shape, axes, **meta):
            return nnx.Param(logical_init(init, axes)(rngs.params(), shape, param_dtype), **meta)

        self.w_q = la.projection(rngs, cfg, (D, H, N), ("embed", "heads", None))
        self.w_k = la.projection(rngs, cfg, (D, H, N), ("embed", "heads", None))
        self.w_v = la.projection(rngs, cfg, (D, H, P), ("embed", "heads", "head_dim"))
        self.w_a = la.projection(rngs, cfg, (D, H), ("embed", "heads"))
        self.w_b = la.projection(rngs, cfg, (D, H), ("embed", "heads"))
        self.w_g = la.projection(rngs, cfg, (D, H, P), ("embed", "heads", "head_dim"))
        self.conv_q = conv_weight(rngs, W, (H, N), ("heads", None), param_dtype)
        self.conv_k = conv_weight(rngs, W, (H, N), ("heads", None), param_dtype)
        self.conv_v = conv_weight(rngs, W, (H, P), ("heads", "head_dim"), param_dtype)
        a_log = lambda key, shape, dtype: a_log_init(key, shape, dtype, *A_INIT_RANGE)  # noqa: E731
        self.A_log = param(a_log, (H,), ("heads",), no_decay=True)
        self.dt_bias = param(dt_bias_init, (H,), ("heads",), no_decay=True)
        self.norm = param(nnx.initializers.ones, (P,), ("head_dim",), no_decay=True)  # shared by the heads (fla)
        self.w_o = la.projection(rngs, cfg, (H, P, D), ("heads", "head_dim", "embed"), out=True)

    @classmethod
    def param_count(cls, cfg) -> int:
        H, N, P = gdn_sizes(cfg)
        D, W = cfg.d_model, cfg.conv_kernel
        return D * H * (2 * N + 2 * P + 2) + W * H * (2 * N + P) + 2 * H + P + H * P * D

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        H, N, P = gdn_sizes(cfg)
        D, W = cfg.d_model, cfg.conv_kernel
        matmuls = D * H * (2 * N + 2 * P + 2) + H * P * D
        return 2 * matmuls + 2 * W * H * (2 * N + P) + chunked_flops(cfg.chunk_size, seq_len, H=H, N=N, P=P)

    def _project(self, x_BTD):
        """-> (qkv [B, T, 2HN + HP] before the convs, a [B, T, H], b [B, T, H], gate [B, T, H, P]): the six input
        projections as one matmul over their concatenated columns."""
        H, N, P = self.sizes
        D = x_BTD.shape[-1]
        w = jnp.concatenate([w[...].reshape(D, -1) for w in (self.w_q, self.w_k, self.w_v, self.w_g, self.w_a, self.w_b)], 1)
        h = jnp.einsum("btd,de->bte", x_BTD.astype(self.dtype), w.astype(self.dtype))
        qkv, gate, a, b = jnp.split(h, [2 * H * N + H * P, 2 * H * N + 2 * H * P, 2 * H * N + 2 * H * P + H], axis=-1)
        return qkv, a, b, gate.reshape(*gate.shape[:2], H, P)

    def _convolve(self, qkv, *, segment_ids_BT=None, history=None):
        """silu(causal_conv(.)) of q, k and v as one depthwise conv over their channels (each filter its own)."""
        W = self.conv_q.shape[0]
        w = jnp.concatenate([c[...].reshape(W, -1) for c in (self.conv_q, self.conv_k, self.conv_v)], axis=1)
        return jax.nn.silu(causal_conv(qkv, w, segment_ids_BT=segment_ids_BT, history=history))

    def rule_inputs(self, qkv, a_BTH, b_BTH):
        """(q, k, v, beta, log decay) of the delta rule, from the convs' output."""
        H, N, P = self.sizes
        B, T = qkv.shape[:2]
        q, k, v = jnp.split(qkv, [H * N, 2 * H * N], axis=-1)
        q = l2_normalize(q.reshape(B, T, H, N)) * N**-0.5
        g = -jnp.exp(self.A_log[...].astype(F32)) * jax.nn.softplus(a_BTH.astype(F32) + self.dt_bias[...].astype(F32))
        return q, l2_normalize(k.reshape(B, T, H, N)), v.reshape(B, T, H, P).astype(F32), jax.nn.sigmoid(b_BTH.astype(F32)), g

    def _out(self, y_BTHP, gate_BTHP):
        y = gated_rms_norm(y_BTHP, gate_BTHP, self.norm[...], self.eps, norm_before_gate=True)
        return jnp.einsum("bthp,hpd->btd", y.astype(self.dtype), self.w_o[...].astype(self.dtype))

    def __call__(self, x_BTD, ctx: LayerContext):
        qkv, a, b, gate = self._project(x_BTD)
        qkv = self._convolve(qkv, segment_ids_BT=ctx.segment_ids_BT)
        y, _ = dr_ops.delta_rule(*self.rule_inputs(qkv, a, b), chunk_size=self.chunk_size, impl=self.la_impl,
                                 segment_ids_BT=ctx.segment_ids_BT)
        return self._out(y, gate)

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype):
        H, N, P = gdn_sizes(cfg)
        return {"delta": jnp.zeros((batch, H, P, N), F32),  # fp32 whatever the compute dtype
                "conv": jnp.zeros((batch, cfg.conv_kernel - 1, 2 * H * N + H * P), dtype)}

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        """Chunked over right-padded prompts; padding gets beta = 0 and g = 0, leaving the state as it was."""
        pre_conv, a, b, gate = self._project(x_BTD)
        q, k, v, beta, g = self.rule_inputs(self._convolve(pre_conv), a, b)
        valid = ctx.valid_BT[..., None]
        y, delta = dr_ops.delta_rule(q, k, v, jnp.where(valid, beta, 0.0), jnp.where(valid, g, 0.0),
                                     chunk_size=self.chunk_size, impl=self.la_impl)
        history = history_at(pre_conv, ctx.lengths_B, self.conv_q.shape[0])
        return self._out(y, gate), la.write_state(state, i, {"delta": delta, "conv": history})

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        pre_conv, a, b, gate = self._project(x_BTD)
        own = la.read_state(state, i)
        qkv = self._convolve(pre_conv, history=own["conv"])
        y, delta = recurrent(*self.rule_inputs(qkv, a, b), valid_BT=ctx.valid_BT, state_BHPN=own["delta"])
        history = next_history(own["conv"], pre_conv, ctx.valid_BT)
        return self._out(y, gate), la.write_state(state, i, {"delta": delta, "conv": history})
