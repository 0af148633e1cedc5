"""Grouped matmul: the one op the dropless MoE dispatch calls (layers/moe_dispatch.py).

    out_MN = gmm(lhs_MK, rhs_GKN, group_sizes_G, impl="auto")

Rows are sorted by group: rows [sum(sizes[:g]), sum(sizes[:g+1])) of lhs are multiplied by rhs[g]; rows
past sum(sizes) (padding, or tokens routed to no expert) come out 0. Differentiable in lhs and rhs.

impl (dispatch):
  auto       megablox on TPU, xla elsewhere (the Pallas GPU kernel of kernels/gmm/kernel.py is not yet
             written; it will take over on GPU)
  megablox   jax.experimental.pallas.ops.tpu.megablox.gmm, with its own VJP (gmm + tgmm); on CPU only in
             interpret mode (tests)
  xla        a loop over row tiles of `tile` rows, each inside one group: only the scheduled tiles run
             (sum over groups of ceil(size / tile)), so a buffer padded for the worst case (expert
             parallelism) costs no compute, and neither do rows past the groups. Own VJP: the lhs
             gradient is the same loop against rhs^T, the rhs gradient a loop that accumulates
             lhs_tile^T @ dout_tile into its group.
  reference  jax.lax.ragged_dot (kernels/gmm/reference.py): exact but dense over every group

On the 2-core development CPU (M=8192 rows, K=256, N=352, 8 groups; noisy shared machine) the tile loop
ran within 0.5-1.8x the time of one dense [8192,256]x[256,352] matmul of the same FLOPs, forward and
backward, while ragged_dot took 5-10x as long (and a gather of each block's weights + batched einsum ~4x).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effax.kernels.gmm import reference

IMPLS = ("auto", "xla", "megablox", "reference")
MAX_TILE = 256


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, *, impl: str = "auto",
        interpret: bool = False) -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N] in lhs's dtype (fp32 accumulation); see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"gmm impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = "megablox" if jax.default_backend() == "tpu" else "xla"
    # Inside shard_map the rows vary over the batch axes and the weights over `expert` only; the custom
    # VJPs below return each gradient with the union of those axes, so the inputs take it first (adding
    # a zero, which XLA drops): autodiff then sums the weight gradient over the batch axes, as it must.
    lhs_MK, rhs_GKN, group_sizes_G = _same_axes(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32))
    if impl == "reference":
        return reference.gmm(lhs_MK, rhs_GKN, group_sizes_G)
    if impl == "megablox":
        return _megablox(lhs_MK, rhs_GKN, group_sizes_G, interpret)
    if lhs_MK.shape[0] == 0:
        return jnp.zeros((0, rhs_GKN.shape[2]), lhs_MK.dtype)
    return _gmm_xla(lhs_MK, rhs_GKN, group_sizes_G, tile_rows(lhs_MK.shape[0], rhs_GKN.shape[0]))


def tile_rows(m: int, groups: int) -> int:
    """Rows per tile: up to MAX_TILE, smaller when groups are small on average (each group wastes at most
    one partial tile), never more than m."""
    target = max(m // (2 * groups), 8)
    return min(m, MAX_TILE, 1 << (target.bit_length() - 1))


def _megablox(lhs_MK, rhs_GKN, group_sizes_G, interpret):
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    m = lhs_MK.shape[0]
    tm = 128
    padded = -(-max(m, 1) // tm) * tm  # megablox needs whole row tiles; the extra rows are in no group
    # megablox leaves rows past the groups unwritten, in the output and in the lhs gradient (NaN in interpret
    # mode): select them away on both sides (a select's gradient does not carry what it discards).
    in_group = (jnp.arange(padded) < jnp.sum(group_sizes_G))[:, None]
    lhs = jnp.where(in_group, jnp.pad(lhs_MK, ((0, padded - m), (0, 0))), 0)
    # positional: the nondiff arguments of megablox's custom_vjp (preferred type, tiling, transpose_rhs, interpret)
    out = megablox_gmm(lhs, rhs_GKN, group_sizes_G, jnp.float32, (tm, 128, 128), None, None, False, interpret)
    return jnp.where(in_group, out, 0)[:m].astype(lhs_MK.dtype)


# ---------------------------------------------------------------------------------------------------
# XLA: a loop over the scheduled row tiles


def _schedule(group_sizes_G, m: int, tile: int):
    """Tile i covers rows [row_i, row_i + tile) ∩ group g_i; (group_i, row_i) for a static maximum number
    of tiles, and the number actually scheduled."""
    G = group_sizes_G.shape[0]
    ends_G = jnp.cumsum(group_sizes_G)
    starts_G = ends_G - group_sizes_G
    tiles_G = -(-group_sizes_G // tile)
    tile_ends_G = jnp.cumsum(tiles_G)
    i = jnp.arange(-(-m // tile) + G)  # sum of ceil(size / tile) <= ceil(m / tile) + G
    g_i = jnp.minimum(jnp.searchsorted(tile_ends_G, i, side="right"), G - 1)
    row_i = starts_G[g_i] + (i - (tile_ends_G[g_i] - tiles_G[g_i])) * tile
    return g_i, row_i, ends_G, tile_ends_G[-1]


def _tile(i, sched, m: int, tile: int):
    """(group, clamped start row, mask of the rows this tile owns). The start is clamped so the slice
    stays inside the array; rows before the tile's own start are masked, so nothing is counted twice."""
    g_i, row_i, ends_G, _ = sched
    g, row = g_i[i], row_i[i]
    start = jnp.minimum(row, m - tile)
    rows = start + jnp.arange(tile)
    return g, start, (rows >= row) & (rows < ends_G[g])


