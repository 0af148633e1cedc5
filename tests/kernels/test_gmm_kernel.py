"""kernels/gmm/kernel.py: the Pallas grouped matmul (interpret mode on CPU) against the ragged_dot
reference, forward and both gradients (lhs: gmm against rhs^T; rhs: the tgmm kernel), with M not divisible
by the row tile, empty groups, rows past the groups and bf16 inputs; interpret mode fills outputs with NaN
before a kernel runs (shown below for this kernel), so a row no tile writes fails the comparison; the CUDA
(Triton) lowering of forward and backward is exported on CPU. Shapes are tiny: every case is one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from effax.kernels.gmm import kernel, ops, reference


def _inputs(M, D, F, sizes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no eager jax ops to compile one by one
    x, w, d = rng.standard_normal((M, D)), rng.standard_normal((len(sizes), D, F)), rng.standard_normal((M, F))
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.array(sizes, jnp.int32), jnp.asarray(d, jnp.float32)


def _value_and_grads_fn(fn):
    def run(x, w, sizes, d):
        def loss(x, w):
            out = fn(x, w, sizes)
            return jnp.sum(out.astype(jnp.float32) * d), out

        (_, out), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
        return out, *grads

    return jax.jit(run)  # group sizes are an argument: one compile per shape, whatever the sizes


def _pallas(x, w, sizes):
    return ops.gmm(x, w, sizes, impl="pallas")  # interpret mode off a GPU; row tile 16 at these sizes


def _reference(x, w, sizes):
    return reference.gmm(x.astype(jnp.float32), w.astype(jnp.float32), sizes)


PALLAS, REFERENCE = _value_and_grads_fn(_pallas), _value_and_grads_fn(_reference)


def _check(x, w, sizes, d, tol, rms=False):
    """The kernel's (out, dlhs, drhs) of sum(out * d) against the reference's, and its exact zeros."""
    got = [np.asarray(a, np.float32) for a in PALLAS(x, w, sizes, d)]
    exact = [jnp.asarray(np.asarray(a, np.float32)) for a in (x, w)]  # numpy: the fp32 reference's compile serves bf16
    want = [np.asarray(a, np.float32) for a in REFERENCE(*exact, sizes, d)]
    for name, a, b in zip(["out", "dlhs", "drhs"], got, want):
        assert a.shape == b.shape and np.isfinite(a).all(), name
        if rms:
            err = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2))
        else:
            err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= tol, (name, err)
    out, dx, dw = got
    sizes = np.asarray(sizes)
    assert not out[sizes.sum():].any() and not dx[sizes.sum():].any()  # rows in no group: exactly 0 out, 0 gradient
    assert not dw[sizes == 0].any()  # empty groups: exactly 0 weight gradient


# M = 37: no multiple of the 16-row tile; D = F = 48: three blocks of 16 along the contraction and the
# output columns (gmm and tgmm); 4 groups. The fp32 cases and the property test share one compile.
M, D, F, E = 37, 48, 48, 4
CASES = {
    "an empty group, rows past the groups": [5, 0, 20, 7],
    "every row in one group": [0, 37, 0, 0],
    "several tiles in one group, empty first and last": [0, 33, 1, 0],
}


@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_reference_fp32(case):
    # fp32, the same products summed in another order: ~1e-7 relative
    _check(*_inputs(M, D, F, CASES[case]), 1e-5)


def test_pallas_bf16_inputs_fp32_accumulation():
    x, w, s, d = _inputs(M, D, F, [9, 0, 14, 10], jnp.bfloat16, seed=1)
    # the reference on the same bf16 values in fp32: only the kernel's bf16 output rounding remains (2^-9)
    _check(x, w, s, d, 5e-3, rms=True)
    dtypes = jax.eval_shape(jax.grad(lambda x, w: _pallas(x, w, s).sum(), (0, 1)), x, w)
    assert jax.eval_shape(_pallas, x, w, s).dtype == dtypes[0].dtype == dtypes[1].dtype == jnp.bfloat16


def test_unscheduled_rows_read_nan_in_interpret_mode():
    """The premise of the comparisons: with the zero tiles of the rows past the groups dropped from the
    schedule, those rows come out NaN (interpret mode poisons outputs), the others as before."""
    x, w, s, _ = _inputs(37, 16, 16, [5, 0, 20])

    def run(x, w, s):
        g_i, row_i, end_i, *rest = kernel.schedule(s, 37, 16)
        end_i = jnp.where(g_i == 3, row_i, end_i)  # group E (past the groups): no tile owns a row
        return kernel._gmm_call(x, w, (g_i, row_i, end_i, *rest), 16, False, True)

    out = np.asarray(jax.jit(run)(x, w, s))
    assert np.isnan(out[25:]).all() and np.isfinite(out[:25]).all()


def test_tm_must_suit_triton():
    x, w, s, _ = _inputs(16, 16, 16, [16])
    with pytest.raises(ValueError, match="power of two >= 16"):
        kernel.gmm(x, w, s, tm=24)


def test_cuda_lowering_exports_on_cpu():
    """Forward (gmm) and backward (gmm against rhs^T, tgmm) lower to Triton for CUDA on CPU, bf16 at the
    GPU's blocks (rows 128, contraction 64, columns 128; F = 352 takes blocks of 32), M = 200 no multiple
    of the tile. (fp32 differs only in the dots' precision.)"""
    x = jax.ShapeDtypeStruct((200, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 256, 352), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((4,), jnp.int32)
    safety = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    both = jax.jit(jax.value_and_grad(lambda x, w, s: kernel.gmm(x, w, s).astype(jnp.float32).sum(), (0, 1)))
    module = jax.export.export(both, platforms=["cuda"], disabled_checks=safety)(x, w, s).mlir_module()
    assert all(f'name = "{n}"' in module for n in ("gmm", "gmm_t", "tgmm"))
    forward = jax.jit(lambda x, w, s: kernel.gmm(x, w, s))
    module = jax.export.export(forward, platforms=["cuda"], disabled_checks=safety)(x, w, s).mlir_module()
    assert 'name = "gmm"' in module and "tgmm" not in module


@settings(max_examples=4, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
@given(sizes=st.lists(st.integers(0, 24), min_size=E, max_size=E), past=st.integers(0, 8))
def test_property_any_group_sizes(sizes, past):
    """Any sizes of the 4 groups (empty ones included) and up to 8 rows past them (one compile for all)."""
    fitted = []
    for v in sizes[:-1]:  # the groups fit in M; the last one ends `past` rows before M (when it can)
        fitted.append(min(v, M - sum(fitted)))
    sizes = fitted + [max(0, M - sum(fitted) - past)]
    _check(*_inputs(M, D, F, sizes, seed=sum(sizes)), 1e-5)


def test_inside_shard_map():
    """The MoE dispatch calls gmm inside shard_map: the kernel's outputs declare the mesh axes they vary
    over, so forward and backward lower for CUDA there; off a GPU (interpret mode, which JAX cannot run in
    shard_map) ops refuses by name instead of failing inside JAX's interpreter. (On a GPU, ops runs the
    compiled kernels and this file tests them.)"""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((2,), ("expert",))
    spec = PartitionSpec("expert")

    def sharded(gmm):
        def f(x, w, s):
            return jax.shard_map(lambda x, w, s: gmm(*ops._same_axes(x, w, s)), mesh=mesh, in_specs=(spec,) * 3,
                                 out_specs=spec)(x, w, s).astype(jnp.float32).sum()

        return f

    shapes = [((256, 128), jnp.bfloat16), ((4, 128, 128), jnp.bfloat16), ((4,), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, spec)) for s, d in shapes]
    safety = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.set_mesh(mesh):
        both = jax.jit(jax.value_and_grad(sharded(lambda x, w, s: kernel.gmm(x, w, s)), (0, 1)))
        module = jax.export.export(both, platforms=["cuda"], disabled_checks=safety)(*args).mlir_module()
        assert all(f'name = "{n}"' in module for n in ("gmm", "gmm_t", "tgmm"))
        if jax.default_backend() != "gpu":  # on a GPU the compiled kernel runs there
            with pytest.raises(ValueError, match="inside shard_map"):
                jax.eval_shape(sharded(lambda x, w, s: ops.gmm(x, w, s, impl="pallas")), *args)


@pytest.mark.slow
def test_dropless_dispatch_through_the_kernel():
    """layers/moe_dispatch.dropless (outside a mesh, so outside shard_map) with impl='pallas' equals the xla
    impl, forward and gradients w.r.t. the tokens, gates and the three expert weights; expert ids >= E (MoE++'s
    zero-computation experts) sort past the groups."""
    from effax.layers import moe_dispatch

    rng = np.random.default_rng(0)
    B, T, Z, Dm, Fm, Em = 2, 8, 2, 16, 32, 4
    x = jnp.asarray(rng.standard_normal((B, T, Dm)), jnp.float32)
    expert = jnp.asarray(rng.integers(0, Em + 1, (B, T, Z)), jnp.int32)  # Em: no expert
    gate = jnp.asarray(rng.uniform(size=(B, T, Z)), jnp.float32)
    w = moe_dispatch.ExpertWeights(*(jnp.asarray(rng.standard_normal(s) / 4, jnp.float32)
                                     for s in [(Em, Dm, Fm), (Em, Dm, Fm), (Em, Fm, Dm)]))

    def run(impl):
        def loss(x, gate, w):
            y = moe_dispatch.dropless(x, expert, gate, w, impl=impl)
            return jnp.sum(y * jnp.cos(y)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(x, gate, w)
        return [np.asarray(a) for a in jax.tree.leaves((y, grads))]

    for got, want in zip(run("pallas"), run("xla")):
        assert np.isfinite(got).all() and np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
