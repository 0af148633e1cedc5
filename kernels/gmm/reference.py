"""Grouped matmul, plain jnp: the ground truth for kernels/gmm/ops.py.

    gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]
        rows sizes[0..g-1].sum() .. sizes[0..g].sum() of lhs times rhs[g]; rows past sizes.sum() are 0.
    tgmm(lhs [M, K], dout [M, N], group_sizes [G]) -> [G, K, N]
        per group g: lhs[rows of g].T @ dout[rows of g] (the weight gradient of gmm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array, preferred_element_type=None) -> jax.Array:
    # ragged_dot computes every group over every row (dense): a test oracle, not a dispatch path.
    out = jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs_MK.dtype)


def group_ids(group_sizes_G: jax.Array, m: int) -> jax.Array:
    """The group of each of m rows; rows past the last group get G (no group)."""
    ends_G = jnp.cumsum(group_sizes_G)
    return jnp.searchsorted(ends_G, jnp.arange(m), side="right")


def tgmm(lhs_MK: jax.Array, dout_MN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    G = group_sizes_G.shape[0]
    onehot_MG = jax.nn.one_hot(group_ids(group_sizes_G, lhs_MK.shape[0]), G, dtype=jnp.float32)
    return jnp.einsum("mg,mk,mn->gkn", onehot_MG, lhs_MK.astype(jnp.float32), dout_MN.astype(jnp.float32))
