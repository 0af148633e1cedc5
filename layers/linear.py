"""`project`: a projection as one 2-D matmul, whatever the ranks of its input and kernel.

    y = project(x_BTD, w_DHP)          # [B, T, D] x [D, H, P] -> [B, T, H, P]
    y = project(o_BTHP, w_HPD, 2)      # [B, T, H, P] x [H, P, D] -> [B, T, D] (two contracted axes)

Mathematically `jnp.einsum("btd,dhp->bthp", ...)`. Why not the einsum: on XLA's CPU backend the
*backward* of a block written with [B, T, .] einsums compiled to markedly slower code than the same
math on [B*T, .] matmuls (docs/benchmarks.md, "Where the CPU step's time goes"); the forward was at
parity. The reshapes are free (bitcasts) and merge or split only the leading batch-like axes and the
kernel's input or output axes, so a sharded batch or head axis stays the major part of its merged axis
and GSPMD keeps its sharding on GPU and TPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def project(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *w.shape[:contract]] @ w -> [..., *w.shape[contract:]] in x's dtype (w cast to it)."""
    inner, outer = w.shape[:contract], w.shape[contract:]
    if x.shape[x.ndim - contract:] != inner:
        raise ValueError(f"project: input {x.shape} does not end in the kernel's input axes {inner} (kernel {w.shape})")
    lead = x.shape[:x.ndim - contract]
    k = math.prod(inner)
    y = jnp.dot(x.reshape(-1, k), w.astype(x.dtype).reshape(k, -1))
    return y.reshape(*lead, *outer)
