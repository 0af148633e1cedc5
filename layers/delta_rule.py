"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025), registered as the mixer "gdn": the delta rule with a
scalar gate per head and token, in three equivalent forms (chunked WY/UT for training and prefill, the
recurrent step for decoding, a quadratic reference for tests).

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        S_t: [P, N] per head
    y_t = S_t q_t

with q, k L2-normalised (q also scaled by 1/sqrt(N)), alpha_t = exp(g_t) in (0, 1], beta_t in (0, 1).
Written as S_t = alpha_t S_{t-1} + u_t k_t^T, the "pseudo-value" u_t = beta_t (v_t - alpha_t S_{t-1} k_t)
is what the delta rule adds.

Chunked form (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule"; the GDN paper's
extension to a gate). Inside a chunk of Q tokens entered with state S_0, with gamma_t the decay from the
chunk start to t (inclusive) and Gamma_ts = gamma_t / gamma_s:
    (I + A) U = beta V - diag(beta gamma) K S_0^T,   A_ts = beta_t Gamma_ts (k_t . k_s) for s < t
so U = U~ - W S_0^T with U~ = (I + A)^-1 beta V and W = (I + A)^-1 diag(beta gamma) K (the UT transform
of the WY representation; one unit-lower-triangular solve per chunk, all chunks in parallel). Then
    Y = diag(gamma) Q S_0^T + (Gamma o Q K^T) U,      S_Q = gamma_Q S_0 + sum_s Gamma_Qs u_s k_s^T
and a scan over chunks carries S_0 (the only sequential part: U needs the entering state).
Packed documents reset the state exactly as in layers/linear_attention.py (pairs within one document,
the entering state only until the first document start, the final state from the last document only).

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


def _check(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH):
    B, T, H, _ = q_BTHN.shape
    if k_BTHN.shape != q_BTHN.shape or v_BTHP.shape[:3] != (B, T, H) or beta_BTH.shape != (B, T, H) \
            or log_decay_BTH.shape != (B, T, H):
        raise ValueError(f"delta rule: q {q_BTHN.shape}, k {k_BTHN.shape} must be [B, T, H, N], v {v_BTHP.shape} "
                         f"[B, T, H, P], beta {beta_BTH.shape} and log decay {log_decay_BTH.shape} [B, T, H]")


