"""Grouped matmul as Pallas kernels (Triton lowering on GPU, interpret mode on CPU): forward `gmm`, and
the backward under a custom_vjp, the lhs gradient a gmm against rhs^T and the weight gradient a
transposed grouped matmul `tgmm`. Same contract as reference.py:

    out_MF = gmm(lhs_MD, rhs_EDF, group_sizes_E)       rows sorted by group; rows past sum(sizes) -> 0
    drhs_EDF = tgmm(lhs_MD, dout_MF, group_sizes_E)    per group e: lhs[rows of e]^T @ dout[rows of e]

Schedule (computed on device from group_sizes, passed to the kernels as small int32 arrays). The rows are
cut into tiles of `tm` rows that each lie inside one group: group e's rows [start_e, end_e) give
ceil(size_e / tm) tiles starting at start_e, start_e + tm, ... The rows past the last group form one more
group, E, whose tiles write zeros (no matmul). Tiles own disjoint rows, so the forward grid
(tiles, F blocks) has no two programs writing the same output element: no race on a GPU, where grid steps
run in parallel. Their count is at most ceil(M / tm) + E (each group wastes at most one partial tile), a
static grid size; the programs past the scheduled tiles do nothing. A tile's load starts at
min(row, M - tm), so it never reads past the array (Triton masks aside, interpret mode would clamp such
a slice and shift the rows); the rows it does not own are masked out of the store.

tgmm: grid (E, D blocks, F blocks); each program loops over its group's row tiles (a loop with a bound
read from the schedule) and accumulates lhs_tile^T @ dout_tile in fp32, rows outside the group zeroed.
Empty groups write 0. Each program owns one output block, so there is no cross-program accumulation.

Blocks: rows tm (a power of two >= 16: Triton tensors are powers of two and dots need sides >= 16), the
contracted axis in blocks of bk and the output columns in blocks of bn, each the largest power of two up
to 64 / 128 dividing the width (the wrapper pads a width that is not a multiple of 16). Operands go to
the dot in their dtype (bf16 into the tensor cores) with fp32 accumulation; fp32 inputs use full
precision (no TF32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu  # Triton params: without them GPU goes to Mosaic GPU

    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _block(width: int, largest: int) -> int:
    """The largest power of two <= largest dividing width (width a multiple of 16)."""
    b = largest
    while width % b:
        b //= 2
    return b


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


def schedule(group_sizes_E: jax.Array, m: int, tm: int):
    """Per tile i (a static count of ceil(m / tm) + E): its group g_i (E: the rows past the groups, written
    as zeros), first row row_i and the end of its group end_i (row_i == end_i: an unscheduled tile); and
    per group e its rows [start_e, end_e)."""
    E = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    sizes = jnp.concatenate([sizes, jnp.maximum(m - jnp.sum(sizes), 0)[None]])  # group E: past the groups
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles = -(-sizes // tm)
    tile_ends = jnp.cumsum(tiles)
    i = jnp.arange(-(-m // tm) + E, dtype=jnp.int32)
    g_i = jnp.minimum(jnp.searchsorted(tile_ends, i, side="right"), E).astype(jnp.int32)
    row_i = starts[g_i] + (i - (tile_ends[g_i] - tiles[g_i])) * tm
    end_i = jnp.where(i < tile_ends[-1], ends[g_i], row_i)  # unscheduled tiles own no row
    return g_i, row_i, end_i, starts[:E], ends[:E]


def _gmm_kernel(g_ref, row_ref, end_ref, x_ref, w_ref, o_ref, *, tm, bk, bn, m, k, E, transpose, precision):
    """One row tile x one block of bn output columns: sum over blocks of k of x_tile @ w[g] (or w[g]^T)."""
    i, j = pl.program_id(0), pl.program_id(1)
    g, row, end = g_ref[i], row_ref[i], end_ref[i]
    start = jnp.minimum(row, m - tm)
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (tm, bn), 0)
    own = (rows >= row) & (rows < end)
    out_ref = o_ref.at[pl.ds(start, tm), pl.ds(pl.multiple_of(j * bn, bn), bn)]

    @pl.when((g < E) & (row < end))
    def _():
        def body(kb, acc):
            kk = pl.multiple_of(kb * bk, bk)
            x = x_ref[pl.ds(start, tm), pl.ds(kk, bk)]
            if transpose:  # w[g] is [N, K]: contract its last axis
                w = w_ref[g, pl.ds(pl.multiple_of(j * bn, bn), bn), pl.ds(kk, bk)]
                dims = (((1,), (1,)), ((), ()))
            else:
                w = w_ref[g, pl.ds(kk, bk), pl.ds(pl.multiple_of(j * bn, bn), bn)]
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(x, w, dims, precision=precision, preferred_element_type=F32)

        acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((tm, bn), F32))
        _masked_store(out_ref, acc.astype(o_ref.dtype), own)

    @pl.when((g == E) & (row < end))
    def _():
        _masked_store(out_ref, jnp.zeros((tm, bn), o_ref.dtype), own)


def _masked_store(ref, value, mask):
    from jax.experimental.pallas import triton as plgpu  # the masked store; also runs in interpret mode

    plgpu.store(ref, value, mask=mask)


def _tgmm_kernel(start_ref, end_ref, x_ref, d_ref, o_ref, *, tm, bd, bn, m, precision):
    """Group e, a block of bd rows of D and bn columns of F: sum over the group's row tiles of x^T @ dout."""
    e, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first, end = start_ref[e], end_ref[e]

    def body(t, acc):
        row = first + t * tm
        start = jnp.minimum(row, m - tm)
        rows = start + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        own = (rows >= row) & (rows < end)
        # both operands zeroed outside the tile's rows: 0 * (inf or NaN in another group's dout) is NaN
        x = jnp.where(own, x_ref[pl.ds(start, tm), pl.ds(pl.multiple_of(a * bd, bd), bd)], 0)
        d = jnp.where(own, d_ref[pl.ds(start, tm), pl.ds(pl.multiple_of(b * bn, bn), bn)], 0)
        return acc + jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=F32)

    acc = jax.lax.fori_loop(0, (end - first + tm - 1) // tm, body, jnp.zeros((bd, bn), F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _out_shape(shape, dtype, like):
    """A pallas_call output varying over the same shard_map axes as `like` (inside shard_map, which checks
    them, an output must say so; outside, none). The aval's field is `manual_axis_type` in jax 0.10 and
    `vma` in earlier releases: both public ShapeDtypeStruct arguments, tried in turn."""
    aval = jax.typeof(like)
    for field in ("manual_axis_type", "vma"):
        if getattr(aval, field, None) is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{field: getattr(aval, field)})
            except TypeError:
                pass
    return jax.ShapeDtypeStruct(shape, dtype)


