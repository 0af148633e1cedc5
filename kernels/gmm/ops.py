"""Grouped matmul: the one op the dropless MoE dispatch calls (layers/moe_dispatch.py).

    out_MF = gmm(lhs_MD, rhs_EDF, group_sizes_E, impl="auto")      M rows, E groups (experts), D -> F

Rows are sorted by group: rows [sum(sizes[:e]), sum(sizes[:e+1])) of lhs are multiplied by rhs[e]; rows
past sum(sizes) (padding, or tokens routed to no expert) come out 0. Differentiable in lhs and rhs.

impl (dispatch):
  auto       megablox on TPU, xla elsewhere: the Pallas GPU kernel stays opt-in (impl="pallas") until it
             has been measured on a GPU (docs/kernels.md)
  pallas     kernels/gmm/kernel.py: Pallas gmm / tgmm kernels (Triton lowering) over a tile schedule computed
             on device, own VJP; off a GPU it runs in interpret mode (slow: tests only)
  megablox   jax.experimental.pallas.ops.tpu.megablox's gmm / tgmm kernels under a VJP of ours (the one megablox's
             custom_vjp computes) that lets them run inside shard_map (see _megablox_gmm); on CPU only in
             interpret mode (tests)
  xla        a loop over row tiles of `tile` rows, each inside one group: only the scheduled tiles run
             (sum over groups of ceil(size / tile)), so a buffer padded for the worst case (expert
             parallelism) costs no compute, and neither do rows past the groups. Own VJP: the lhs
             gradient is the same loop against rhs^T, the rhs gradient a loop that accumulates
             lhs_tile^T @ dout_tile into its group.
  reference  jax.lax.ragged_dot (kernels/gmm/reference.py): exact but dense over every group

On the 2-core development CPU (M=8192 rows, D=256, F=352, 8 groups; noisy shared machine) the tile loop
ran within 0.5-1.8x the time of one dense [8192,256]x[256,352] matmul of the same FLOPs, forward and
backward, while ragged_dot took 5-10x as long (and a gather of each block's weights + batched einsum ~4x).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from effax.kernels.gmm import kernel, reference

IMPLS = ("auto", "xla", "pallas", "megablox", "reference")
MAX_TILE = 256


def gmm(lhs_MD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array, *, impl: str = "auto",
        interpret: bool = False) -> jax.Array:
    """[M, D] x [E, D, F] -> [M, F] in lhs's dtype (fp32 accumulation); see the module docstring. interpret:
    run megablox in Pallas interpret mode (pallas runs in it whenever the default backend is not a GPU)."""
    if impl not in IMPLS:
        raise ValueError(f"gmm impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = "megablox" if jax.default_backend() == "tpu" else "xla"
    # Inside shard_map the rows vary over the batch axes and the weights over `expert` only; the custom
    # VJPs below return each gradient with the union of those axes, so the inputs take it first (adding
    # a zero, which XLA drops): autodiff then sums the weight gradient over the batch axes, as it must.
    lhs_MD, rhs_EDF, group_sizes_E = _same_axes(lhs_MD, rhs_EDF, group_sizes_E.astype(jnp.int32))
    if impl == "reference":
        return reference.gmm(lhs_MD, rhs_EDF, group_sizes_E)
    if impl == "megablox":
        return _megablox(lhs_MD, rhs_EDF, group_sizes_E, interpret)
    if impl == "pallas":
        interpret = interpret or jax.default_backend() != "gpu"
        if interpret and _varying_axes(lhs_MD):
            raise ValueError("gmm impl='pallas' off a GPU runs in Pallas interpret mode, which JAX cannot run inside "
                             "shard_map (the MoE dispatch's): use impl='xla' there, or a GPU")
        tm = max(16, min(128, tile_rows(max(lhs_MD.shape[0], 1), rhs_EDF.shape[0])))  # Triton: a power of two >= 16
        return kernel.gmm(lhs_MD, rhs_EDF, group_sizes_E, tm=tm, interpret=interpret).astype(lhs_MD.dtype)
    if lhs_MD.shape[0] == 0:
        return jnp.zeros((0, rhs_EDF.shape[2]), lhs_MD.dtype)
    return _gmm_xla(lhs_MD, rhs_EDF, group_sizes_E, tile_rows(lhs_MD.shape[0], rhs_EDF.shape[0]))


def tile_rows(m: int, groups: int) -> int:
    """Rows per tile: up to MAX_TILE, smaller when groups are small on average (each group wastes at most
    one partial tile), never more than m."""
    target = max(m // (2 * groups), 8)
    return min(m, MAX_TILE, 1 << (target.bit_length() - 1))


def _megablox(lhs_MD, rhs_EDF, group_sizes_E, interpret):
    m = lhs_MD.shape[0]
    tm = 128
    padded = -(-max(m, 1) // tm) * tm  # megablox needs whole row tiles; the extra rows are in no group
    # megablox leaves rows past the groups unwritten, in the output and in the lhs gradient (NaN in interpret
    # mode): select them away on both sides (a select's gradient does not carry what it discards).
    in_group = (jnp.arange(padded) < jnp.sum(group_sizes_E))[:, None]
    lhs = jnp.where(in_group, jnp.pad(lhs_MD, ((0, padded - m), (0, 0))), 0)
    out = _megablox_gmm(lhs, rhs_EDF, group_sizes_E, tm, interpret)
    return jnp.where(in_group, out, 0)[:m].astype(lhs_MD.dtype)


# megablox's pallas_calls declare no shard_map axes on their outputs, which jax 0.10 rejects inside a checked
# shard_map (the MoE dispatch's): "When `check_vma=True` on `jax.shard_map`, `manual_axis_type` on
# `jax.ShapeDtypeStruct` must not be `None`". So its calls run in a nested shard_map over the axes that are
# already manual (no data moves) with the check off, and their results are cast back to vary over the
# inputs' axes. That cast must not be differentiated (its transpose is a psum), hence this VJP of our own:
# forward and backward are megablox's kernels as its own VJP calls them, each run unchecked.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _megablox_gmm(lhs, rhs_EDF, group_sizes_E, tm: int, interpret: bool):
    return _megablox_gmm_fwd(lhs, rhs_EDF, group_sizes_E, tm, interpret)[0]


def _megablox_vjp(tm, interpret, lhs, rhs_EDF, group_sizes_E, dout=None):
    """megablox's output (dout None), else (dlhs, drhs) for cotangent dout as megablox's own VJP computes them
    (gmm against rhs^T, tgmm). Its kernel functions directly: inside shard_map, jax.vjp of its custom_vjp
    would reject a cotangent that varies over axes its (undeclared) output does not."""
    # the module; the package's `gmm` attribute is the custom_vjp function
    mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
    tiling = (tm, 128, 128)
    if dout is None:
        return mb.gmm(lhs, rhs_EDF, group_sizes_E, jnp.float32, tiling, interpret=interpret)
    dlhs = mb.gmm(dout, rhs_EDF, group_sizes_E, lhs.dtype, tiling, transpose_rhs=True, interpret=interpret)
    drhs = mb.tgmm(lhs.swapaxes(0, 1), dout, group_sizes_E, rhs_EDF.dtype, tiling,
                   num_actual_groups=rhs_EDF.shape[0], interpret=interpret)
    return dlhs, drhs


def _unchecked(fn, *args):
    """fn(*args), inside shard_map run with its varying-axes check off and the results cast to vary over the
    union of the arguments' axes (every argument has it: ops.gmm's _same_axes); outside, fn(*args)."""
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if not manual:
        return fn(*args)
    from jax.sharding import PartitionSpec as P

    outs = jax.shard_map(fn, in_specs=P(), out_specs=P(), axis_names=frozenset(manual), check_vma=False)(*args)
    axes = _varying_axes(args[0])

    def cast(o):
        missing = tuple(sorted(axes - _varying_axes(o), key=str))
        return jax.lax.pcast(o, missing, to="varying") if missing else o

    return jax.tree.map(cast, outs)


def _megablox_gmm_fwd(lhs, rhs_EDF, group_sizes_E, tm, interpret):
    out = _unchecked(functools.partial(_megablox_vjp, tm, interpret), lhs, rhs_EDF, group_sizes_E)
    return out, (lhs, rhs_EDF, group_sizes_E)


def _megablox_gmm_bwd(tm, interpret, residuals, dout):
    lhs, rhs_EDF, group_sizes_E = residuals
    dlhs, drhs = _unchecked(functools.partial(_megablox_vjp, tm, interpret), lhs, rhs_EDF, group_sizes_E,
                            dout.astype(jnp.float32))
    return dlhs.astype(lhs.dtype), drhs.astype(rhs_EDF.dtype), None


_megablox_gmm.defvjp(_megablox_gmm_fwd, _megablox_gmm_bwd)


# ---------------------------------------------------------------------------------------------------
# XLA: a loop over the scheduled row tiles


def _schedule(group_sizes_E, m: int, tile: int):
    """Tile i covers rows [row_i, row_i + tile) ∩ group g_i; (group_i, row_i) for a static maximum number
    of tiles, and the number actually scheduled."""
    E = group_sizes_E.shape[0]
    ends_E = jnp.cumsum(group_sizes_E)
    starts_E = ends_E - group_sizes_E
    tiles_E = -(-group_sizes_E // tile)
    tile_ends_E = jnp.cumsum(tiles_E)
    i = jnp.arange(-(-m // tile) + E)  # sum of ceil(size / tile) <= ceil(m / tile) + E
    g_i = jnp.minimum(jnp.searchsorted(tile_ends_E, i, side="right"), E - 1)
    row_i = starts_E[g_i] + (i - (tile_ends_E[g_i] - tiles_E[g_i])) * tile
    return g_i, row_i, ends_E, tile_ends_E[-1]


def _tile(i, sched, m: int, tile: int):
    """(group, clamped start row, mask of the rows this tile owns). The start is clamped so the slice
    stays inside the array; rows before the tile's own start are masked, so nothing is counted twice."""
    g_i, row_i, ends_E, _ = sched
    g, row = g_i[i], row_i[i]
    start = jnp.minimum(row, m - tile)
    rows = start + jnp.arange(tile)
    return g, start, (rows >= row) & (rows < ends_E[g])


