"""Chunked scalar-gated linear attention / SSD as Pallas kernels (Triton lowering on GPU, interpret mode on
CPU): the forward and a backward pass, joined by a custom_vjp. The recurrence and the chunked algorithm are
those of reference.py:

    S_t = exp(g_t) S_{t-1} + k_t v_t^T   (S: [N, P] per head, fp32)      y_t = S_t^T q_t

Layout. The wrapper moves time next to the features, head-major: q, k [B, K, T', N'], v [B, H, T', P'],
g [B, H, T'], where T' pads T to whole chunks (padded tokens: g = 0, k = v = 0, so they neither decay nor
write the state) and N', P' pad the feature sizes to powers of two (Triton's tensors must have power-of-2
shapes; zero features change nothing). Grid (B, H): one program per head runs a loop over the chunks and
carries the fp32 state [N', P'] in registers. Value head h reads q/k group h // (H / K) through the
BlockSpec's index map (Mamba2's single B/C group is not copied per head). Carrying the state inside one
program's loop (not across grid steps) keeps it race-free on a GPU, where grid steps run in parallel.

Forward, per chunk c of Q tokens (cum: the chunk-local inclusive cumulative sum of g):
    A      = (q k^T) * [s <= t, same document] exp(cum_t - cum_s)              [Q, Q]
    y      = A v + (a * q) S_c,            a_t = [no document start in the chunk up to t] exp(cum_t)
    S_c+1  = d S_c + (b * k)^T v,          b_s = [s in the chunk's last document] exp(cum_Q - cum_s),
                                           d   = [no document start in the chunk] exp(cum_Q)
Under differentiation it also writes every chunk's entering state S_c ([B, H, chunks * N', P'], fp32): the
backward's residual (inference and prefill skip it).

Backward, per head, chunks in reverse with the state cotangent dS (of S_c+1) carried in registers:
    dv = A^T dy + (b * k) dS                          dA = dy v^T,  M = dA * A
    dq = (dA * D) k + a * (dy S_c^T)                  dk = (dA * D)^T q + b * (v dS^T)
    dS_c = d dS + (a * q)^T dy
    dcum = rowsum(M) - colsum(M) + a * rowsum(dy * (q S_c)) - b * rowsum(v * (k dS))
           + [last token] (sum_s b_s rowsum(v * (k dS))_s + d sum(S_c * dS))
    dg_t = sum_{t' >= t} dcum_t'   (cum is a cumulative sum of g)
The entering-state gradient is dS_0 after the first chunk; q/k gradients of the G heads sharing a group
are summed by the wrapper.

Precision: tiles are loaded in their dtype and upcast to fp32 before every product (fp32 state, decays and
accumulation); fp32 inputs use full-precision dots (no TF32). Feeding bf16 operands to the tensor cores
is the next step for speed on a GPU; none was available to measure it (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # Triton dots need every dimension >= 16


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=1)


def _dot(a, b, ca: int, cb: int, precision):
    """a . b contracting a's axis ca with b's axis cb, fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=precision, preferred_element_type=F32)


def _chunk_terms(g_ref, seg_ref, start, enter_seg, Q: int, segments: bool):
    """The decay factors of one chunk: D [Q, Q] (masked exp(cum_t - cum_s)), a [Q], b [Q], d (scalar),
    and the chunk's last document id (the next chunk's entering document)."""
    g = g_ref[pl.ds(start, Q)].astype(F32)
    t = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    cum = jnp.sum(jnp.where(s <= t, g[None, :], 0.0), axis=1)  # inclusive cumsum as a masked row sum
    total = jnp.sum(g)  # cum at the chunk's last token
    visible = s <= t
    a_mask = b_mask = None
    last_seg = enter_seg
    if segments:
        seg = seg_ref[pl.ds(start, Q)]
        visible = visible & (seg[:, None] == seg[None, :])
        last_seg = _pick(seg, Q - 1)
        a_mask = seg == enter_seg
        b_mask = seg == last_seg
    D = jnp.exp(jnp.where(visible, cum[:, None] - cum[None, :], -jnp.inf))
    a = jnp.exp(cum)
    b = jnp.exp(total - cum)
    d = jnp.exp(total)
    if segments:
        a = jnp.where(a_mask, a, 0.0)
        b = jnp.where(b_mask, b, 0.0)
        d = jnp.where(last_seg == enter_seg, d, 0.0)  # no document started anywhere in the chunk
    return D, a, b, d, last_seg


def _pick(x, i: int):
    """x[i] of a 1-D tile as a scalar (a masked sum: Triton has no scalar indexing of tensors)."""
    return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) == i, x, 0))