def _pad_to(x, axis: int, multiple: int):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def _gmm_call(lhs_MK, rhs, sched, tm: int, transpose: bool, interpret: bool):
    """[M, K] x rhs [E, K, N] (or [E, N, K] when transpose) -> [M, N] in lhs's dtype; M >= tm, K and N
    multiples of 16."""
    g_i, row_i, end_i = sched[:3]
    m, k = lhs_MK.shape
    E = rhs.shape[0]
    n = rhs.shape[1] if transpose else rhs.shape[2]
    bk, bn = _block(k, 64), _block(n, 128)
    kernel = functools.partial(_gmm_kernel, tm=tm, bk=bk, bn=bn, m=m, k=k, E=E, transpose=transpose,
                               precision=_precision(lhs_MK.dtype))
    return pl.pallas_call(
        kernel, grid=(g_i.shape[0], n // bn), out_shape=_out_shape((m, n), lhs_MK.dtype, lhs_MK),
        interpret=interpret, compiler_params=_compiler_params(interpret), name="gmm_t" if transpose else "gmm",
    )(g_i, row_i, end_i, lhs_MK, rhs)


def _tgmm_call(lhs_MD, dout_MF, sched, tm: int, dtype, interpret: bool):
    starts, ends = sched[3:]
    m, d = lhs_MD.shape
    f = dout_MF.shape[1]
    E = starts.shape[0]
    bd, bn = _block(d, 64), _block(f, 128)
    kernel = functools.partial(_tgmm_kernel, tm=tm, bd=bd, bn=bn, m=m, precision=_precision(lhs_MD.dtype))
    return pl.pallas_call(
        kernel, grid=(E, d // bd, f // bn), out_shape=_out_shape((E, d, f), dtype, lhs_MD),
        out_specs=pl.BlockSpec((None, bd, bn), lambda e, a, b: (e, a, b)),
        interpret=interpret, compiler_params=_compiler_params(interpret), name="tgmm",
    )(starts, ends, lhs_MD, dout_MF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs_MD, rhs_EDF, group_sizes_E, tm: int, interpret: bool):
    return _gmm_call(lhs_MD, rhs_EDF, schedule(group_sizes_E, lhs_MD.shape[0], tm), tm, False, interpret)


def _gmm_fwd(lhs_MD, rhs_EDF, group_sizes_E, tm, interpret):
    sched = schedule(group_sizes_E, lhs_MD.shape[0], tm)
    return _gmm_call(lhs_MD, rhs_EDF, sched, tm, False, interpret), (lhs_MD, rhs_EDF, sched)


def _gmm_bwd(tm, interpret, residuals, dout_MF):
    lhs_MD, rhs_EDF, sched = residuals
    dout_MF = dout_MF.astype(lhs_MD.dtype)
    dlhs_MD = _gmm_call(dout_MF, rhs_EDF, sched, tm, True, interpret)  # rows past the groups: 0
    drhs_EDF = _tgmm_call(lhs_MD, dout_MF, sched, tm, rhs_EDF.dtype, interpret)
    return dlhs_MD, drhs_EDF, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_MD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array, *, tm: int = 128,
        interpret: bool = False) -> jax.Array:
    """The Pallas path: [M, D] x [E, D, F] -> [M, F] in the promoted input dtype (fp32 accumulation),
    differentiable in lhs and rhs. tm (rows per tile) a power of two >= 16; any M, D, F (a width that is
    not a multiple of 16 is zero-padded, an M below tm padded with rows in no group)."""
    if tm < 16 or tm & (tm - 1):
        raise ValueError(f"gmm kernel: tm={tm} must be a power of two >= 16")
    m, d = lhs_MD.shape
    f = rhs_EDF.shape[2]
    if rhs_EDF.shape[1] != d or group_sizes_E.shape != rhs_EDF.shape[:1]:
        raise ValueError(f"gmm kernel: lhs {lhs_MD.shape}, rhs {rhs_EDF.shape}, group_sizes {group_sizes_E.shape} "
                         "must be [M, D], [E, D, F], [E]")
    dtype = jnp.promote_types(lhs_MD.dtype, rhs_EDF.dtype)
    if m == 0:
        return jnp.zeros((0, f), dtype)
    lhs = jnp.pad(_pad_to(lhs_MD.astype(dtype), 1, 16), ((0, max(tm - m, 0)), (0, 0)))  # rows beyond m: no group
    rhs = _pad_to(_pad_to(rhs_EDF.astype(dtype), 1, 16), 2, 16)
    out = _gmm(lhs, rhs, group_sizes_E.astype(jnp.int32), tm, interpret)
    return out[:m, :f]
