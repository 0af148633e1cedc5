"""The Mamba2 block (Dao & Gu 2024, "Transformers are SSMs"), registered as the mixer "mamba2".

    [z, x, B, C, dt_raw] = x_in W_in                    (one in_proj, split; E, E, N, N, H columns)
    [x, B, C] = silu(causal_conv([x, B, C]))            (one depthwise conv over the E + 2N channels)
    dt = softplus(dt_raw + dt_bias)  [B, T, H]     A = -exp(A_log)  [H]
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     h: [P, N] per head; B, C: [N], shared by all heads (1 group)
    y_t = h_t C_t + D x_t
    out = (RMSNorm(y * silu(z)) * w) W_out         (gated RMSNorm over the whole inner width, norm after gate)

H = expand * d_model / P heads of P = model.ssm_head_dim channels, state size N = model.ssm_state, conv
width model.conv_kernel. The recurrence is the scalar-gated linear attention of layers/linear_attention.py
with q = C, k = B, v = dt x, g = dt A: training and prefill run its chunked SSD algorithm
(model.chunk_size), decoding its recurrent step.

Init (official `Mamba2`): A ~ U(1, 16) stored as A_log; dt = exp(U(log 1e-3, log 0.1)) floored at 1e-4,
stored through the inverse softplus as dt_bias; D = 1; conv weights and bias PyTorch's Conv1d default;
projections at the skeleton's normal(init_std) (the output projection at out_init_std, as every residual
writer here). A_log, dt_bias and D are never weight-decayed (`no_decay=True`), as in the official code.

Decode state: the SSM state [B, H, P, N] (fp32) and the conv's last W - 1 inputs [B, W - 1, E + 2N].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.kernels.linear_attention import ops as la_ops
from effax.layers import linear_attention as la
from effax.layers.conv import causal_conv, conv_weight, history_at, next_history, require_fields
from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.norms import flat_rows
from effax.layers.sharding import logical_init

A_INIT_RANGE = (1.0, 16.0)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
FIELDS = ("ssm_state", "ssm_head_dim", "expand", "conv_kernel", "chunk_size")


def inverse_softplus(y):
    """x with softplus(x) = y: log(exp(y) - 1) = y + log(1 - exp(-y))."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(key, shape, dtype):
    """The official dt init: log-uniform in [DT_MIN, DT_MAX], floored, through the inverse softplus."""
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(DT_MIN), math.log(DT_MAX)))
    return inverse_softplus(jnp.maximum(dt, DT_FLOOR)).astype(dtype)


def a_log_init(key, shape, dtype, low: float = A_INIT_RANGE[0], high: float = A_INIT_RANGE[1]):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)


def gated_rms_norm(y, gate, scale, eps: float, *, norm_before_gate: bool):
    """Mamba2's (norm_before_gate=False): RMSNorm(y * silu(gate)) * scale; flash-linear-attention's
    FusedRMSNormGated (True): RMSNorm(y) * scale * silu(gate). Normalised over the last axis, in fp32."""
    shape = y.shape
    y, gate = flat_rows(y).astype(jnp.float32), flat_rows(gate).astype(jnp.float32)  # flat_rows: batch-1 speed
    if not norm_before_gate:
        y = y * jax.nn.silu(gate)
    y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)
    return (y * jax.nn.silu(gate) if norm_before_gate else y).reshape(shape)


def mamba2_sizes(cfg) -> tuple[int, int, int, int]:
    """(E inner width, H heads, P head dim, N state size)."""
    E = cfg.expand * cfg.d_model
    return E, E // cfg.ssm_head_dim, cfg.ssm_head_dim, cfg.ssm_state