def _first_seg(seg_ref, Q: int, segments: bool):
    return _pick(seg_ref[pl.ds(0, Q)], 0) if segments else jnp.int32(0)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, s0_ref, y_ref, final_ref, *states_ref, Q, n_chunks, N, segments,
                    precision):
    """states_ref: present only under differentiation (the backward's residual)."""
    def body(c, carry):
        S, enter_seg = carry
        start = pl.multiple_of(c * Q, Q)
        q = q_ref[pl.ds(start, Q), :].astype(F32)
        k = k_ref[pl.ds(start, Q), :].astype(F32)
        v = v_ref[pl.ds(start, Q), :].astype(F32)
        D, a, b, d, last_seg = _chunk_terms(g_ref, seg_ref, start, enter_seg, Q, segments)
        if states_ref:
            states_ref[0][pl.ds(pl.multiple_of(c * N, N), N), :] = S
        A = _dot(q, k, 1, 1, precision) * D
        y = _dot(A, v, 1, 0, precision) + _dot(q * a[:, None], S, 1, 0, precision)
        y_ref[pl.ds(start, Q), :] = y.astype(y_ref.dtype)
        S = d * S + _dot(k * b[:, None], v, 0, 0, precision)
        return S, last_seg

    S, _ = jax.lax.fori_loop(0, n_chunks, body, (s0_ref[...].astype(F32), _first_seg(seg_ref, Q, segments)))
    final_ref[...] = S


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, states_ref, dy_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dg_ref,
                     ds0_ref, *, Q, n_chunks, N, segments, precision):
    last = jax.lax.broadcasted_iota(jnp.int32, (Q,), 0) == Q - 1
    t = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)

    def body(i, dS):
        c = n_chunks - 1 - i
        start = pl.multiple_of(c * Q, Q)
        q = q_ref[pl.ds(start, Q), :].astype(F32)
        k = k_ref[pl.ds(start, Q), :].astype(F32)
        v = v_ref[pl.ds(start, Q), :].astype(F32)
        dy = dy_ref[pl.ds(start, Q), :].astype(F32)
        S = states_ref[pl.ds(pl.multiple_of(c * N, N), N), :]
        if segments:  # the document of the entering state: the previous chunk's last token (or token 0)
            previous = _pick(seg_ref[pl.ds(jnp.maximum(start - Q, 0), Q)], Q - 1)
            enter_seg = jnp.where(c == 0, _first_seg(seg_ref, Q, True), previous)
        else:
            enter_seg = jnp.int32(0)
        D, a, b, d, _ = _chunk_terms(g_ref, seg_ref, start, enter_seg, Q, segments)
        scores = _dot(q, k, 1, 1, precision)
        A = scores * D
        dA = _dot(dy, v, 1, 1, precision)  # [Q, Q]
        dAD = dA * D
        kb = k * b[:, None]
        qa = q * a[:, None]
        dv = _dot(A, dy, 0, 0, precision) + _dot(kb, dS, 1, 0, precision)
        dyS = _dot(dy, S, 1, 1, precision)  # [Q, N]: dy S_c^T
        vdS = _dot(v, dS, 1, 1, precision)  # [Q, N]: v dS^T
        dq = _dot(dAD, k, 1, 0, precision) + a[:, None] * dyS
        dk = _dot(dAD, q, 0, 0, precision) + b[:, None] * vdS
        M = dA * A
        da = jnp.sum(q * dyS, axis=1)  # d y / d a_t
        db = jnp.sum(k * vdS, axis=1)  # d S' / d b_s
        dd = jnp.sum(S * dS)
        dcum = jnp.sum(M, axis=1) - jnp.sum(M, axis=0) + a * da - b * db
        dcum = dcum + jnp.where(last, jnp.sum(b * db) + d * dd, 0.0)
        dg = jnp.sum(jnp.where(s >= t, dcum[None, :], 0.0), axis=1)  # reverse cumsum
        dq_ref[pl.ds(start, Q), :] = dq
        dk_ref[pl.ds(start, Q), :] = dk
        dv_ref[pl.ds(start, Q), :] = dv
        dg_ref[pl.ds(start, Q)] = dg
        return d * dS + _dot(qa, dy, 0, 0, precision)

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[...].astype(F32))


def _specs(B, K, H, G, Tp, Np, Pp, n_chunks):
    head = lambda b, h: (b, h, 0, 0)  # noqa: E731
    return dict(
        qk=pl.BlockSpec((None, None, Tp, Np), lambda b, h: (b, h // G, 0, 0)),
        v=pl.BlockSpec((None, None, Tp, Pp), head),
        vn=pl.BlockSpec((None, None, Tp, Np), head),
        g=pl.BlockSpec((None, None, Tp), lambda b, h: (b, h, 0)),
        seg=pl.BlockSpec((None, Tp), lambda b, h: (b, 0)),
        state=pl.BlockSpec((None, None, Np, Pp), head),
        states=pl.BlockSpec((None, None, n_chunks * Np, Pp), head),
    )


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def _forward(q, k, v, g, seg, s0, Q, segments, interpret, save_states: bool):
    B, K, Tp, Np = q.shape
    H, Pp = v.shape[1], v.shape[3]
    n_chunks = Tp // Q
    sp = _specs(B, K, H, H // K, Tp, Np, Pp, n_chunks)
    kernel = functools.partial(_forward_kernel, Q=Q, n_chunks=n_chunks, N=Np, segments=segments,
                               precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel, grid=(B, H),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["g"], sp["seg"], sp["state"]],
        out_specs=[sp["v"], sp["state"]] + [sp["states"]] * save_states,
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, Pp), F32), jax.ShapeDtypeStruct((B, H, Np, Pp), F32)]
                  + [jax.ShapeDtypeStruct((B, H, n_chunks * Np, Pp), F32)] * save_states,
        interpret=interpret, compiler_params=_compiler_params(interpret), name="linear_attention_fwd",
    )(q, k, v, g, seg, s0)


