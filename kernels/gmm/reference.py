"""Grouped matmul, plain jnp: the ground truth for kernels/gmm/ops.py.

    gmm(lhs [M, D], rhs [E, D, F], group_sizes [E]) -> [M, F]
        rows sizes[0..e-1].sum() .. sizes[0..e].sum() of lhs times rhs[e]; rows past sizes.sum() are 0.
    tgmm(lhs [M, D], dout [M, F], group_sizes [E]) -> [E, D, F]
        per group e: lhs[rows of e].T @ dout[rows of e] (the weight gradient of gmm).

(M rows, E groups — the experts of an MoE layer —, D the contracted width, F the output width.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm(lhs_MD: jax.Array, rhs_EDF: jax.Array, group_sizes_E: jax.Array, preferred_element_type=None) -> jax.Array:
    # ragged_dot computes every group over every row (dense): a test oracle, not a dispatch path.
    out = jax.lax.ragged_dot(lhs_MD, rhs_EDF, group_sizes_E.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs_MD.dtype)


def group_ids(group_sizes_E: jax.Array, m: int) -> jax.Array:
    """The group of each of m rows; rows past the last group get E (no group)."""
    return jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(m), side="right")


def tgmm(lhs_MD: jax.Array, dout_MF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    E = group_sizes_E.shape[0]
    onehot_ME = jax.nn.one_hot(group_ids(group_sizes_E, lhs_MD.shape[0]), E, dtype=jnp.float32)
    return jnp.einsum("me,md,mf->edf", onehot_ME, lhs_MD.astype(jnp.float32), dout_MF.astype(jnp.float32))