@register_mixer("mamba2")
class Mamba2(Layer):
    """Parameters in the official layout, so its weights load unchanged: in_proj [D, 2E + 2N + H] holding
    [z, x, B, C, dt_raw] (one matmul), one depthwise conv1d over the E + 2N channels [x, B, C], out_proj."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        require_fields(cfg, *FIELDS, mixer="mamba2")
        E, H, P, N = mamba2_sizes(cfg)
        if E % P:
            raise ValueError(f"mamba2: model.expand * model.d_model = {E} is not a multiple of model.ssm_head_dim={P}")
        D, W = cfg.d_model, cfg.conv_kernel
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.sizes, self.dtype, self.chunk_size, self.eps = (E, H, P, N), jnp.dtype(cfg.dtype), cfg.chunk_size, cfg.norm_eps
        self.la_impl = cfg.linear_attention_impl  # kernels/linear_attention/ops.py

        def param(init, shape, axes, **meta):
            return nnx.Param(logical_init(init, axes)(rngs.params(), shape, param_dtype), **meta)

        self.in_proj = la.projection(rngs, cfg, (D, 2 * E + 2 * N + H), ("embed", None))
        self.conv = conv_weight(rngs, W, (E + 2 * N,), (None,), param_dtype)
        bias_bound = 1 / math.sqrt(W)  # Conv1d's default bias init, like its weight
        bias = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bias_bound, bias_bound)  # noqa: E731
        self.conv_bias = param(bias, (E + 2 * N,), (None,), no_decay=True)
        self.A_log = param(a_log_init, (H,), ("heads",), no_decay=True)
        self.dt_bias = param(dt_bias_init, (H,), ("heads",), no_decay=True)
        self.D = param(nnx.initializers.ones, (H,), ("heads",), no_decay=True)
        self.norm = param(nnx.initializers.ones, (E,), ("mlp",), no_decay=True)
        self.out_proj = la.projection(rngs, cfg, (E, D), ("mlp", "embed"), out=True)

    @classmethod
    def param_count(cls, cfg) -> int:
        E, H, P, N = mamba2_sizes(cfg)
        D, W = cfg.d_model, cfg.conv_kernel
        in_proj = D * (2 * E + 2 * N + H)
        conv = (W + 1) * (E + 2 * N)  # weights and bias over the x, B, C channels
        return in_proj + conv + 3 * H + E + E * D  # + A_log, dt_bias, D; norm; out_proj

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        """Projections, the conv, and the chunked SSD (one group of B/C for the H heads)."""
        E, H, P, N = mamba2_sizes(cfg)
        D, W = cfg.d_model, cfg.conv_kernel
        matmuls = D * (2 * E + 2 * N + H) + E * D
        return 2 * matmuls + 2 * W * (E + 2 * N) + la.chunked_flops(cfg.chunk_size, seq_len, K=1, H=H, N=N, P=P)

    # The block, in parts that the full forward, prefill and decode share.

    def _project(self, x_BTD):
        """-> (z [B, T, E], xBC [B, T, E + 2N] before the conv, dt_raw [B, T, H])."""
        E, H, P, N = self.sizes
        h = jnp.einsum("btd,de->bte", x_BTD.astype(self.dtype), self.in_proj[...].astype(self.dtype))
        return h[..., :E], h[..., E : 2 * E + 2 * N], h[..., 2 * E + 2 * N :]

    def _convolve(self, xbc, *, segment_ids_BT=None, history=None):
        return jax.nn.silu(causal_conv(xbc, self.conv[...], self.conv_bias[...], segment_ids_BT=segment_ids_BT, history=history))

    def ssm_inputs(self, xbc, dt_raw_BTH):
        """(q = C, k = B, v = dt x, log decay = dt A) of the scalar-gated recurrence, from the conv's output."""
        E, H, P, N = self.sizes
        x_BTHP = xbc[..., :E].reshape(*xbc.shape[:2], H, P).astype(jnp.float32)
        b_BT1N, c_BT1N = xbc[..., None, E : E + N], xbc[..., None, E + N :]  # one group of B, C for all heads
        dt_BTH = jax.nn.softplus(dt_raw_BTH.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        A_H = -jnp.exp(self.A_log[...].astype(jnp.float32))
        return c_BT1N, b_BT1N, x_BTHP * dt_BTH[..., None], dt_BTH * A_H

    def _finish(self, ctx: LayerContext, y_BTHP, xbc, z_BTE):
        """The block's output from the SSM's; a subclass may also read it (SambaY's memory, layers/yoco.py)."""
        return self._out(y_BTHP, xbc, z_BTE)

    def _out(self, y_BTHP, xbc, z_BTE):
        E, H, P, N = self.sizes
        x_BTHP = xbc[..., :E].reshape(y_BTHP.shape).astype(jnp.float32)
        y_BTHP = y_BTHP + self.D[...].astype(jnp.float32)[:, None] * x_BTHP
        y_BTE = gated_rms_norm(y_BTHP.reshape(z_BTE.shape), z_BTE, self.norm[...], self.eps, norm_before_gate=False)
        return jnp.einsum("bte,ed->btd", y_BTE.astype(self.dtype), self.out_proj[...].astype(self.dtype))

    def __call__(self, x_BTD, ctx: LayerContext):
        z, xbc, dt_raw = self._project(x_BTD)
        xbc = self._convolve(xbc, segment_ids_BT=ctx.segment_ids_BT)
        y, _ = la_ops.linear_attention(*self.ssm_inputs(xbc, dt_raw), chunk_size=self.chunk_size, impl=self.la_impl, segment_ids_BT=ctx.segment_ids_BT)
        return self._finish(ctx, y, xbc, z)

    # Decoding.

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype):
        E, H, P, N = mamba2_sizes(cfg)
        return {"ssm": jnp.zeros((batch, H, P, N), jnp.float32),  # fp32 whatever the compute dtype
                "conv": jnp.zeros((batch, cfg.conv_kernel - 1, E + 2 * N), dtype)}

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        """The chunked form over right-padded prompts; padding neither writes (k = 0) nor decays (g = 0)
        the state, so each row's state stops at its own length."""
        z, pre_conv, dt_raw = self._project(x_BTD)
        xbc = self._convolve(pre_conv)
        q, k, v, g = self.ssm_inputs(xbc, dt_raw)
        valid = ctx.valid_BT
        k, g = jnp.where(valid[:, :, None, None], k, 0.0), jnp.where(valid[:, :, None], g, 0.0)
        y, ssm = la_ops.linear_attention(q, k, v, g, chunk_size=self.chunk_size, impl=self.la_impl)
        history = history_at(pre_conv, ctx.lengths_B, self.conv.shape[0])
        return self._finish(ctx, y, xbc, z), la.write_state(state, i, {"ssm": ssm, "conv": history})

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        z, pre_conv, dt_raw = self._project(x_BTD)
        own = la.read_state(state, i)
        xbc = self._convolve(pre_conv, history=own["conv"])
        y, ssm = la.recurrent(*self.ssm_inputs(xbc, dt_raw), valid_BT=ctx.valid_BT, state_BHPN=own["ssm"])
        history = next_history(own["conv"], pre_conv, ctx.valid_BT)
        return self._finish(ctx, y, xbc, z), la.write_state(state, i, {"ssm": ssm, "conv": history})