def chunked(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, *, chunk_size: int, segment_ids_BT=None, state_BHPN=None):
    """The chunked WY/UT form (module docstring) -> (y [B, T, H, P] fp32, the final state [B, H, P, N])."""
    _check(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH)
    B, T, H, N = q_BTHN.shape
    P = v_BTHP.shape[-1]
    Q = min(chunk_size, T)
    n_chunks = -(-T // Q)
    pad = n_chunks * Q - T

    def chunks(a, mode="constant"):  # [B, T, H, ...] -> [B, chunks, H, Q, ...]: heads before the chunk's tokens
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)
        return jnp.moveaxis(a.reshape(B, n_chunks, Q, *a.shape[2:]), 2, 3) if a.ndim > 2 else a.reshape(B, n_chunks, Q)

    q, k, v = (chunks(a.astype(F32)) for a in (q_BTHN, k_BTHN, v_BTHP))  # [B, c, H, Q, N or P]
    beta = chunks(beta_BTH.astype(F32)[..., None])[..., 0]  # [B, c, H, Q]
    cum = jnp.cumsum(chunks(log_decay_BTH.astype(F32)[..., None])[..., 0], axis=-1)  # log gamma_t

    visible = jnp.tril(jnp.ones((Q, Q), bool))  # [t, s]: s <= t in one document
    if segment_ids_BT is not None:
        seg = chunks(segment_ids_BT, mode="edge")  # [B, c, Q]
        visible = visible & (seg[:, :, :, None] == seg[:, :, None, :])
        visible = visible[:, :, None]  # [B, c, 1, Q, Q]
        entering = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)
        carries = (seg == entering[:, :, None])[:, :, None]  # [B, c, 1, Q]: no document start so far
        reaches_end = (seg == seg[:, :, -1:])[:, :, None]  # [B, c, 1, Q]: in the chunk's last document
    Gamma = jnp.exp(jnp.where(visible, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # [B, c, H, Q, Q]
    gamma = jnp.exp(cum)  # [B, c, H, Q]
    to_end = jnp.exp(cum[..., -1:] - cum)
    chunk_decay = gamma[..., -1]  # [B, c, H]
    if segment_ids_BT is not None:
        gamma = jnp.where(carries, gamma, 0.0)
        to_end = jnp.where(reaches_end, to_end, 0.0)
        chunk_decay = jnp.where(carries[..., -1], chunk_decay, 0.0)

    # The UT transform: one unit-lower-triangular solve for both right-hand sides.
    strictly_lower = jnp.tril(jnp.ones((Q, Q), bool), -1)
    A = jnp.where(strictly_lower, beta[..., :, None] * Gamma * jnp.einsum("bchtn,bchsn->bchts", k, k), 0.0)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)  # [B, c, H, Q, P + N]
    solved = jax.scipy.linalg.solve_triangular(A + jnp.eye(Q, dtype=F32), rhs, lower=True, unit_diagonal=True)
    U_tilde, W = solved[..., :P], solved[..., P:]

    def pass_state(S_BHPN, inputs):
        U_tilde_c, W_c, k_c, to_end_c, decay_c = inputs
        U_c = U_tilde_c - jnp.einsum("bhqn,bhpn->bhqp", W_c, S_BHPN)
        S_next = decay_c[..., None, None] * S_BHPN + jnp.einsum("bhqp,bhq,bhqn->bhpn", U_c, to_end_c, k_c)
        return S_next, (S_BHPN, U_c)

    S0 = jnp.zeros((B, H, P, N), F32) if state_BHPN is None else state_BHPN.astype(F32)
    time_major = [jnp.moveaxis(a, 1, 0) for a in (U_tilde, W, k, to_end, chunk_decay)]
    final, (entering_S, U) = jax.lax.scan(pass_state, S0, time_major)  # [c, B, H, ...]
    y = gamma[..., None] * jnp.einsum("bchtn,cbhpn->bchtp", q, entering_S)
    y = y + jnp.einsum("bchts,cbhsp->bchtp", Gamma * jnp.einsum("bchtn,bchsn->bchts", q, k), U)
    return jnp.moveaxis(y, 2, 3).reshape(B, n_chunks * Q, H, P)[:, :T], final


def step(state_BHPN, q_BHN, k_BHN, v_BHP, beta_BH, log_decay_BH):
    """One token -> (y [B, H, P], state): decay, then write the error of the decayed state's prediction."""
    S = jnp.exp(log_decay_BH.astype(F32))[..., None, None] * state_BHPN
    k, q = k_BHN.astype(F32), q_BHN.astype(F32)
    u = beta_BH.astype(F32)[..., None] * (v_BHP.astype(F32) - jnp.einsum("bhpn,bhn->bhp", S, k))
    S = S + u[..., None] * k[:, :, None]
    return jnp.einsum("bhpn,bhn->bhp", S, q), S


def recurrent(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, *, segment_ids_BT=None, valid_BT=None, state_BHPN=None):
    """Token by token (decoding, and the tests' oracle); resets and invalid tokens as la.recurrent."""
    _check(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH)
    B, T, H, N = q_BTHN.shape
    S0 = jnp.zeros((B, H, v_BTHP.shape[-1], N), F32) if state_BHPN is None else state_BHPN.astype(F32)
    new_doc = jnp.zeros((B, T), bool) if segment_ids_BT is None else la._new_document_BT(segment_ids_BT)
    valid = jnp.ones((B, T), bool) if valid_BT is None else valid_BT

    def body(S, inputs):
        *token, new_doc_B, valid_B = inputs
        y, S_next = step(jnp.where(new_doc_B[:, None, None, None], 0.0, S), *token)
        return jnp.where(valid_B[:, None, None, None], S_next, S), y

    time_major = [jnp.moveaxis(a, 1, 0) for a in (q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, new_doc, valid)]
    final, y_TBHP = jax.lax.scan(body, S0, time_major)
    return jnp.moveaxis(y_TBHP, 0, 1), final


def quadratic(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, *, segment_ids_BT=None):
    """The test oracle: the UT form over the whole sequence as one T x T system (zero initial state),
    solved with a general LU solve: Y = (Gamma o Q K^T) (I + A)^-1 beta V."""
    _check(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH)
    T = q_BTHN.shape[1]
    q, k, v = (jnp.moveaxis(a.astype(F32), 2, 1) for a in (q_BTHN, k_BTHN, v_BTHP))  # [B, H, T, .]
    beta = jnp.moveaxis(beta_BTH.astype(F32), 2, 1)
    visible = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if segment_ids_BT is not None:
        visible = visible & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    Gamma = jnp.exp(jnp.where(visible, la.segment_sums(jnp.moveaxis(log_decay_BTH.astype(F32), 2, 1)), -jnp.inf))
    strictly = visible & ~jnp.eye(T, dtype=bool)
    A = jnp.where(strictly, beta[..., :, None] * Gamma * jnp.einsum("bhtn,bhsn->bhts", k, k), 0.0)
    U = jnp.linalg.solve(jnp.eye(T, dtype=F32) + A, beta[..., None] * v)
    y = jnp.einsum("bhts,bhsp->bhtp", Gamma * jnp.einsum("bhtn,bhsn->bhts", q, k), U)
    return jnp.moveaxis(y, 1, 2)


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
        y, _ = chunked(*self.rule_inputs(qkv, a, b), chunk_size=self.chunk_size, segment_ids_BT=ctx.segment_ids_BT)
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
        y, delta = chunked(q, k, v, jnp.where(valid, beta, 0.0), jnp.where(valid, g, 0.0), chunk_size=self.chunk_size)
        history = history_at(pre_conv, ctx.lengths_B, self.conv_q.shape[0])
        return self._out(y, gate), la.write_state(state, i, {"delta": delta, "conv": history})

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        pre_conv, a, b, gate = self._project(x_BTD)
        own = la.read_state(state, i)
        qkv = self._convolve(pre_conv, history=own["conv"])
        y, delta = recurrent(*self.rule_inputs(qkv, a, b), valid_BT=ctx.valid_BT, state_BHPN=own["delta"])
        history = next_history(own["conv"], pre_conv, ctx.valid_BT)
        return self._out(y, gate), la.write_state(state, i, {"delta": delta, "conv": history})
