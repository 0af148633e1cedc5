"""Chunked gated DeltaNet as Pallas kernels (Triton lowering on GPU, interpret mode on CPU): the forward
and a backward pass, joined by a custom_vjp. The recurrence and the chunked WY/UT algorithm are those of
reference.py:

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  alpha_t = exp(g_t)      y_t = S_t q_t

Layout (as kernels/linear_attention/kernel.py, whose helpers this file shares). The wrapper moves time
next to the features, head-major: q, k [B, H, T', N'], v [B, H, T', P'], beta, g [B, H, T'], where T' pads
T to whole chunks (padded tokens: g = 0, beta = 0, k = v = 0, so they neither decay nor write the state) and
N', P' pad the feature sizes to powers of two >= 16 with zeros. Inside the kernel the state is held
transposed, S = (the reference's state)^T: [N', P'], fp32. Grid (B, H, P' / BP): one program per head and
block of BP value columns runs a loop over the chunks and carries its columns of S, [N', BP], in registers
(never across grid steps: those run in parallel on a GPU). The value columns are independent in the
forward (A, T, W depend on k, beta and g only; every program recomputes them); in the backward every
gradient of q, k, beta and g is linear in the per-column terms, so each program writes its partial sum and
the wrapper adds them.

Forward, per chunk of Q tokens entered with S (cum: the chunk-local inclusive cumulative sum of g; the
masks of packed documents exactly as the linear-attention kernel: D_ts = [s <= t, same document]
exp(cum_t - cum_s), a_t = [no document start up to t] exp(cum_t), b_s = [s in the chunk's last document]
exp(cum_Q - cum_s), d = [no document start in the chunk] exp(cum_Q)):
    A  = [s < t] beta_t (k k^T)_ts D_ts                          [Q, Q], strictly lower
    T  = (I + A)^-1                                              blocked inversion, log2(Q) levels of dots
    W  = T ((beta a) * k)       U~ = T (beta * v)      U = U~ - W S        (the pseudo-values u_t)
    y  = (a * q) S + ((q k^T) * D) U
    S' = d S + (b * k)^T U
Under differentiation it also writes every chunk's entering state S ([B, H, chunks * N', P'], fp32): the
backward's residual (inference and prefill skip it).

Backward, derived from the forward above. Per head and value block, chunks in reverse, the cotangent dS'
of the state leaving the chunk carried in registers; each chunk recomputes A, T, W, U from its stored entering state.
With K = k k^T, C = (q k^T) * D, dy the output cotangent:
    dU   = (b * k) dS' + C^T dy                         (both uses of U)
    dC   = dy U^T,                 dW = -dU S^T,         dT = dU (beta * v)^T + dW ((beta a) * k)^T
    dA   = -[s < t] * (T^T dT T^T)                      (d(M^-1) = -M^-1 dM M^-1; A is strictly lower)
    dK   = dA * beta[:, None] * D
    dv   = beta * (T^T dU)
    dq   = a * (dy S^T) + (dC * D) k
    dk   = b * (U dS'^T) + (dC * D)^T q + (beta a) * (T^T dW) + (dK + dK^T) k
    dbeta = rowsum(v * T^T dU) + a * rowsum(k * T^T dW) + rowsum(dA * K * D)
    da   = rowsum(q * (dy S^T)) + beta * rowsum(k * T^T dW),        db = rowsum(k * (U dS'^T)),  dd = sum(S * dS')
    dS   = d dS' + (a * q)^T dy - W^T dU                  (the cotangent of the entering state: next carry)
    E    = D * (dC * (q k^T) + dA * beta[:, None] * K)    (everything D multiplies)
    dcum = rowsum(E) - colsum(E) + a * da - b * db + [last token] (sum_s b_s db_s + d dd)
    dg_t = sum_{t' >= t} dcum_t'                         (cum is a cumulative sum of g)
The initial state's gradient is dS after the first chunk.

Precision: tiles are loaded in their dtype and upcast to fp32 before every product (fp32 state, decays,
inverse and accumulation); fp32 inputs use full-precision dots (no TF32). The inverse doubles its block
size from 1 to Q with two dots per level (_inverse), not the product (I - A)(I + A^2)(I + A^4)...: that
series cancels catastrophically when keys are near-equal (the powers of A grow like binomial
coefficients), while each level of the blocked inversion only multiplies inverses of diagonal blocks.
Nothing here has been measured on a GPU (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effax.kernels.linear_attention.kernel import (  # the layout's helpers, shared with kernel 1
    _chunk_terms, _compiler_params, _dot, _first_seg, _pick, _pow2, _precision)

F32 = jnp.float32


def _inverse(A, Q: int, precision):
    """(I + A)^-1 of a strictly lower-triangular [Q, Q] tile by blocked inversion, doubling the block size:
    with X the inverse of the diagonal blocks of size b, the blocks of size 2b are
        [[L11, 0], [A21, L22]]^-1 = [[X11, 0], [-X22 A21 X11, X22]],   i.e.   X <- X - X A21' X
    where A21' keeps A's lower off-diagonal b x b block of each 2b x 2b diagonal block. log2(Q) levels of
    two dots on the whole tile (tensor-core work, no per-row loop); as stable as forward substitution (every
    intermediate is the inverse of a diagonal block, never a power of A)."""
    t = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    inv = jnp.where(t == s, 1.0, 0.0).astype(F32)
    b = 1
    while b < Q:  # static: log2(Q) levels
        off = ((t ^ s) < 2 * b) & ((t & b) != 0) & ((s & b) == 0)  # row in the 2nd half, column in the 1st
        inv = inv - _dot(_dot(inv, jnp.where(off, A, 0.0), 1, 0, precision), inv, 1, 0, precision)
        b *= 2
    return inv


def _chunk(q_ref, k_ref, v_ref, beta_ref, g_ref, seg_ref, start, enter_seg, S, Q, segments, precision):
    """One chunk's forward terms from its entering state S (module docstring)."""
    q = q_ref[pl.ds(start, Q), :].astype(F32)
    k = k_ref[pl.ds(start, Q), :].astype(F32)
    v = v_ref[pl.ds(start, Q), :].astype(F32)
    beta = beta_ref[pl.ds(start, Q)].astype(F32)
    D, a, b, d, last_seg = _chunk_terms(g_ref, seg_ref, start, enter_seg, Q, segments)
    t = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    KK = _dot(k, k, 1, 1, precision)
    A = jnp.where(s < t, beta[:, None] * KK * D, 0.0)
    inv = _inverse(A, Q, precision)
    kba = k * (beta * a)[:, None]
    W = _dot(inv, kba, 1, 0, precision)
    vb = v * beta[:, None]
    U = _dot(inv, vb, 1, 0, precision) - _dot(W, S, 1, 0, precision)
    QK = _dot(q, k, 1, 1, precision)
    return dict(q=q, k=k, v=v, beta=beta, D=D, a=a, b=b, d=d, last_seg=last_seg, KK=KK, A=A, inv=inv, kba=kba, W=W,
                vb=vb, U=U, QK=QK, strict=s < t, reverse=s >= t)


