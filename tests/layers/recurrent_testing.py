"""Shared pieces of the hybrid mixers' tests: a tiny config, building and running one layer, and numpy
(float64) versions of the operations the papers' equations are written in."""

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.mixer import LayerContext
from effax.models.hybrid import HybridConfig

# Four Mamba2 heads (expand 2 x d 8 / head dim 4), two GDN / Based heads of dim 4, chunks of 4 so that
# T = 11 has a partial last chunk; init_std 0.5 keeps activations O(1) at d 8 so every term matters.
TINY = HybridConfig(vocab_size=64, d_model=8, n_layers=1, n_heads=2, d_ff=16, init_std=0.5,
                    ssm_state=3, ssm_head_dim=4, expand=2, chunk_size=4, conv_kernel=4, feature_dim=3)
T = 11
SEGMENTS = np.array([[1] * 5 + [2] * 6, [4] * 11], np.int32)  # row 0: two packed documents; row 1: one

# The block against a float64 loop over the paper's equations: fp32 rounding through projections, conv,
# recurrence and norm gives ~1e-6 of the output's scale; 1e-5 leaves room and catches any wrong term.
RTOL = 1e-5


def close(got, want, rtol=RTOL):
    """|got - want| <= rtol * max|want| everywhere (relative to the output's scale, not elementwise)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x scale {scale:.3g}"


def build(cls, cfg=TINY, seed=0):
    return cls(cfg, rngs=nnx.Rngs(seed))


def inputs(cfg=TINY, seed=1):
    return np.random.default_rng(seed).standard_normal((2, T, cfg.d_model)).astype(np.float32)


def run(layer, x_BTD, segment_ids_BT):
    """The layer's full forward pass, jitted."""
    graphdef, state = nnx.split(layer)

    @jax.jit
    def forward(state, x_BTD, seg):
        positions = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
        return nnx.merge(graphdef, state)(x_BTD, LayerContext(positions_BT=positions, segment_ids_BT=seg))

    return np.asarray(forward(state, jnp.asarray(x_BTD), jnp.asarray(segment_ids_BT)))


def params(layer) -> dict:
    return {path[0]: np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


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