def _loop_gmm(lhs_MK, rhs_GKN, group_sizes_G, tile: int, transpose_rhs: bool = False):
    m = lhs_MK.shape[0]
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    sched = _schedule(group_sizes_G, m, tile)
    contract = 1 if transpose_rhs else 0

    def body(i, out_MN):
        g, start, own = _tile(i, sched, m, tile)
        x_tK = jax.lax.dynamic_slice_in_dim(lhs_MK, start, tile)
        w = jax.lax.dynamic_index_in_dim(rhs_GKN, g, keepdims=False)
        y_tN = jax.lax.dot_general(x_tK, w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
        old_tN = jax.lax.dynamic_slice_in_dim(out_MN, start, tile)
        return jax.lax.dynamic_update_slice_in_dim(out_MN, jnp.where(own[:, None], y_tN.astype(out_MN.dtype), old_tN),
                                                   start, 0)

    return jax.lax.fori_loop(0, sched[3], body, _zeros((m, n), lhs_MK.dtype, lhs_MK, rhs_GKN))


def _loop_tgmm(lhs_MK, dout_MN, group_sizes_G, tile: int, dtype):
    m = lhs_MK.shape[0]
    sched = _schedule(group_sizes_G, m, tile)

    def body(i, acc_GKN):
        g, start, own = _tile(i, sched, m, tile)
        x_tK = jnp.where(own[:, None], jax.lax.dynamic_slice_in_dim(lhs_MK, start, tile), 0)
        d_tN = jax.lax.dynamic_slice_in_dim(dout_MN, start, tile)
        update_KN = jax.lax.dot_general(x_tK, d_tN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_KN = jax.lax.dynamic_index_in_dim(acc_GKN, g, keepdims=False) + update_KN
        return jax.lax.dynamic_update_index_in_dim(acc_GKN, acc_KN, g, 0)

    G, K, N = group_sizes_G.shape[0], lhs_MK.shape[1], dout_MN.shape[1]
    return jax.lax.fori_loop(0, sched[3], body, _zeros((G, K, N), jnp.float32, lhs_MK, dout_MN)).astype(dtype)


def _same_axes(*arrays):
    """The arrays, each varying over the union of their shard_map axes (a no-op outside shard_map)."""
    zero = sum(jnp.zeros_like(a, jnp.int32, shape=()) for a in arrays)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


def _zeros(shape, dtype, *inputs):
    """A loop's initial accumulator, varying over the same shard_map axes as its inputs (the loop's output
    is, and a loop carry must keep its type): zeros_like keeps its argument's axes, and the sum their union."""
    return sum(jnp.zeros_like(a, dtype, shape=shape) for a in inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_xla(lhs_MK, rhs_GKN, group_sizes_G, tile: int):
    return _loop_gmm(lhs_MK, rhs_GKN, group_sizes_G, tile)


def _gmm_xla_fwd(lhs_MK, rhs_GKN, group_sizes_G, tile):
    return _loop_gmm(lhs_MK, rhs_GKN, group_sizes_G, tile), (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_xla_bwd(tile, residuals, dout_MN):
    lhs_MK, rhs_GKN, group_sizes_G = residuals
    dlhs_MK = _loop_gmm(dout_MN.astype(lhs_MK.dtype), rhs_GKN, group_sizes_G, tile, transpose_rhs=True)
    drhs_GKN = _loop_tgmm(lhs_MK, dout_MN, group_sizes_G, tile, rhs_GKN.dtype)
    return dlhs_MK, drhs_GKN, None


_gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)
