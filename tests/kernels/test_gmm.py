"""kernels/gmm: every impl of the grouped matmul against the ragged_dot reference, forward and both
gradients, with odd sizes, empty groups, every row in one group, rows past the last group and bf16
inputs; megablox runs in interpret mode (reads past an edge are NaN there, so a missing mask shows);
the TPU and CUDA lowerings are exported on CPU; megablox inside shard_map (as the MoE dispatch calls it) is
interpreted against the reference and exported for TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effax.kernels.gmm import ops, reference

CASES = {  # M rows, K, N, group sizes (sum <= M)
    "odd sizes, an empty group": (37, 16, 24, [5, 0, 20, 12]),
    "all rows in one group": (64, 8, 8, [0, 64, 0]),
    "rows past the groups": (50, 8, 12, [3, 4, 5]),
    "several tiles per group": (600, 8, 8, [0, 301, 299]),
}


def _inputs(M, K, N, sizes, dtype):
    rng = np.random.default_rng(0)  # numpy: no eager jax ops to compile one by one
    x, w, d = rng.standard_normal((M, K)), rng.standard_normal((len(sizes), K, N)), rng.standard_normal((M, N))
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.array(sizes, jnp.int32), jnp.asarray(d, jnp.float32)


def _value_and_grads(impl, x, w, sizes, d):
    """(out, (dx, dw)) of sum(gmm(x, w) * d), one jitted program per impl."""
    kw = {"impl": impl, "interpret": True} if impl == "megablox" else {"impl": impl}

    def loss(x, w):
        out = ops.gmm(x, w, sizes, **kw) if impl != "plain" else reference.gmm(x, w, sizes)
        return jnp.sum(out.astype(jnp.float32) * d), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
    return np.asarray(out, np.float32), tuple(np.asarray(g, np.float32) for g in grads)


@functools.cache
def _reference(case):
    return _value_and_grads("plain", *_inputs(*CASES[case], jnp.float32))


# megablox's interpreter is slow: its two cases are the ones that exercise its masking (empty group,
# rows past the groups)
@pytest.mark.parametrize("impl, case", [("xla", c) for c in CASES] + [("megablox", c) for c in list(CASES)[::2]])
def test_gmm_forward_and_gradients_equal_the_reference(impl, case):
    M, K, N, sizes = CASES[case]
    x, w, sizes, d = _inputs(M, K, N, sizes, jnp.float32)
    out, (dx, dw) = _value_and_grads(impl, x, w, sizes, d)
    ref_out, (ref_dx, ref_dw) = _reference(case)
    # fp32: the same products summed in another order (tiles vs ragged_dot); sums of <= 600 terms of O(1)
    # values, so ~1e-5 absolute; 1e-4 leaves room without hiding a wrong row (errors would be O(1)).
    np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=0)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-4, rtol=0)
    np.testing.assert_allclose(dw, ref_dw, atol=1e-4, rtol=0)
    assert not np.any(out[int(sizes.sum()):]) and not np.any(dx[int(sizes.sum()):])  # no group: 0 out, 0 gradient
    np.testing.assert_allclose(jax.jit(reference.tgmm)(x, d, sizes), ref_dw, atol=1e-4, rtol=0)  # the tgmm reference


def test_gmm_bf16_accumulates_in_fp32():
    impl = "xla"
    x, w, sizes, d = _inputs(*CASES["odd sizes, an empty group"], jnp.bfloat16)
    out, (dx, dw) = _value_and_grads(impl, x, w, sizes, d)
    dtypes = jax.eval_shape(jax.grad(lambda x, w: ops.gmm(x, w, sizes, impl=impl).sum(), (0, 1)), x, w)
    assert jax.eval_shape(ops.gmm, x, w, sizes).dtype == dtypes[0].dtype == dtypes[1].dtype == jnp.bfloat16
    exact = jax.jit(reference.gmm)(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    # one bf16 rounding of the fp32 sum (2^-8 relative) of 16 products of O(1): within 0.05 of |out| <= ~10
    np.testing.assert_allclose(out, exact, atol=0.05, rtol=2**-7)


def test_auto_is_xla_on_cpu_and_unknown_impls_are_named():
    x, w, sizes, _ = _inputs(8, 4, 4, [8], jnp.float32)
    lowered = jax.jit(lambda x, w: ops.gmm(x, w, sizes)).lower(x, w).as_text()
    assert "while" in lowered and "ragged" not in lowered  # the tile loop, not ragged_dot
    with pytest.raises(ValueError, match="gmm impl='triton' is not one of"):
        ops.gmm(x, w, sizes, impl="triton")


@pytest.mark.parametrize("platform, impl", [("tpu", "megablox"), ("tpu", "xla"), ("cuda", "xla")])
def test_gmm_lowers_for_accelerators(platform, impl):
    """jax.export on CPU runs the TPU (Mosaic) and CUDA lowerings: block-shape errors show without a device."""
    x = jax.ShapeDtypeStruct((200, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 256, 384), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    grad = jax.jit(jax.grad(lambda x, w, s: ops.gmm(x, w, s, impl=impl).astype(jnp.float32).sum(), (0, 1)))
    assert jax.export.export(grad, platforms=[platform])(x, w, sizes).mlir_module()


def test_tile_rows_shrink_with_many_small_groups():
    assert ops.tile_rows(8192, 8) == 256
    assert ops.tile_rows(8192, 64) == 64  # at most one partial tile per group: <= 64 x 64 rows of waste
    assert ops.tile_rows(5, 4) == 5  # never more than the rows


# The MoE dispatch calls gmm inside shard_map, rows split over a batch axis and weights over `expert`. There
# megablox used to fail while tracing, on any platform (jax 0.10: its pallas_call outputs declare no varying
# axes). A 2 x 2 mesh: each device has 20 rows of its `data` shard and 2 experts (sizes 3, 0 | 7, 9: an empty
# group and rows past the groups on every device).
SHARDED = (40, 8, 12, [3, 0, 7, 9])


def _sharded_value_and_grads(impl, platforms=None):
    """jitted (loss, (dx, dw)) of sum(gmm(x, w) * d) over shard_map's shards; exported when platforms."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                         devices=jax.devices()[:4])
    kw = {"impl": impl, "interpret": True} if impl == "megablox" and not platforms else {"impl": impl}

    def shard(x, w, sizes, d):
        return jnp.sum(ops.gmm(x, w, sizes, **kw).astype(jnp.float32) * d)[None]

    def loss(x, w, sizes, d):
        specs = (P("data"), P("expert"), P("expert"), P("data"))
        return jax.shard_map(shard, in_specs=specs, out_specs=P(("data", "expert")))(x, w, sizes, d).sum()

    M, K, N, sizes = SHARDED
    fn = jax.jit(jax.value_and_grad(loss, (0, 1)))
    specs = {"x": ((M, K), P("data")), "w": ((len(sizes), K, N), P("expert")), "s": ((len(sizes),), P("expert")),
             "d": ((M, N), P("data"))}
    with jax.set_mesh(mesh):
        if platforms:
            dtypes = {"x": jnp.bfloat16, "w": jnp.bfloat16, "s": jnp.int32, "d": jnp.float32}
            args = [jax.ShapeDtypeStruct(shape, dtypes[k], sharding=jax.sharding.NamedSharding(mesh, spec))
                    for k, (shape, spec) in specs.items()]
            return jax.export.export(fn, platforms=platforms)(*args)
        args = [jax.device_put(a, jax.sharding.NamedSharding(mesh, specs[k][1]))
                for k, a in zip(specs, _inputs(*SHARDED, jnp.float32))]
        loss, grads = fn(*args)
    return np.asarray(loss), tuple(np.asarray(g) for g in grads)


def test_megablox_inside_shard_map_exports_for_tpu():
    assert _sharded_value_and_grads("megablox", platforms=["tpu"]).mlir_module().count("tpu_custom_call") >= 3


def test_megablox_inside_shard_map_matches_the_reference():
    """Interpreted inside shard_map: the weight gradient must be summed over the `data` shards."""
    loss, (dx, dw) = _sharded_value_and_grads("megablox")
    ref_loss, (ref_dx, ref_dw) = _sharded_value_and_grads("reference")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-4, rtol=0)
    np.testing.assert_allclose(dw, ref_dw, atol=1e-4, rtol=0)
