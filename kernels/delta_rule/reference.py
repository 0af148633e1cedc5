"""The plain-JAX oracle of the gated DeltaNet kernel (kernels/delta_rule/kernel.py), and the XLA path of
ops.py; layers/delta_rule.py re-exports these functions. Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025):
the delta rule with a scalar gate per head and token, in three equivalent forms (chunked WY/UT for
training and prefill, the recurrent step for decoding, a quadratic reference for tests).

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        S_t: [P, N] per head
    y_t = S_t q_t

alpha_t = exp(g_t) in (0, 1], beta_t in (0, 1); the layer feeds q, k L2-normalised (q also scaled by
1/sqrt(N)): the normalisation stays outside. Shapes: q, k [B, T, H, N], v [B, T, H, P], beta, g [B, T, H].
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
Packed documents reset the state exactly as in kernels/linear_attention/reference.py (pairs within one
document, the entering state only until the first document start, the final state from the last document
only). Everything here runs in fp32 (inputs are upcast).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effax.kernels.linear_attention.reference import _new_document_BT, segment_sums

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST  # fp32 products on every backend (no TF32 / bf16 passes)


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

    # The UT transform: (I + A)^-1 applied to both right-hand sides.
    strictly_lower = jnp.tril(jnp.ones((Q, Q), bool), -1)
    A = jnp.where(strictly_lower, beta[..., :, None] * Gamma * jnp.einsum("bchtn,bchsn->bchts", k, k), 0.0)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)  # [B, c, H, Q, P + N]
    solved = jnp.einsum("...ts,...sx->...tx", unit_lower_inverse(A), rhs, precision=HIGHEST)
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


def unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower-triangular A [..., Q, Q], by blocked inversion (the kernel's scheme): with X
    the inverse of the diagonal blocks of size b, the blocks of size 2b are [[X11, 0], [-X22 A21 X11, X22]],
    i.e. X <- X - X A21' X with A21' the lower off-diagonal b x b block of each 2b x 2b diagonal block;
    ceil(log2 Q) levels of two batched matmuls. Not `jax.scipy.linalg.solve_triangular`: on XLA's CPU backend
    (jax 0.10.2) the gradient of a batched triangular solve deadlocked within a few calls (every thread waiting;
    reproduced outside effax), which hung GDN's training step."""
    Q = A.shape[-1]
    t, s = jnp.arange(Q)[:, None], jnp.arange(Q)[None, :]
    inv = jnp.broadcast_to(jnp.eye(Q, dtype=A.dtype), A.shape)
    b = 1
    while b < Q:  # static
        off = ((t ^ s) < 2 * b) & ((t & b) != 0) & ((s & b) == 0)  # row in a block's 2nd half, column in its 1st
        inv = inv - jnp.einsum("...tu,...uv,...vs->...ts", inv, jnp.where(off, A, 0.0), inv, precision=HIGHEST)
        b *= 2
    return inv


def step(state_BHPN, q_BHN, k_BHN, v_BHP, beta_BH, log_decay_BH):
    """One token -> (y [B, H, P], state): decay, then write the error of the decayed state's prediction."""
    S = jnp.exp(log_decay_BH.astype(F32))[..., None, None] * state_BHPN
    k, q = k_BHN.astype(F32), q_BHN.astype(F32)
    u = beta_BH.astype(F32)[..., None] * (v_BHP.astype(F32) - jnp.einsum("bhpn,bhn->bhp", S, k))
    S = S + u[..., None] * k[:, :, None]
    return jnp.einsum("bhpn,bhn->bhp", S, q), S


def recurrent(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, *, segment_ids_BT=None, valid_BT=None, state_BHPN=None):
    """Token by token (decoding, and the tests' oracle); resets and invalid tokens as the linear-attention recurrent."""
    _check(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH)
    B, T, H, N = q_BTHN.shape
    S0 = jnp.zeros((B, H, v_BTHP.shape[-1], N), F32) if state_BHPN is None else state_BHPN.astype(F32)
    new_doc = jnp.zeros((B, T), bool) if segment_ids_BT is None else _new_document_BT(segment_ids_BT)
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
    Gamma = jnp.exp(jnp.where(visible, segment_sums(jnp.moveaxis(log_decay_BTH.astype(F32), 2, 1)), -jnp.inf))
    strictly = visible & ~jnp.eye(T, dtype=bool)
    A = jnp.where(strictly, beta[..., :, None] * Gamma * jnp.einsum("bhtn,bhsn->bhts", k, k), 0.0)
    U = jnp.linalg.solve(jnp.eye(T, dtype=F32) + A, beta[..., None] * v)
    y = jnp.einsum("bhts,bhsp->bhtp", Gamma * jnp.einsum("bhtn,bhsn->bhts", q, k), U)
    return jnp.moveaxis(y, 1, 2)