def _backward(q, k, v, g, seg, states, dy, dfinal, Q, segments, interpret):
    B, K, Tp, Np = q.shape
    H, Pp = v.shape[1], v.shape[3]
    n_chunks = Tp // Q
    sp = _specs(B, K, H, H // K, Tp, Np, Pp, n_chunks)
    kernel = functools.partial(_backward_kernel, Q=Q, n_chunks=n_chunks, N=Np, segments=segments,
                               precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel, grid=(B, H),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["g"], sp["seg"], sp["states"], sp["v"], sp["state"]],
        out_specs=[sp["vn"], sp["vn"], sp["v"], sp["g"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, Np), F32), jax.ShapeDtypeStruct((B, H, Tp, Np), F32),
                   jax.ShapeDtypeStruct((B, H, Tp, Pp), F32), jax.ShapeDtypeStruct((B, H, Tp), F32),
                   jax.ShapeDtypeStruct((B, H, Np, Pp), F32)],
        interpret=interpret, compiler_params=_compiler_params(interpret), name="linear_attention_bwd",
    )(q, k, v, g, seg, states, dy, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core(q, k, v, g, seg, s0, Q, segments, interpret):
    y, final = _forward(q, k, v, g, seg, s0, Q, segments, interpret, save_states=False)  # not differentiated
    return y, final


def _core_fwd(q, k, v, g, seg, s0, Q, segments, interpret):
    y, final, states = _forward(q, k, v, g, seg, s0, Q, segments, interpret, save_states=True)
    return (y, final), (q, k, v, g, seg, states)


def _core_bwd(Q, segments, interpret, residuals, cotangents):
    q, k, v, g, seg, states = residuals
    dy, dfinal = cotangents
    dq, dk, dv, dg, ds0 = _backward(q, k, v, g, seg, states, dy, dfinal, Q, segments, interpret)
    B, K, Tp, Np = q.shape
    G = v.shape[1] // K
    dq, dk = (x.reshape(B, K, G, Tp, Np).sum(2).astype(q.dtype) for x in (dq, dk))  # heads sharing a group
    return dq, dk, dv.astype(v.dtype), dg.astype(g.dtype), None, ds0


_core.defvjp(_core_fwd, _core_bwd)


def linear_attention(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, *, chunk_size: int = 64, segment_ids_BT=None,
                     state_BHPN=None, interpret: bool = False):
    """The Pallas path -> (y [B, T, H, P] fp32, final state [B, H, P, N] fp32), differentiable in q, k, v,
    the log decay and the initial state; same contract as reference.chunked. chunk_size must be a power of
    two >= 16 (Triton); any T (the last chunk is padded)."""
    B, T, K, N = q_BTKN.shape
    H, P = v_BTHP.shape[2:]
    if v_BTHP.shape[:2] != (B, T) or k_BTKN.shape != q_BTKN.shape or H % K or log_decay_BTH.shape != (B, T, H):
        raise ValueError(f"linear attention: q {q_BTKN.shape}, k {k_BTKN.shape} must be [B, T, K, N], v {v_BTHP.shape} "
                         f"[B, T, H, P] with K dividing H, log decay {log_decay_BTH.shape} [B, T, H]")
    Q = chunk_size
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"linear attention kernel: chunk_size={Q} must be a power of two >= 16")
    Tp, Np, Pp = -(-T // Q) * Q, _pow2(N), _pow2(P)
    dtype = jnp.promote_types(jnp.promote_types(q_BTKN.dtype, k_BTKN.dtype), v_BTHP.dtype)

    def head_major(x, features):  # [B, T, X, F] -> [B, X, T', F'], zero-padded
        x = jnp.moveaxis(x.astype(dtype), 2, 1)
        return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, features - x.shape[-1])))

    q, k, v = head_major(q_BTKN, Np), head_major(k_BTKN, Np), head_major(v_BTHP, Pp)
    g = jnp.pad(jnp.moveaxis(log_decay_BTH.astype(F32), 2, 1), ((0, 0), (0, 0), (0, Tp - T)))
    segments = segment_ids_BT is not None
    seg = (jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge") if segments
           else jnp.zeros((B, Tp), jnp.int32))
    s0 = jnp.zeros((B, H, P, N), F32) if state_BHPN is None else state_BHPN.astype(F32)
    s0 = jnp.pad(jnp.swapaxes(s0, 2, 3), ((0, 0), (0, 0), (0, Np - N), (0, Pp - P)))  # [B, H, N', P']
    y, final = _core(q, k, v, g, seg, s0, Q, segments, interpret)
    return jnp.moveaxis(y[:, :, :T, :P], 1, 2), jnp.swapaxes(final[:, :, :N, :P], 2, 3)