def _forward_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, seg_ref, s0_ref, y_ref, final_ref, *states_ref, Q, n_chunks,
                    N, segments, precision):
    """states_ref: present only under differentiation (the backward's residual)."""
    def body(c, carry):
        S, enter_seg = carry
        start = pl.multiple_of(c * Q, Q)
        if states_ref:
            states_ref[0][pl.ds(pl.multiple_of(c * N, N), N), :] = S
        x = _chunk(q_ref, k_ref, v_ref, beta_ref, g_ref, seg_ref, start, enter_seg, S, Q, segments, precision)
        y = _dot(x["q"] * x["a"][:, None], S, 1, 0, precision) + _dot(x["QK"] * x["D"], x["U"], 1, 0, precision)
        y_ref[pl.ds(start, Q), :] = y.astype(y_ref.dtype)
        S = x["d"] * S + _dot(x["k"] * x["b"][:, None], x["U"], 0, 0, precision)
        return S, x["last_seg"]

    S, _ = jax.lax.fori_loop(0, n_chunks, body, (s0_ref[...].astype(F32), _first_seg(seg_ref, Q, segments)))
    final_ref[...] = S


def _backward_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, seg_ref, states_ref, dy_ref, dfinal_ref, dq_ref, dk_ref,
                     dv_ref, dbeta_ref, dg_ref, ds0_ref, *, Q, n_chunks, N, segments, precision):
    last = jax.lax.broadcasted_iota(jnp.int32, (Q,), 0) == Q - 1

    def body(i, dSn):
        c = n_chunks - 1 - i
        start = pl.multiple_of(c * Q, Q)
        S = states_ref[pl.ds(pl.multiple_of(c * N, N), N), :]
        if segments:  # the document of the entering state: the previous chunk's last token (or token 0)
            previous = _pick(seg_ref[pl.ds(jnp.maximum(start - Q, 0), Q)], Q - 1)
            enter_seg = jnp.where(c == 0, _first_seg(seg_ref, Q, True), previous)
        else:
            enter_seg = jnp.int32(0)
        x = _chunk(q_ref, k_ref, v_ref, beta_ref, g_ref, seg_ref, start, enter_seg, S, Q, segments, precision)
        q, k, v, beta, D, a, b, d, inv, U = (x[n] for n in ("q", "k", "v", "beta", "D", "a", "b", "d", "inv", "U"))
        dy = dy_ref[pl.ds(start, Q), :].astype(F32)
        C = x["QK"] * D
        dU = _dot(k * b[:, None], dSn, 1, 0, precision) + _dot(C, dy, 0, 0, precision)
        dC = _dot(dy, U, 1, 1, precision) * D  # [Q, Q], already through the product with D
        dW = -_dot(dU, S, 1, 1, precision)  # [Q, N]
        dT = _dot(dU, x["vb"], 1, 1, precision) + _dot(dW, x["kba"], 1, 1, precision)
        TdU = _dot(inv, dU, 0, 0, precision)  # T^T dU [Q, P]
        TdW = _dot(inv, dW, 0, 0, precision)  # T^T dW [Q, N]
        dA = jnp.where(x["strict"], -_dot(_dot(inv, dT, 0, 0, precision), inv, 1, 1, precision), 0.0)
        dAD = dA * D
        dK = dAD * beta[:, None]
        dyS = _dot(dy, S, 1, 1, precision)  # dy S^T [Q, N]
        UdS = _dot(U, dSn, 1, 1, precision)  # U dS'^T [Q, N]
        dq = a[:, None] * dyS + _dot(dC, k, 1, 0, precision)
        dk = (b[:, None] * UdS + _dot(dC, q, 0, 0, precision) + (beta * a)[:, None] * TdW
              + _dot(dK, k, 1, 0, precision) + _dot(dK, k, 0, 0, precision))
        kTdW = jnp.sum(k * TdW, axis=1)
        dbeta = jnp.sum(v * TdU, axis=1) + a * kTdW + jnp.sum(dAD * x["KK"], axis=1)
        da = jnp.sum(q * dyS, axis=1) + beta * kTdW
        db = jnp.sum(k * UdS, axis=1)
        dd = jnp.sum(S * dSn)
        E = dC * x["QK"] + dK * x["KK"]
        dcum = jnp.sum(E, axis=1) - jnp.sum(E, axis=0) + a * da - b * db
        dcum = dcum + jnp.where(last, jnp.sum(b * db) + d * dd, 0.0)
        dg = jnp.sum(jnp.where(x["reverse"], dcum[None, :], 0.0), axis=1)  # reverse cumsum
        dq_ref[pl.ds(start, Q), :] = dq
        dk_ref[pl.ds(start, Q), :] = dk
        dv_ref[pl.ds(start, Q), :] = beta[:, None] * TdU
        dbeta_ref[pl.ds(start, Q)] = dbeta
        dg_ref[pl.ds(start, Q)] = dg
        return d * dSn + _dot(q * a[:, None], dy, 0, 0, precision) - _dot(x["W"], dU, 0, 0, precision)

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[...].astype(F32))


