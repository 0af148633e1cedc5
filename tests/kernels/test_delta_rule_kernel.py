"""kernels/delta_rule: the gated DeltaNet Pallas kernels (interpret mode on CPU) against the plain-JAX chunked
reference, forward (outputs and final state) and every gradient (q, k, v, beta, log decay, initial state),
with lengths not divisible by the chunk, packed documents, feature sizes padded to powers of two and bf16
inputs; interpret mode fills outputs with NaN before a kernel runs (checked in
test_linear_attention_kernel.py), so an element the kernel leaves unwritten fails the comparison; the CUDA
(Triton) lowering of forward and backward is exported on CPU. The reference's agreement with the recurrence
and the quadratic form is tested in tests/layers/test_delta_rule.py.

Compiles are what these tests pay for (each interpret-mode gradient ~3 s on 2 idle cores): the default cases
are few and tiny, the bf16 case reuses the fp32 case's reference run (its inputs are bf16 values), and the
wider sweeps are marked slow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from effax.kernels.delta_rule import kernel, ops, reference


def _inputs(B, T, H, N, P, *, seed=0, documents=None, state=True, strong_decay=False):
    """fp32 arrays holding bf16 values (so one reference run serves the fp32 and the bf16 kernel runs); q, k
    L2-normalised as the layer feeds them (q also scaled by 1/sqrt(N))."""
    rng = np.random.default_rng(seed)  # numpy: no eager jax ops to compile one by one
    q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in rng.standard_normal((2, B, T, H, N)))
    q = q / np.sqrt(N)
    v = rng.standard_normal((B, T, H, P))
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H))))
    g = -rng.uniform(0.0, 4.0 if strong_decay else 0.5, (B, T, H))
    bf16 = lambda x: jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32)  # noqa: E731
    arrays = [bf16(x) for x in (q, k, v)] + [jnp.asarray(x, jnp.float32) for x in (beta, g)]
    seg = None
    if documents is not None:  # document lengths, repeated over the batch (the last row shifted by one)
        ids = np.repeat(np.arange(1, len(documents) + 1), documents)[:T]
        seg = jnp.asarray(np.stack([ids] + [np.concatenate([ids[:1], ids[:-1]])] * (B - 1)), jnp.int32)
    s0 = jnp.asarray(rng.standard_normal((B, H, P, N)), jnp.float32) if state else None
    cotangents = (jnp.asarray(rng.standard_normal((B, T, H, P)), jnp.float32),
                  jnp.asarray(rng.standard_normal((B, H, P, N)), jnp.float32))
    return arrays, seg, s0, cotangents


def _outputs_and_grads(fn, arrays, seg, s0, cotangents):
    """(y, final, grads of <y, dy> + <final, dfinal> w.r.t. q, k, v, beta, g[, s0]) in one jitted program."""
    def run(q, k, v, beta, g, s0):
        out, vjp = jax.vjp(lambda q, k, v, beta, g, s0: fn(q, k, v, beta, g, seg, s0), q, k, v, beta, g, s0)
        return out, vjp(cotangents)

    (y, final), grads = jax.jit(run)(*arrays, s0)
    return [np.asarray(x, np.float32) for x in (y, final, *[g for g in grads if g is not None])]


def _pallas(chunk, block_p=64):
    return lambda q, k, v, beta, g, seg, s0: kernel.delta_rule(q, k, v, beta, g, chunk_size=chunk, segment_ids_BT=seg,
                                                               state_BHPN=s0, block_p=block_p, interpret=True)


def _xla(chunk):
    return lambda q, k, v, beta, g, seg, s0: reference.chunked(q, k, v, beta, g, chunk_size=chunk, segment_ids_BT=seg,
                                                               state_BHPN=s0)


NAMES = ["y", "final state", "dq", "dk", "dv", "dbeta", "dlog_decay", "dstate"]


def _assert_close(got, want, tol, *, rms=False):
    assert len(got) == len(want)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and np.isfinite(a).all(), name
        if rms:
            err = np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-6)
        else:
            err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)  # some gradients are exactly 0 (T = 1)
        assert err <= tol, (name, err)


CASES = {  # B, T, H, N, P, chunk, document lengths, initial state, strong decay, block_p
    # the default case: T % chunk != 0, documents starting mid-chunk and on a chunk boundary (16), a state,
    # N and P padded to 16 and 32, the value columns split over two programs (the second mostly padding)
    "packed documents, initial state, padded features, two value blocks, T % chunk != 0":
        (2, 45, 2, 12, 20, 16, [10, 6, 20, 9], True, False, 16),
    "one document, no state, strong decay, chunk 32": (1, 70, 2, 16, 16, 32, None, False, True, 64),
    "chunk 64, two partial chunks' worth of documents": (1, 150, 1, 32, 32, 64, [40, 50, 60], True, False, 64),
}
DEFAULT = next(iter(CASES))


@functools.cache
def _reference(case):
    B, T, H, N, P, chunk, documents, state, strong, _ = CASES[case]
    arrays, seg, s0, cot = _inputs(B, T, H, N, P, documents=documents, state=state, strong_decay=strong)
    return _outputs_and_grads(_xla(chunk), arrays, seg, s0, cot)


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == DEFAULT else pytest.mark.slow) for c in CASES])
def test_pallas_matches_reference_fp32(case):
    B, T, H, N, P, chunk, documents, state, strong, block_p = CASES[case]
    arrays, seg, s0, cot = _inputs(B, T, H, N, P, documents=documents, state=state, strong_decay=strong)
    _assert_close(_outputs_and_grads(_pallas(chunk, block_p), arrays, seg, s0, cot), _reference(case), 1e-5)


def test_pallas_bf16_inputs_fp32_accumulation():
    """q, k, v in bf16 (the reference upcasts the same values: its fp32 run is the oracle)."""
    B, T, H, N, P, chunk, documents, state, strong, block_p = CASES[DEFAULT]
    arrays, seg, s0, cot = _inputs(B, T, H, N, P, documents=documents, state=state, strong_decay=strong)
    arrays = [a.astype(jnp.bfloat16) for a in arrays[:3]] + arrays[3:]
    got = _outputs_and_grads(_pallas(chunk, block_p), arrays, seg, s0, cot)
    _assert_close(got, _reference(DEFAULT), 5e-3, rms=True)


@pytest.mark.parametrize("Q", [16, 64])
def test_blocked_inverse(Q):
    """The kernel's (I + A)^-1 by doubling blocks: exact where a truncated Neumann series cancels (identical
    keys, beta = 1, no decay: A all ones below the diagonal, the inverse bidiagonal), and a random case."""
    rng = np.random.default_rng(Q)
    inverse = jax.jit(lambda A: kernel._inverse(A, Q, jax.lax.Precision.HIGHEST))
    for A in (np.tril(np.ones((Q, Q)), -1), np.tril(rng.uniform(-1, 1, (Q, Q)), -1)):
        want = np.linalg.inv(np.eye(Q) + A)
        assert np.max(np.abs(np.asarray(inverse(jnp.asarray(A, jnp.float32))) - want)) <= 1e-5 * np.max(np.abs(want))


def test_dispatch():
    """auto is the XLA path (the same program, traced only); the pallas forward outside differentiation (no
    residual states, no segment ids: the prefill path) matches it; bad impl and chunk sizes are refused."""
    arrays, _, s0, _ = _inputs(1, 20, 2, 16, 16)
    auto = jax.make_jaxpr(lambda *a: ops.delta_rule(*a, chunk_size=16, state_BHPN=s0))(*arrays)
    assert str(auto) == str(jax.make_jaxpr(lambda *a: _xla(16)(*a, None, s0))(*arrays))
    y_ref, final_ref = jax.jit(lambda *a: _xla(16)(*a, None, s0))(*arrays)
    pallas = lambda *a: ops.delta_rule(*a, chunk_size=16, state_BHPN=s0, impl="pallas", interpret=True)  # noqa: E731
    y, final = jax.jit(pallas)(*arrays)
    for got, want in ((y, y_ref), (final, final_ref)):
        assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= 1e-5 * np.max(np.abs(want))
    with pytest.raises(ValueError, match="impl"):
        ops.delta_rule(*arrays, impl="triton")
    with pytest.raises(ValueError, match="chunk_size=24 must be a power of two"):
        kernel.delta_rule(*arrays, chunk_size=24)
    with pytest.raises(ValueError, match="block_p=48 must be a power of two"):
        kernel.delta_rule(*arrays, block_p=48)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_lowering_exports_on_cpu(dtype):
    """Forward and backward lower to Triton for CUDA (block shapes that cannot compile fail here); P = 72 pads
    to two value blocks of 64."""
    B, T, H, N, P = 1, 200, 2, 16, 72

    def loss(q, k, v, beta, g, seg, s0):
        y, final = kernel.delta_rule(q, k, v, beta, g, segment_ids_BT=seg, state_BHPN=s0)  # chunk 64
        return jnp.sum(y) + jnp.sum(final)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 6))
    args = [jax.ShapeDtypeStruct(s, d) for s, d in [((B, T, H, N), dtype), ((B, T, H, N), dtype), ((B, T, H, P), dtype),
                                                   ((B, T, H), jnp.float32), ((B, T, H), jnp.float32),
                                                   ((B, T), jnp.int32), ((B, H, P, N), jnp.float32)]]
    safety = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=safety)(*args).mlir_module()
    assert 'name = "delta_rule_fwd"' in module and 'name = "delta_rule_bwd"' in module
    forward = jax.jit(lambda *a: kernel.delta_rule(*a[:5], segment_ids_BT=a[5], state_BHPN=a[6]))
    module = jax.export.export(forward, platforms=["cuda"], disabled_checks=safety)(*args).mlir_module()
    assert 'name = "delta_rule_fwd"' in module and 'name = "delta_rule_bwd"' not in module


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
@given(T=st.integers(1, 70), chunk=st.sampled_from([16, 32, 64]), block_p=st.sampled_from([16, 32]),
       state=st.booleans(), cuts=st.lists(st.integers(1, 69), max_size=4))
def test_property_any_length_chunk_and_documents(T, chunk, block_p, state, cuts):
    documents = np.diff([0] + sorted({c for c in cuts if c < T}) + [T]).tolist()
    arrays, seg, s0, cot = _inputs(1, T, 2, 16, 32, documents=documents, state=state, seed=T)
    got = _outputs_and_grads(_pallas(chunk, block_p), arrays, seg, s0, cot)
    want = _outputs_and_grads(_xla(chunk), arrays, seg, s0, cot)
    _assert_close(got, want, 1e-5)


def test_gdn_layer_runs_the_kernel_when_configured(monkeypatch):
    """model.linear_attention_impl reaches GatedDeltaNet: the Pallas kernel (interpret mode) gives the layer's
    xla output on packed rows, to the kernel's fp32 tolerance (relative to the output's scale)."""
    import dataclasses

    from flax import nnx
    from recurrent_testing import TINY, close, fast, filled

    from effax.layers.mixer import LayerContext
    from effax.models.hybrid import Hybrid

    T = 20
    seg = jnp.asarray(np.array([[1] * 7 + [2] * 13, [3] * T]), jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, TINY.d_model)), jnp.float32)
    calls = []  # the kernel's entry point, counted: the pallas run must reach it
    real = kernel.delta_rule
    monkeypatch.setattr(kernel, "delta_rule", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for impl in ("xla", "pallas"):
        cfg = dataclasses.replace(TINY, n_layers=1, pattern=("gdn",), chunk_size=16, linear_attention_impl=impl)
        group = filled(lambda: Hybrid(cfg, rngs=nnx.Rngs(0))).blocks[0]
        gdef, state = nnx.split(group.layers[0].mixer)  # its [R = 1] axis dropped (as recurrent_testing.mixers does)
        mixer = nnx.merge(gdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[0]), state))
        graphdef, state = nnx.split(mixer)

        @fast
        @jax.jit
        def forward(state, x_BTD, seg_BT):
            ctx = LayerContext(positions_BT=jnp.broadcast_to(jnp.arange(T), (2, T)), segment_ids_BT=seg_BT)
            return nnx.merge(graphdef, state)(x_BTD, ctx)

        outs[impl] = np.asarray(forward(state, x, seg))
    assert len(calls) == 1  # traced once in the pallas run, never in the xla run
    close(outs["pallas"], outs["xla"])
    from effax.models.registry import ConfigError

    with pytest.raises(ConfigError, match="model.linear_attention_impl=pallas needs model.chunk_size a power of two"):
        dataclasses.replace(TINY, n_layers=1, pattern=("gdn",), chunk_size=24, linear_attention_impl="pallas").validate()
