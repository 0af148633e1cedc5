"""kernels/linear_attention: the Pallas kernels (interpret mode on CPU) against the plain-JAX chunked
reference, forward (outputs and final state) and every gradient (q, k, v, log decay, initial state), with
lengths not divisible by the chunk, packed documents, grouped q/k, feature sizes padded to powers of two and
bf16 inputs; outputs start as NaN in interpret mode (checked below), so an element the kernel leaves
unwritten fails the comparison; the CUDA (Triton) lowering of forward and backward is exported on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from effax.kernels.linear_attention import kernel, ops, reference


def _inputs(B, T, K, H, N, P, *, seed=0, dtype=jnp.float32, documents=None, state=True, strong_decay=False):
    rng = np.random.default_rng(seed)  # numpy: no eager jax ops to compile one by one
    q, k = (rng.standard_normal((B, T, K, N)) / np.sqrt(N) for _ in range(2))
    v = rng.standard_normal((B, T, H, P))
    g = -rng.uniform(0.0, 4.0 if strong_decay else 0.5, (B, T, H))
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(g, jnp.float32)]
    seg = None
    if documents is not None:  # document lengths, repeated over the batch (the last row shifted by one)
        ids = np.repeat(np.arange(1, len(documents) + 1), documents)[:T]
        seg = jnp.asarray(np.stack([ids] + [np.concatenate([ids[:1], ids[:-1]])] * (B - 1)), jnp.int32)
    s0 = jnp.asarray(rng.standard_normal((B, H, P, N)), jnp.float32) if state else None
    cotangents = (jnp.asarray(rng.standard_normal((B, T, H, P)), jnp.float32),
                  jnp.asarray(rng.standard_normal((B, H, P, N)), jnp.float32))
    return arrays, seg, s0, cotangents


def _outputs_and_grads(fn, arrays, seg, s0, cotangents):
    """(y, final, grads of <y, dy> + <final, dfinal> w.r.t. q, k, v, g[, s0]) in one jitted program."""
    def run(q, k, v, g, s0):
        out, vjp = jax.vjp(lambda q, k, v, g, s0: fn(q, k, v, g, seg, s0), q, k, v, g, s0)
        return out, vjp(cotangents)

    (y, final), grads = jax.jit(run)(*arrays, s0)
    return [np.asarray(x, np.float32) for x in (y, final, *[g for g in grads if g is not None])]


def _pallas(chunk):
    return lambda q, k, v, g, seg, s0: ops.linear_attention(q, k, v, g, chunk_size=chunk, segment_ids_BT=seg,
                                                            state_BHPN=s0, impl="pallas", interpret=True)


def _xla(chunk):
    return lambda q, k, v, g, seg, s0: reference.chunked(q, k, v, g, chunk_size=chunk, segment_ids_BT=seg, state_BHPN=s0)


NAMES = ["y", "final state", "dq", "dk", "dv", "dlog_decay", "dstate"]


def _assert_close(got, want, tol, *, rms=False):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and np.isfinite(a).all(), name
        if rms:
            err = np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-6)
        else:
            err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)  # some gradients are exactly 0 (T = 1)
        assert err <= tol, (name, err)


CASES = {  # B, T, K, H, N, P, chunk, document lengths, initial state, strong decay
    "packed documents, initial state, grouped q/k, T % chunk != 0": (2, 70, 1, 2, 16, 16, 16, [20, 30, 5, 15], True, False),
    "one document, no state, K = H, padded features, strong decay": (1, 45, 2, 2, 12, 20, 32, None, False, True),
}


@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_reference_fp32(case):
    B, T, K, H, N, P, chunk, documents, state, strong = CASES[case]
    arrays, seg, s0, cot = _inputs(B, T, K, H, N, P, documents=documents, state=state, strong_decay=strong)
    got = _outputs_and_grads(_pallas(chunk), arrays, seg, s0, cot)
    want = _outputs_and_grads(_xla(chunk), arrays, seg, s0, cot)
    _assert_close(got, want, 1e-5)


def test_pallas_bf16_inputs_fp32_accumulation():
    arrays, seg, s0, cot = _inputs(1, 50, 1, 2, 16, 16, dtype=jnp.bfloat16, documents=[30, 20], seed=1)
    got = _outputs_and_grads(_pallas(16), arrays, seg, s0, cot)
    want = _outputs_and_grads(_xla(16), arrays, seg, s0, cot)
    _assert_close(got, want, 5e-3, rms=True)


def test_interpret_mode_poisons_outputs():
    """The premise of the comparisons above: an output element a kernel never writes reads NaN."""
    def half(x_ref, o_ref):
        o_ref[:8] = x_ref[:8]

    out = jax.experimental.pallas.pallas_call(half, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                                              interpret=True)(jnp.ones(16, jnp.float32))
    assert np.isfinite(out[:8]).all() and np.isnan(out[8:]).all()


def test_dispatch():
    arrays, seg, s0, _ = _inputs(1, 8, 1, 2, 16, 16, documents=[3, 5])
    y, final = jax.jit(lambda *a: ops.linear_attention(*a, chunk_size=4, segment_ids_BT=seg, state_BHPN=s0))(*arrays)
    y_ref, final_ref = jax.jit(lambda *a: _xla(4)(*a, seg, s0))(*arrays)  # auto on CPU is the XLA path
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(final, final_ref)
    # the pallas forward outside differentiation (it skips the residual states)
    y, final = jax.jit(lambda *a: _pallas(16)(*a, seg, s0))(*arrays)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
    np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-5 * np.abs(final_ref).max())
    with pytest.raises(ValueError, match="impl"):
        ops.linear_attention(*arrays, impl="triton")
    with pytest.raises(ValueError, match="power of two"):
        kernel.linear_attention(*arrays, chunk_size=24)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_lowering_exports_on_cpu(dtype):
    """Forward and backward lower to Triton for CUDA (block shapes that cannot compile fail here)."""
    B, T, K, H, N, P = 1, 200, 1, 2, 16, 24

    def loss(q, k, v, g, seg, s0):
        y, final = kernel.linear_attention(q, k, v, g, segment_ids_BT=seg, state_BHPN=s0)  # chunk 64
        return jnp.sum(y) + jnp.sum(final)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 5))
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((B, T, K, N), dtype), ((B, T, K, N), dtype), ((B, T, H, P), dtype),
                                                   ((B, T, H), jnp.float32), ((B, T), jnp.int32), ((B, H, P, N), jnp.float32)]]
    safety = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=safety)(*args).mlir_module()
    assert 'name = "linear_attention_fwd"' in module and 'name = "linear_attention_bwd"' in module
    forward = jax.jit(lambda *a: kernel.linear_attention(*a[:4], segment_ids_BT=a[4], state_BHPN=a[5]))
    module = jax.export.export(forward, platforms=["cuda"], disabled_checks=safety)(*args).mlir_module()
    assert 'name = "linear_attention_fwd"' in module and 'name = "linear_attention_bwd"' not in module


@settings(max_examples=3, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
@given(T=st.integers(1, 70), chunk=st.sampled_from([16, 32, 64]), grouped=st.booleans(), state=st.booleans(),
       cuts=st.lists(st.integers(1, 69), max_size=4))
def test_property_any_length_chunk_and_documents(T, chunk, grouped, state, cuts):
    documents = np.diff([0] + sorted({c for c in cuts if c < T}) + [T]).tolist()
    arrays, seg, s0, cot = _inputs(1, T, 1 if grouped else 2, 2, 16, 16, documents=documents, state=state, seed=T)
    got = _outputs_and_grads(_pallas(chunk), arrays, seg, s0, cot)
    want = _outputs_and_grads(_xla(chunk), arrays, seg, s0, cot)
    _assert_close(got, want, 1e-5)


def test_layers_run_the_kernel_when_configured(monkeypatch):
    """model.linear_attention_impl reaches Mamba2 and Based: the Pallas kernel (interpret mode) gives the
    layers' xla output on packed rows, to the kernel's fp32 tolerance (relative to the output's scale)."""
    import dataclasses

    from flax import nnx
    from recurrent_testing import TINY, close, fast, filled

    from effax.layers.mixer import LayerContext
    from effax.models.hybrid import Hybrid

    T = 20
    seg = jnp.asarray(np.array([[1] * 7 + [2] * 13, [3] * T]), jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, TINY.d_model)), jnp.float32)
    calls = []  # the kernel's entry point, counted: the pallas run must reach it from both layers
    real = kernel.linear_attention
    monkeypatch.setattr(kernel, "linear_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for impl in ("xla", "pallas"):
        cfg = dataclasses.replace(TINY, n_layers=2, pattern=("mamba2", "based+none"), chunk_size=16, linear_attention_impl=impl)
        mixers = []  # each layer's mixer, its [R = 1] axis dropped (as recurrent_testing.mixers does)
        for group in filled(lambda: Hybrid(cfg, rngs=nnx.Rngs(0))).blocks:
            gdef, st = nnx.split(group.layers[0].mixer)
            mixers.append(nnx.merge(gdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[0]), st)))
        graphdef, state = nnx.split(mixers)

        @fast
        @jax.jit
        def forward(state, x_BTD, seg_BT):
            ctx = LayerContext(positions_BT=jnp.broadcast_to(jnp.arange(T), (2, T)), segment_ids_BT=seg_BT)
            return [mixer(x_BTD, ctx) for mixer in nnx.merge(graphdef, state)]

        outs[impl] = [np.asarray(y) for y in forward(state, x, seg)]
    assert len(calls) == 2  # Mamba2 and Based, traced once each in the pallas run, never in the xla run
    for got, want in zip(outs["pallas"], outs["xla"]):
        close(got, want)
