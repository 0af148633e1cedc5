"""Rotary position embeddings (Su et al. 2021) with explicit positions.

Positions are given per token (`positions_BT`), so packed sequences restart at 0 at each document
and a document's rotations equal those it would get alone. Pairing is "half-split" (dimension i
rotates with i + P/2, as in HF Llama / GPT-NeoX), not interleaved (Meta's original Llama); the two
are the same up to a fixed permutation of the q/k projection columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions_BT: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """angle[b, t, i] = position * theta^(-2i/P) for i < P/2 (P = head_dim), in fp32 (exact positions
    up to 2^24)."""
    inv_freq_F = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions_BT.astype(jnp.float32)[..., None] * inv_freq_F


def rope_sin_cos(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos of `rope_angles`, [B, T, P/2] each.

    On XLA:CPU they are computed in a loop over the batch rows. XLA:CPU counts sin and cos as cheap and
    would otherwise recompute them inside every fusion that reads them, once per element of q and of k,
    forward and backward: 16 fusions and ~12M sincos calls per quickstart step at batch 16, where a loop's
    outputs are computed once (the step in 0.90x the time, same bits; docs/benchmarks.md, "Step scratch memory
    and RoPE's sin / cos on XLA:CPU"). Other backends fuse them as XLA likes."""
    angles_BTF = rope_angles(positions_BT, head_dim, theta)
    if jax.default_backend() != "cpu":
        return jnp.sin(angles_BTF), jnp.cos(angles_BTF)
    return jax.lax.map(lambda a_TF: (jnp.sin(a_TF), jnp.cos(a_TF)), angles_BTF)


def apply_rope(x_BTHP: jax.Array, positions_BT: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotates each (x_i, x_{i+P/2}) pair by angle(position, i); computed in fp32, returned in x's dtype."""
    P = x_BTHP.shape[-1]
    if P % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {P}")
    sin_BTF, cos_BTF = rope_sin_cos(positions_BT, P, theta)
    sin, cos = sin_BTF[:, :, None, :], cos_BTF[:, :, None, :]
    x1, x2 = jnp.split(x_BTHP.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHP.dtype)