def _loop_gmm(lhs_MD, rhs_EDF, group_sizes_E, tile: int, transpose_rhs: bool = False):
    m = lhs_MD.shape[0]
    n = rhs_EDF.shape[1] if transpose_rhs else rhs_EDF.shape[2]
    sched = _schedule(group_sizes_E, m, tile)
    contract = 1 if transpose_rhs else 0

    def body(i, out_MF):
        g, start, own = _tile(i, sched, m, tile)
        x_tD = jax.lax.dynamic_slice_in_dim(lhs_MD, start, tile)
        w = jax.lax.dynamic_index_in_dim(rhs_EDF, g, keepdims=False)
        y_tF = jax.lax.dot_general(x_tD, w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
        old_tF = jax.lax.dynamic_slice_in_dim(out_MF, start, tile)
        return jax.lax.dynamic_update_slice_in_dim(out_MF, jnp.where(own[:, None], y_tF.astype(out_MF.dtype), old_tF),
                                                   start, 0)

    return jax.lax.fori_loop(0, sched[3], body, _zeros((m, n), lhs_MD.dtype, lhs_MD, rhs_EDF))


def _loop_tgmm(lhs_MD, dout_MF, group_sizes_E, tile: int, dtype):
    m = lhs_MD.shape[0]
    sched = _schedule(group_sizes_E, m, tile)

    def body(i, acc_EDF):
        g, start, own = _tile(i, sched, m, tile)
        x_tD = jnp.where(own[:, None], jax.lax.dynamic_slice_in_dim(lhs_MD, start, tile), 0)
        d_tF = jax.lax.dynamic_slice_in_dim(dout_MF, start, tile)
        update_DF = jax.lax.dot_general(x_tD, d_tF, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_DF = jax.lax.dynamic_index_in_dim(acc_EDF, g, keepdims=False) + update_DF
        return jax.lax.dynamic_update_index_in_dim(acc_EDF, acc_DF, g, 0)

    shape = (group_sizes_E.shape[0], lhs_MD.shape[1], dout_MF.shape[1])
    return jax.lax.fori_loop(0, sched[3], body, _zeros(shape, jnp.float32, lhs_MD, dout_MF)).astype(dtype)


def _same_axes(*arrays):
    """The arrays, each varying over the union of their shard_map axes (a no-op outside shard_map)."""
    zero = sum(jnp.zeros_like(a, jnp.int32, shape=()) for a in arrays)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


def _varying_axes(x) -> frozenset:
    """The shard_map axes x varies over (empty outside shard_map); the aval's field is `manual_axis_type`
    in jax 0.10, `vma` before."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _zeros(shape, dtype, *inputs):
    """A loop's initial accumulator, varying over the same shard_map axes as its inputs (the loop's output
    is, and a loop carry must keep its type): zeros_like keeps its argument's axes, and the sum their union."""
    return sum(jnp.zeros_like(a, dtype, shape=shape) for a in inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_xla(lhs_MD, rhs_EDF, group_sizes_E, tile: int):
    return _loop_gmm(lhs_MD, rhs_EDF, group_sizes_E, tile)


def _gmm_xla_fwd(lhs_MD, rhs_EDF, group_sizes_E, tile):
    return _loop_gmm(lhs_MD, rhs_EDF, group_sizes_E, tile), (lhs_MD, rhs_EDF, group_sizes_E)


def _gmm_xla_bwd(tile, residuals, dout_MF):
    lhs_MD, rhs_EDF, group_sizes_E = residuals
    dlhs_MD = _loop_gmm(dout_MF.astype(lhs_MD.dtype), rhs_EDF, group_sizes_E, tile, transpose_rhs=True)
    drhs_EDF = _loop_tgmm(lhs_MD, dout_MF, group_sizes_E, tile, rhs_EDF.dtype)
    return dlhs_MD, drhs_EDF, None


_gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)
