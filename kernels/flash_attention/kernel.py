"""Block-sparse flash attention as Pallas kernels (Triton lowering on GPU, interpret mode on CPU): a forward
pass that saves the log-sum-exp and a FlashAttention-2 backward (Dao 2023) that recomputes the
probabilities block by block, joined by a custom_vjp.

Layout. The wrapper puts heads before time: q [B, H, T', P'], k, v [B, K, T', P'], where T' pads T to whole
blocks and P' pads the head dim to a power of two >= 16 with zeros (Triton tensors need power-of-2 shapes,
its dots sides >= 16). Query head h reads kv head h // G (G = H / K) through the BlockSpec's index map: GQA
never copies k or v per head.

Which blocks run. Two lists drive the loops, both int32 and padded: for every query block the key blocks
it visits (`kblocks [R, n_q, M]`, `kcount [R, n_q, 2]`), and transposed, for every key block the query
blocks that visit it (`qblocks [R, n_k, N]`, `qcount`); R is 1 (one schedule for every batch row) or B.
A program loops over its list only, so a block outside it costs nothing (not computed then masked). Inside
a visited block the element rule decides:

    visible(q_off, k_off) & [same document] & [both indices < T]

except in the blocks where it holds everywhere (known in numpy for rows of one document): each list puts
those first and its count is (full blocks, all blocks), so the rule's arithmetic runs only where it can
mask something (a `lax.cond`, uniform across a program).

where `visible` is a jnp callable on broadcast int32 offsets (positions within each token's document;
token indices when rows are not packed). It runs inside the kernel, traced once.

Forward, grid (B, H, n_q): an online softmax over the listed key blocks (running max m, sum l, fp32
accumulator); o = acc / l and lse = m + log l. A row that sees no key writes o = 0, lse = +inf (so every
recomputed probability of it is exactly 0).

Backward, with delta = rowsum(do * o) computed outside:
    dq kernel,    grid (B, H, n_q): over the listed key blocks,   p = exp(s - lse), dp = do v^T,
                  ds = p * (dp - delta), dq += ds k
    dk/dv kernel, grid (B, H, n_k): over the listed query blocks, dv += p^T do, dk += ds^T q
Each query head writes its own dk, dv; the wrapper sums the G heads of a kv head. No program carries
state across grid steps (in interpret mode the grid runs sequentially, so a cross-step carry would pass on
CPU and race on a GPU). s = q k^T * scale in fp32.

Precision: products accumulate in fp32; fp32 inputs use full-precision dots (no TF32); bf16 inputs enter
the dots as bf16 (p and ds are cast to the input dtype for the second product of each pair, as
FlashAttention does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything static about one call (hashable: a custom_vjp nondiff argument)."""

    T: int
    G: int  # query heads per kv head
    block_q: int
    block_k: int
    scale: float
    visible: Callable | None  # (q_off, k_off) -> bool, broadcasting; None: every key
    packed: bool  # offsets and segment ids come from arrays (else token indices, one document)
    full_blocks: bool  # some listed blocks are fully visible (they skip the element rule)
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2


