"""Shared by the attention tests (tests/layers/test_attention_*.py, test_sparse_mixers.py, test_nsa.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# XLA's backend (LLVM) optimisation off: these tests pay for compiling on 2 cores, not for run time; the
# HLO-level program is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
    """jax.jit(fn), compiled once for arguments shaped like `args`."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def filled(make, seed: int = 0, std: float = 0.2):
    """The module `make()` builds, its parameters drawn by numpy (normal(0, std); norm scales 1 + normal(0,
    0.1)): an eager init would compile one random draw per parameter shape, seconds each on 2 cores."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(path, v):
        x = 1 + 0.1 * rng.standard_normal(v.shape) if path[-1] == "scale" else std * rng.standard_normal(v.shape)
        return v.replace(value=jnp.asarray(x, v.dtype))

    return nnx.merge(graphdef, nnx.from_flat_state([(path, draw(path, v)) for path, v in nnx.to_flat_state(state)]))