def _specs(Tp, Np, BP, n_chunks):
    """Grid (b, h, p): program p owns value columns [p BP, (p + 1) BP) of its head."""
    return dict(
        qk=pl.BlockSpec((None, None, Tp, Np), lambda b, h, p: (b, h, 0, 0)),
        v=pl.BlockSpec((None, None, Tp, BP), lambda b, h, p: (b, h, 0, p)),
        vec=pl.BlockSpec((None, None, Tp), lambda b, h, p: (b, h, 0)),
        seg=pl.BlockSpec((None, Tp), lambda b, h, p: (b, 0)),
        state=pl.BlockSpec((None, None, Np, BP), lambda b, h, p: (b, h, 0, p)),
        states=pl.BlockSpec((None, None, n_chunks * Np, BP), lambda b, h, p: (b, h, 0, p)),
        qk_part=pl.BlockSpec((None, None, None, Tp, Np), lambda b, h, p: (b, h, p, 0, 0)),
        vec_part=pl.BlockSpec((None, None, None, Tp), lambda b, h, p: (b, h, p, 0)),
    )


def _forward(q, k, v, beta, g, seg, s0, Q, BP, segments, interpret, save_states: bool):
    B, H, Tp, Np = q.shape
    Pp = v.shape[3]
    n_chunks = Tp // Q
    sp = _specs(Tp, Np, BP, n_chunks)
    kernel = functools.partial(_forward_kernel, Q=Q, n_chunks=n_chunks, N=Np, segments=segments,
                               precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel, grid=(B, H, Pp // BP),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["vec"], sp["vec"], sp["seg"], sp["state"]],
        out_specs=[sp["v"], sp["state"]] + [sp["states"]] * save_states,
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, Pp), F32), jax.ShapeDtypeStruct((B, H, Np, Pp), F32)]
                  + [jax.ShapeDtypeStruct((B, H, n_chunks * Np, Pp), F32)] * save_states,
        interpret=interpret, compiler_params=_compiler_params(interpret), name="delta_rule_fwd",
    )(q, k, v, beta, g, seg, s0)


