"""RMSNorm, RoPE and SwiGLU against numpy formulas written out here."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.layers.mlp import SwiGLU
from effax.layers.norms import RMSNorm, rms_norm
from effax.layers.rope import apply_rope


def test_rms_norm_matches_formula_and_keeps_dtype():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    norm = RMSNorm(16, eps=1e-5, rngs=nnx.Rngs(0))
    scale = np.linspace(0.5, 1.5, 16, dtype=np.float32)
    norm.scale[...] = jnp.asarray(scale)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)  # fp32 rounding only
    assert norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_rms_norm_computes_in_fp32():
    # 300^2 = 9e4 overflows float16 (max 65504): only an fp32 sum of squares gets this right.
    x = jnp.full((1, 1, 8), 300.0, jnp.float16)
    y = RMSNorm(8, rngs=nnx.Rngs(0))(x)
    assert y.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, rtol=1e-3)  # float16 has 11 significant bits


def test_a_batch_of_one_is_normalised_like_its_row_of_a_batch():
    """rms_norm takes its own path at batch 1 and gated_rms_norm works on flat rows (both for XLA:CPU's
    batch-1 speed): outputs and gradients (input and scale) equal those of the same row inside a batch of 2."""
    from effax.layers.ssm import gated_rms_norm

    rng = np.random.default_rng(1)
    x, gate = (jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32) for _ in range(2))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    norms = {"rms_norm": lambda x, g, s: rms_norm(x, s, 1e-5),
             "gated": lambda x, g, s: gated_rms_norm(x, g, s, 1e-5, norm_before_gate=True)}
    for name, f in norms.items():
        @jax.jit
        def jitted(x, g, s):
            return f(x, g, s), jax.grad(lambda x, s: jnp.sum(jnp.sin(f(x, g, s))), argnums=(0, 1))(x, s)

        def value_and_grads(rows):
            return jitted(x[rows], gate[rows], scale)

        y, (dx, ds) = value_and_grads(slice(0, 2))
        (y0, (dx0, ds0)), (_, (_, ds1)) = value_and_grads(slice(0, 1)), value_and_grads(slice(1, 2))
        # fp32; only the scale gradient's summation order differs (5 x 3 terms per feature vs 10 x 3)
        np.testing.assert_allclose(y0, y[:1], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(dx0, dx[:1], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(ds0 + ds1, ds, rtol=1e-5, atol=1e-6, err_msg=name)


def _rope_numpy(x_BTHP, pos_BT, theta):
    """Half-split RoPE as complex multiplication: (x_i + i x_{i+P/2}) * exp(i pos theta^(-2i/P))."""
    P = x_BTHP.shape[-1]
    z = x_BTHP[..., : P // 2] + 1j * x_BTHP[..., P // 2 :]
    freq = theta ** (-np.arange(0, P, 2) / P)
    z = z * np.exp(1j * pos_BT[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 3, 8))
    pos = rng.integers(0, 1000, size=(2, 7))
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta=10000.0)
    # fp32 angles up to 1000 rad carry ~1000 * 6e-8 = 6e-5 absolute phase error.
    np.testing.assert_allclose(got, _rope_numpy(x, pos, 10000.0), atol=3e-4)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), theta=500.0)
        kn = apply_rope(k, jnp.array([[n]]), theta=500.0)
        return jnp.sum(qm * kn, axis=-1)

    np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5, atol=1e-5)  # fp32 trig at angles < 12 rad
    np.testing.assert_allclose(apply_rope(q, jnp.zeros((1, 1), jnp.int32)), q)  # position 0 is the identity


def test_swiglu_matches_formula():
    rng = np.random.default_rng(3)
    mlp = SwiGLU(8, 24, rngs=nnx.Rngs(0))
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    g, u, d = (np.asarray(p[...], np.float64) for p in (mlp.gate, mlp.up, mlp.down))
    a = x @ g
    want = (a / (1 + np.exp(-a)) * (x @ u)) @ d
    np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)  # fp32 matmuls of width <= 24
    assert mlp.gate.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert mlp.down.get_metadata()["out_sharding"] == ("mlp", "embed")


def test_swiglu_bf16_compute_keeps_fp32_params():
    mlp = SwiGLU(8, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert mlp.gate[...].dtype == jnp.float32
    assert mlp(jnp.ones((1, 2, 8), jnp.float32)).dtype == jnp.bfloat16


def test_rope_sin_cos_are_computed_once_per_program_on_cpu():
    """XLA:CPU counts sin and cos as cheap and would recompute them inside every fusion that reads them (q and k,
    forward and backward: 4 each here). `rope_sin_cos` computes them in a loop over the batch rows, whose outputs
    XLA cannot fuse: one sine and one cosine in the compiled program, with the same values as jnp.sin / jnp.cos."""
    from effax.layers.rope import rope_angles, rope_sin_cos

    assert jax.default_backend() == "cpu"
    pos = jnp.asarray(np.random.default_rng(4).integers(0, 300, size=(4, 32)))
    q, k = jnp.ones((4, 32, 4, 16)), jnp.ones((4, 32, 2, 16))
    loss = lambda q, k: jnp.sum(apply_rope(q, pos) ** 2) + jnp.sum(apply_rope(k, pos) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, k).compile().as_text()
    assert hlo.count(" sine(") == 1 and hlo.count(" cosine(") == 1, (hlo.count(" sine("), hlo.count(" cosine("))
    sin, cos = jax.jit(rope_sin_cos, static_argnums=(1, 2))(pos, 16, 10000.0)
    angles = rope_angles(pos, 16, 10000.0)
    np.testing.assert_array_equal(sin, jax.jit(jnp.sin)(angles))
    np.testing.assert_array_equal(cos, jax.jit(jnp.cos)(angles))