def _compiler_params(cfg: Config):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # Triton params: without them a GPU call goes to Mosaic GPU

    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def _dot(a, b, ca: int, cb: int, precision):
    """a . b contracting a's axis ca with b's axis cb, fp32 accumulation."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=precision, preferred_element_type=F32)


def _seen(cfg: Config, qi, ki, q_off, k_off, q_seg, k_seg):
    """bool [bq, bk]: the element rule on one block. qi, ki: token indices; the rest None unless packed."""
    ok = (qi[:, None] < cfg.T) & (ki[None, :] < cfg.T)
    if cfg.packed:
        ok = ok & (q_seg[:, None] == k_seg[None, :])
    else:
        q_off, k_off = qi, ki
    if cfg.visible is not None:
        ok = ok & cfg.visible(q_off[:, None], k_off[None, :])
    return ok


def _masked(cfg: Config, full, x, seen_fn, fill):
    """x where the element rule holds, else `fill`; a fully visible block (`full`) skips the rule."""
    if not cfg.full_blocks:
        return jnp.where(seen_fn(), x, fill)
    return jax.lax.cond(full, lambda x: x, lambda x: jnp.where(seen_fn(), x, fill), x)


def _iota(n, start):
    return start + jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _tokens(cfg: Config, refs):
    """(q_off, k_off, q_seg, k_seg refs, the remaining refs): the token refs are passed only for packed rows
    (rows of one document use token indices)."""
    return (refs[:4], refs[4:]) if cfg.packed else ((None,) * 4, refs)


def _forward_kernel(kblocks_ref, kcount_ref, q_ref, k_ref, v_ref, *refs, cfg: Config):
    (qoff_ref, koff_ref, qseg_ref, kseg_ref), (o_ref, lse_ref) = _tokens(cfg, refs)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q = q_ref[...]
    precision = _precision(q.dtype)
    qi = _iota(bq, i * bq)
    q_off, q_seg = (qoff_ref[...], qseg_ref[...]) if cfg.packed else (None, None)
    n_full = kcount_ref[0]  # the list's first n_full blocks are fully visible

    def body(n, carry):
        m, l, acc = carry
        start = pl.multiple_of(kblocks_ref[n] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        k_off, k_seg = (koff_ref[pl.ds(start, bk)], kseg_ref[pl.ds(start, bk)]) if cfg.packed else (None, None)
        seen = lambda: _seen(cfg, qi, _iota(bk, start), q_off, k_off, q_seg, k_seg)  # noqa: E731
        s = _masked(cfg, n < n_full, _dot(q, k, 1, 1, precision) * cfg.scale, seen, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp() finite
        p = jnp.exp(s - m_safe[:, None])
        rescale = jnp.exp(m - m_safe)
        l = rescale * l + jnp.sum(p, axis=1)
        acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0, precision)
        return m_new, l, acc

    init = (jnp.full((bq,), -jnp.inf, F32), jnp.zeros((bq,), F32), jnp.zeros(o_ref.shape, F32))
    m, l, acc = jax.lax.fori_loop(0, kcount_ref[1], body, init)
    seen_any = l > 0
    l_safe = jnp.where(seen_any, l, 1.0)
    o_ref[...] = jnp.where(seen_any[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen_any, m + jnp.log(l_safe), jnp.inf)


def _dq_kernel(kblocks_ref, kcount_ref, q_ref, k_ref, v_ref, *refs, cfg: Config):
    (qoff_ref, koff_ref, qseg_ref, kseg_ref), (do_ref, lse_ref, delta_ref, dq_ref) = _tokens(cfg, refs)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    precision = _precision(q.dtype)
    lse, delta = lse_ref[...], delta_ref[...]
    qi = _iota(bq, i * bq)
    q_off, q_seg = (qoff_ref[...], qseg_ref[...]) if cfg.packed else (None, None)
    n_full = kcount_ref[0]

    def body(n, dq):
        start = pl.multiple_of(kblocks_ref[n] * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        k_off, k_seg = (koff_ref[pl.ds(start, bk)], kseg_ref[pl.ds(start, bk)]) if cfg.packed else (None, None)
        seen = lambda: _seen(cfg, qi, _iota(bk, start), q_off, k_off, q_seg, k_seg)  # noqa: E731
        p = _masked(cfg, n < n_full, jnp.exp(_dot(q, k, 1, 1, precision) * cfg.scale - lse[:, None]), seen, 0.0)
        ds = p * (_dot(do, v, 1, 1, precision) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, precision)

    dq = jax.lax.fori_loop(0, kcount_ref[1], body, jnp.zeros(dq_ref.shape, F32))
    dq_ref[...] = dq * cfg.scale


def _dkdv_kernel(qblocks_ref, qcount_ref, q_ref, k_ref, v_ref, *refs, cfg: Config):
    (qoff_ref, koff_ref, qseg_ref, kseg_ref), (do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = _tokens(cfg, refs)
    bq, bk = cfg.block_q, cfg.block_k
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    precision = _precision(k.dtype)
    ki = _iota(bk, j * bk)
    k_off, k_seg = (koff_ref[...], kseg_ref[...]) if cfg.packed else (None, None)
    n_full = qcount_ref[0]

    def body(n, carry):
        dk, dv = carry
        start = pl.multiple_of(qblocks_ref[n] * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(start, bq)]
        delta = delta_ref[pl.ds(start, bq)]
        q_off, q_seg = (qoff_ref[pl.ds(start, bq)], qseg_ref[pl.ds(start, bq)]) if cfg.packed else (None, None)
        seen = lambda: _seen(cfg, _iota(bq, start), ki, q_off, k_off, q_seg, k_seg)  # noqa: E731
        p = _masked(cfg, n < n_full, jnp.exp(_dot(q, k, 1, 1, precision) * cfg.scale - lse[:, None]), seen, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0, precision)
        ds = p * (_dot(do, v, 1, 1, precision) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, precision)
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, F32)
    dk, dv = jax.lax.fori_loop(0, qcount_ref[1], body, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _specs(cfg: Config, B: int, Tp: int, Pp: int, rows: int, M: int, blocks_axis: str):
    """BlockSpecs on the grid (b, h, i), i a query block (blocks_axis 'q') or a key block ('k')."""
    bq, bk, G = cfg.block_q, cfg.block_k, cfg.G
    row = (lambda b: b) if rows > 1 else (lambda b: 0)
    q_at = (lambda i: i) if blocks_axis == "q" else (lambda i: 0)
    k_at = (lambda i: i) if blocks_axis == "k" else (lambda i: 0)
    qT = bq if blocks_axis == "q" else Tp  # the programs' own blocks; the other side is read whole
    kT = bk if blocks_axis == "k" else Tp
    q_tok = pl.BlockSpec((None, qT), lambda b, h, i: (b, q_at(i)))
    k_tok = pl.BlockSpec((None, kT), lambda b, h, i: (b, k_at(i)))
    return dict(
        tokens=[q_tok, k_tok, q_tok, k_tok] if cfg.packed else [],
        lists=pl.BlockSpec((None, None, M), lambda b, h, i: (row(b), i, 0)),
        count=pl.BlockSpec((None, None, 2), lambda b, h, i: (row(b), i, 0)),
        q=pl.BlockSpec((None, None, qT, Pp), lambda b, h, i: (b, h, q_at(i), 0)),
        kv=pl.BlockSpec((None, None, kT, Pp), lambda b, h, i: (b, h // G, k_at(i), 0)),
        kv_head=pl.BlockSpec((None, None, kT, Pp), lambda b, h, i: (b, h, k_at(i), 0)),  # per query head (dk, dv)
        q_row=pl.BlockSpec((None, None, qT), lambda b, h, i: (b, h, q_at(i))),
    )


def _token_args(cfg: Config, off, seg):
    return (off, off, seg, seg) if cfg.packed else ()


def _forward(cfg: Config, q, k, v, off, seg, kblocks, kcount):
    B, H, Tp, Pp = q.shape
    sp = _specs(cfg, B, Tp, Pp, kblocks.shape[0], kblocks.shape[2], "q")
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg), grid=(B, H, Tp // cfg.block_q),
        in_specs=[sp["lists"], sp["count"], sp["q"], sp["kv"], sp["kv"], *sp["tokens"]],
        out_specs=[sp["q"], sp["q_row"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp), F32)],
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name="flash_attention_fwd",
    )(kblocks, kcount, q, k, v, *_token_args(cfg, off, seg))


def _backward(cfg: Config, q, k, v, off, seg, lists, o, lse, do):
    kblocks, kcount, qblocks, qcount = lists
    B, H, Tp, Pp = q.shape
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)  # [B, H, T']
    sp = _specs(cfg, B, Tp, Pp, kblocks.shape[0], kblocks.shape[2], "q")
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), grid=(B, H, Tp // cfg.block_q),
        in_specs=[sp["lists"], sp["count"], sp["q"], sp["kv"], sp["kv"], *sp["tokens"],
                  sp["q"], sp["q_row"], sp["q_row"]],
        out_specs=sp["q"], out_shape=jax.ShapeDtypeStruct(q.shape, F32),
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name="flash_attention_dq",
    )(kblocks, kcount, q, k, v, *_token_args(cfg, off, seg), do, lse, delta)
    sp = _specs(cfg, B, Tp, Pp, qblocks.shape[0], qblocks.shape[2], "k")
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg), grid=(B, H, Tp // cfg.block_k),
        in_specs=[sp["lists"], sp["count"], sp["q"], sp["kv"], sp["kv"], *sp["tokens"],
                  sp["q"], sp["q_row"], sp["q_row"]],
        out_specs=[sp["kv_head"], sp["kv_head"]], out_shape=[jax.ShapeDtypeStruct(q.shape, F32)] * 2,
        interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name="flash_attention_dkdv",
    )(qblocks, qcount, q, k, v, *_token_args(cfg, off, seg), do, lse, delta)
    K = k.shape[1]
    dk, dv = (x.reshape(B, K, cfg.G, Tp, Pp).sum(2) for x in (dk, dv))  # the G query heads of each kv head
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, off, seg, lists):
    return _forward(cfg, q, k, v, off, seg, *lists[:2])[0]


def _core_fwd(cfg, q, k, v, off, seg, lists):
    o, lse = _forward(cfg, q, k, v, off, seg, *lists[:2])
    return o, (q, k, v, off, seg, lists, o, lse)


def _core_bwd(cfg, residuals, do):
    q, k, v, off, seg, lists, o, lse = residuals
    dq, dk, dv = _backward(cfg, q, k, v, off, seg, lists, o, lse, do.astype(q.dtype))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # Triton: power-of-2 shapes, dot sides >= 16


def flash_attention(q_BTHP, k_BTKP, v_BTKP, *, lists, scale: float, block_q: int, block_k: int, visible=None,
                    offsets_BT=None, segment_ids_BT=None, interpret: bool = False):
    """The Pallas path -> out [B, T, H, P] in q's dtype, differentiable in q, k, v. `lists`: (kblocks,
    kcount, qblocks, qcount) as in the module docstring (ops.py builds them from a block table)."""
    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"flash attention kernel: {name}={b} must be a power of two >= 16")
    Tp = -(-T // max(block_q, block_k)) * max(block_q, block_k)
    Pp = pow2(P)
    packed = segment_ids_BT is not None
    full_blocks = bool(np.any(np.asarray(lists[1])[..., 0])) if isinstance(lists[1], np.ndarray) else False
    cfg = Config(T, H // K, block_q, block_k, float(scale), visible, packed, full_blocks, interpret)

    def head_major(x):  # [B, T, X, P] -> [B, X, T', P'], zero-padded
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, Tp - T), (0, Pp - P)))

    q, k, v = head_major(q_BTHP), head_major(k_BTKP.astype(q_BTHP.dtype)), head_major(v_BTKP.astype(q_BTHP.dtype))
    if packed:
        tok = lambda x: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, Tp - T)))  # noqa: E731  padding: masked by index
        off, seg = tok(offsets_BT), tok(segment_ids_BT)
    else:
        off = seg = None  # the kernels use token indices
    o = _core(cfg, q, k, v, off, seg, tuple(lists))
    return jnp.swapaxes(o[:, :, :T, :P], 1, 2)
