"""Shared pieces of the hybrid family's tests (tests/layers, tests/models): one tiny model holding every
recurrent mixer, built once per process with numpy parameters and run jitted (compiles are what these
tests pay for), and numpy (float64) versions of the operations the papers' equations are written in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.layers.mixer import LayerContext
from effax.models.hybrid import Hybrid, HybridConfig

# Four Mamba2 heads (expand 2 x d 16 / head dim 8), two GDN / Based heads of dim 8, chunks of 4 so that
# T = 11 has a partial last chunk.
TINY = HybridConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, d_ff=32, init_std=0.3,
                    pattern=("mamba2", "gdn", "based+none", "gated_conv"), ssm_state=4, ssm_head_dim=8, expand=2,
                    chunk_size=4, conv_kernel=4, feature_dim=3)
T = 11
SEGMENTS = np.array([[1] * 5 + [2] * 6, [4] * 11], np.int32)  # row 0: two packed documents; row 1: one

# XLA's backend (LLVM) optimisation off: these tests pay for compilation on 2 cores, not for run time (it
# halves the compile of a GDN layer's gradient); the HLO-level program is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast(jitted):
    """`jitted` (a jax.jit function), compiled with FAST_COMPILE once per signature of its arguments."""
    executables = {}

    def call(*args):
        key = (jax.tree.structure(args), tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in jax.tree.leaves(args)))
        if key not in executables:
            executables[key] = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
        return executables[key](*args)

    return call


# The block against a float64 loop over the paper's equations: fp32 rounding through projections, conv,
# recurrence and norm gives ~1e-6 of the output's scale; 1e-5 leaves room and catches any wrong term.
RTOL = 1e-5


def close(got, want, rtol=RTOL):
    """|got - want| <= rtol * max|want| everywhere (relative to the output's scale, not elementwise)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x scale {scale:.3g}"


def filled(make, seed: int = 0):
    """The module `make()` builds, with parameters drawn by numpy instead of its initialisers: nothing to
    compile (a jitted init of this model takes ~10 s of XLA time on 2 cores, each eager draw ~0.3 s).
    Sensible ranges where the mechanism needs them (decays in (0, 1), positive dt), O(1) activations elsewhere."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(path, v):
        name, shape = path[-1], v.shape
        if name == "A_log":
            x = np.log(rng.uniform(1, 16, shape))
        elif name == "dt_bias":  # softplus(dt_bias) in ~(0.01, 0.5): decays that matter over a few tokens
            x = np.log(np.expm1(np.exp(rng.uniform(np.log(0.01), np.log(0.5), shape))))
        elif name in ("scale", "norm", "D"):
            x = 1 + 0.3 * rng.standard_normal(shape)
        else:
            x = 0.3 * rng.standard_normal(shape)
        return v.replace(value=jnp.asarray(x, v.dtype))

    flat = [(path, draw(path, v)) for path, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.cache
def model():
    return filled(lambda: Hybrid(TINY, rngs=nnx.Rngs(0)))


@functools.cache
def mixers() -> dict:
    """name -> the mixer of that layer of `model()` as a standalone module (its [R = 1] axis dropped)."""
    out = {}
    for spec, group in zip(TINY.layer_specs, model().blocks):
        graphdef, state = nnx.split(group.layers[0].mixer)
        out[spec.mixer] = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[0]), state))
    return out


@functools.cache
def outputs() -> tuple[np.ndarray, dict]:
    """(x [2, T, D], {mixer name: its full forward pass on x with SEGMENTS}): one compile for all four."""
    x = np.random.default_rng(1).standard_normal((2, T, TINY.d_model)).astype(np.float32)
    graphdef, state = nnx.split(mixers())

    @fast
    @jax.jit
    def forward(state, x_BTD, seg):
        ctx = LayerContext(positions_BT=jnp.broadcast_to(jnp.arange(T), (2, T)), segment_ids_BT=seg)
        return {name: layer(x_BTD, ctx) for name, layer in nnx.merge(graphdef, state).items()}

    return x, {k: np.asarray(v) for k, v in forward(state, jnp.asarray(x), jnp.asarray(SEGMENTS)).items()}


def params(name: str) -> dict:
    """The named mixer's parameters as float64 numpy arrays."""
    flat = nnx.to_flat_state(nnx.state(mixers()[name], nnx.Param))
    return {path[0]: np.asarray(v[...], np.float64) for path, v in flat}


def silu(x):
    return x / (1 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0, x)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def causal_conv(x_TC, w_WC, bias_C, seg_T):
    """PyTorch Conv1d(groups=C, padding=W-1)[:T]: tap W-1-j multiplies the input j tokens back; inputs
    from an earlier document count as zero."""
    W = w_WC.shape[0]
    y = np.zeros_like(x_TC) + (0 if bias_C is None else bias_C)
    for t in range(len(x_TC)):
        for j in range(W):
            if t - j >= 0 and seg_T[t - j] == seg_T[t]:
                y[t] += w_WC[W - 1 - j] * x_TC[t - j]
    return y


def new_document(seg_T, t) -> bool:
    return t > 0 and seg_T[t] != seg_T[t - 1]