def _backward(q, k, v, beta, g, seg, states, dy, dfinal, Q, BP, segments, interpret):
    """-> dq, dk [B, H, P'/BP, T', N'], dv, dbeta, dg [B, H, P'/BP, T'], ds0: the gradients of q, k, beta, g
    as one partial sum per value block (summed by the caller)."""
    B, H, Tp, Np = q.shape
    Pp = v.shape[3]
    n_chunks, n_blocks = Tp // Q, Pp // BP
    sp = _specs(Tp, Np, BP, n_chunks)
    kernel = functools.partial(_backward_kernel, Q=Q, n_chunks=n_chunks, N=Np, segments=segments,
                               precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel, grid=(B, H, n_blocks),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["vec"], sp["vec"], sp["seg"], sp["states"], sp["v"], sp["state"]],
        out_specs=[sp["qk_part"], sp["qk_part"], sp["v"], sp["vec_part"], sp["vec_part"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct(shape, F32) for shape in [(B, H, n_blocks, Tp, Np)] * 2 + [(B, H, Tp, Pp)]
                   + [(B, H, n_blocks, Tp)] * 2 + [(B, H, Np, Pp)]],
        interpret=interpret, compiler_params=_compiler_params(interpret), name="delta_rule_bwd",
    )(q, k, v, beta, g, seg, states, dy, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(q, k, v, beta, g, seg, s0, Q, BP, segments, interpret):
    y, final = _forward(q, k, v, beta, g, seg, s0, Q, BP, segments, interpret, save_states=False)  # undifferentiated
    return y, final


def _core_fwd(q, k, v, beta, g, seg, s0, Q, BP, segments, interpret):
    y, final, states = _forward(q, k, v, beta, g, seg, s0, Q, BP, segments, interpret, save_states=True)
    return (y, final), (q, k, v, beta, g, seg, states)


def _core_bwd(Q, BP, segments, interpret, residuals, cotangents):
    q, k, v, beta, g, seg, states = residuals
    dy, dfinal = cotangents
    dq, dk, dv, dbeta, dg, ds0 = _backward(q, k, v, beta, g, seg, states, dy, dfinal, Q, BP, segments, interpret)
    dq, dk, dbeta, dg = (x.sum(2) for x in (dq, dk, dbeta, dg))  # the value blocks' partial sums
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbeta.astype(beta.dtype), dg.astype(g.dtype),
            None, ds0)


