"""RMSNorm (Zhang & Sennrich 2019), as in Llama: y = x / sqrt(mean(x^2) + eps) * scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.sharding import logical_init


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Computed in fp32 (a bf16/fp16 sum of squares loses precision or overflows); cast back to x's dtype.
    A batch of one is normalised on `flat_rows` (XLA:CPU's batch-1 slowdown); larger batches keep [B, T, D], so
    the dense model's gradients stay bit-identical to the pre-skeleton model's (a different reduction order of
    the scale's gradient would change the last bits; tests/models/test_dense_skeleton_equivalence.py)."""
    if x.ndim > 2 and x.shape[0] == 1:
        return rms_norm(flat_rows(x), scale, eps).reshape(x.shape)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def flat_rows(x: jax.Array) -> jax.Array:
    """x [..., F] as [rows, F]. A per-feature weight multiplied on [B, T, F] with B = 1 gets a weight
    gradient that XLA:CPU (jax 0.10) fuses, product and reduction over [1, T, F], into a YNNPACK kernel
    ~40x slower than over [T, F]; on 2-D the same math runs at full speed, and the reshape is free
    (docs/benchmarks.md, "Batch-1 reductions")."""
    return x.reshape(-1, x.shape[-1])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        # no_decay: weight decay would pull the gains towards 0, not towards the identity they start at.
        self.scale = nnx.Param(logical_init(nnx.initializers.ones, ("embed",))(rngs.params(), (dim,), param_dtype),
                               no_decay=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