_core.defvjp(_core_fwd, _core_bwd)


def delta_rule(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, *, chunk_size: int = 64, segment_ids_BT=None,
               state_BHPN=None, block_p: int = 64, interpret: bool = False):
    """The Pallas path -> (y [B, T, H, P] fp32, final state [B, H, P, N] fp32), differentiable in q, k, v,
    beta, the log decay and the initial state; same contract as reference.chunked. chunk_size must be a
    power of two >= 16 (Triton); any T (the last chunk is padded). block_p (a power of two >= 16): the value
    columns one program owns (grid (B, H, P' / block_p); each program recomputes the chunk's A, T and W)."""
    B, T, H, N = q_BTHN.shape
    P = v_BTHP.shape[3]
    if k_BTHN.shape != q_BTHN.shape or v_BTHP.shape[:3] != (B, T, H) or beta_BTH.shape != (B, T, H) \
            or log_decay_BTH.shape != (B, T, H):
        raise ValueError(f"delta rule: q {q_BTHN.shape}, k {k_BTHN.shape} must be [B, T, H, N], v {v_BTHP.shape} "
                         f"[B, T, H, P], beta {beta_BTH.shape} and log decay {log_decay_BTH.shape} [B, T, H]")
    Q = chunk_size
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"delta rule kernel: chunk_size={Q} must be a power of two >= 16")
    if block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"delta rule kernel: block_p={block_p} must be a power of two >= 16")
    Tp, Np, Pp = -(-T // Q) * Q, _pow2(N), _pow2(P)
    BP = min(block_p, Pp)
    dtype = jnp.promote_types(jnp.promote_types(q_BTHN.dtype, k_BTHN.dtype), v_BTHP.dtype)

    def head_major(x, features):  # [B, T, H, F] -> [B, H, T', F'], zero-padded
        x = jnp.moveaxis(x.astype(dtype), 2, 1)
        return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, features - x.shape[-1])))

    def per_token(x):  # [B, T, H] -> [B, H, T'] fp32, zero-padded (padded tokens: beta = g = 0)
        return jnp.pad(jnp.moveaxis(x.astype(F32), 2, 1), ((0, 0), (0, 0), (0, Tp - T)))

    q, k, v = head_major(q_BTHN, Np), head_major(k_BTHN, Np), head_major(v_BTHP, Pp)
    segments = segment_ids_BT is not None
    seg = (jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge") if segments
           else jnp.zeros((B, Tp), jnp.int32))
    s0 = jnp.zeros((B, H, P, N), F32) if state_BHPN is None else state_BHPN.astype(F32)
    s0 = jnp.pad(jnp.swapaxes(s0, 2, 3), ((0, 0), (0, 0), (0, Np - N), (0, Pp - P)))  # [B, H, N', P']
    y, final = _core(q, k, v, per_token(beta_BTH), per_token(log_decay_BTH), seg, s0, Q, BP, segments, interpret)
    return jnp.moveaxis(y[:, :, :T, :P], 1, 2), jnp.swapaxes(final[:, :, :N, :P], 2, 3)
