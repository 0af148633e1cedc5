"""kernels/flash_attention: the Pallas kernels (interpret mode on CPU) against the plain-JAX reference, forward
and the gradients w.r.t. q, k and v, driven by layers/masks.py's masks through the attention entry point
(impl="pallas": the blockwise schedule's block table, `masks.visible` inside the blocks): causal, window,
sinks, chunk and block-sparse masks, packed documents (with the run-time anchor blocks), GQA, T not a
multiple of the block, bf16 inputs. Outputs start as NaN in interpret mode (checked once, in
test_linear_attention_kernel.py::test_interpret_mode_poisons_outputs), so an element
the kernels leave unwritten fails the comparison; key blocks outside the table hold NaN in one test, so a
block that was computed and then masked would fail it. The CUDA (Triton) lowering of forward and
backward is exported on CPU.

Each default test compiles one program (the interpreted kernels cost seconds of XLA time on 2 cores):
shapes are tiny, and the wider sweeps (more masks, the hypothesis property test) are marked slow."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from effax.kernels.flash_attention import kernel, ops, reference
from effax.layers.attention import BlockSparse, Mask, attention, reference_attention
from effax.layers.masks import document_offsets_BT, visible

P = 16


def _inputs(B, T, H, K, *, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # numpy: no eager jax ops to compile one by one
    q, k, v, do = (rng.standard_normal(s) for s in ((B, T, H, P), (B, T, K, P), (B, T, K, P), (B, T, H, P)))
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(do, jnp.float32)


def _segments(B, T, documents):
    """Row 0 packs `documents` (lengths); the other rows are one document each (still the packed path)."""
    if documents is None:
        return None
    ids = np.repeat(np.arange(1, len(documents) + 1), documents)[:T]
    return jnp.asarray(np.stack([ids] + [np.full(T, 7)] * (B - 1)), jnp.int32)


def _outputs_and_grads(fn, arrays, do):
    """(out, dq, dk, dv) of <out, do> in one jitted program, as fp32 numpy."""
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, *vjp(do.astype(out.dtype))

    return [np.asarray(x, np.float32) for x in jax.jit(run)(*arrays)]


def _pallas(mask):
    return lambda q, k, v: attention(q, k, v, mask=mask, impl="pallas")


def _reference(mask):
    """kernels/flash_attention/reference.py with the primitives the layer passes the kernel."""
    seg = mask.segment_ids_BT
    rule = functools.partial(visible, dataclasses.replace(mask, segment_ids_BT=None))
    return lambda q, k, v: reference.attention(q, k, v, visible=rule, segment_ids_BT=seg,
                                               offsets_BT=None if seg is None else document_offsets_BT(seg))


NAMES = ["out", "dq", "dk", "dv"]


def _assert_close(got, want, tol, *, rms=False):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and np.isfinite(a).all(), name
        if rms:
            err = np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-6)
        else:
            err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)
        assert err <= tol, (name, err)


def _check(mask_fields, B, T, H, K, documents=None, *, dtype=jnp.float32, seed=0):
    arrays, do = _inputs(B, T, H, K, seed=seed, dtype=dtype)
    mask = Mask(**mask_fields, segment_ids_BT=_segments(B, T, documents))
    got = _outputs_and_grads(_pallas(mask), arrays, do)
    want = _outputs_and_grads(_reference(mask), arrays, do)
    if dtype == jnp.float32:
        _assert_close(got, want, 1e-5)
        # the layer's own oracle writes the mask out field by field: the primitives the kernel gets are the mask
        oracle = np.asarray(jax.jit(lambda *a: reference_attention(*a, mask=mask))(*arrays))
        assert np.max(np.abs(got[0] - oracle)) <= 1e-5 * np.max(np.abs(oracle))
    else:
        _assert_close(got, want, 5e-3, rms=True)


CASES = {  # mask fields, B, T, H, K, packed document lengths of row 0 (None: no segment ids)
    "packed documents, window + sinks (anchor blocks), GQA, T % 16 != 0": (dict(window=12, sinks=3), 2, 40, 4, 2, [13, 27]),
    "block-sparse local + global + strided, MQA": (dict(block_sparse=BlockSparse(16, 2, 1, 3)), 1, 64, 2, 1, None),
}


@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_reference_fp32(case):
    _check(*CASES[case])


def test_pallas_bf16_inputs_fp32_accumulation():
    _check(dict(chunk=24), 1, 48, 2, 2, dtype=jnp.bfloat16, seed=1)


SLOW_CASES = {
    "causal, one document per row, MHA": (dict(), 2, 50, 2, 2, None),
    "packed documents, chunk": (dict(chunk=20), 2, 64, 2, 1, [30, 10, 24]),
    "packed documents, block-sparse with global blocks (anchors)": (dict(block_sparse=BlockSparse(16, 1, 1, 0)), 1, 64, 2, 2, [20, 44]),
    "bidirectional window": (dict(causal=False, window=9), 1, 40, 2, 1, None),
    "bidirectional block-sparse (global rows)": (dict(causal=False, block_sparse=BlockSparse(16, 1, 1, 0)), 1, 64, 2, 2, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_pallas_matches_reference_more_masks(case):
    _check(*SLOW_CASES[case])


def test_skipped_blocks_are_never_read_and_empty_rows_give_zeros():
    """Through the op with a rule that hides key block 0 from every query and leaves the first 8 rows without
    keys: key block 0 holds NaN (a block computed and then masked would spread it: 0 * NaN), rows without
    keys output zeros. The rest matches the reference, whose v has zeros there. Then dispatch and errors."""
    arrays, _ = _inputs(1, 40, 2, 1)
    q, k, v = arrays
    rule = lambda i, j: (j >= 16) & (j <= i) & (i >= 8)  # noqa: E731
    k_nan, v_nan = (x.at[:, :16].set(jnp.nan) for x in (k, v))
    out = np.asarray(jax.jit(lambda *a: ops.flash_attention(*a, visible=rule, block_q=16, block_k=16, impl="pallas"))(q, k_nan, v_nan))
    reference_fn = jax.jit(lambda *a: reference.attention(*a, visible=rule))
    want = np.asarray(reference_fn(q, k.at[:, :16].set(0), v.at[:, :16].set(0)))
    assert np.isfinite(out).all() and not out[:, :16].any()  # rows 0..15 see nothing: zeros
    assert np.max(np.abs(out - want)) <= 1e-5 * np.max(np.abs(want))
    auto = jax.jit(lambda *a: ops.flash_attention(*a, visible=rule))  # auto on CPU: the xla reference
    np.testing.assert_array_equal(np.asarray(auto(q, k, v)), np.asarray(reference_fn(q, k, v)))
    with pytest.raises(ValueError, match="impl"):
        ops.flash_attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="power of two"):
        ops.flash_attention(q, k, v, block_q=24, impl="pallas")
    with pytest.raises(ValueError, match="offsets_BT"):
        ops.flash_attention(q, k, v, segment_ids_BT=jnp.zeros((1, 40), jnp.int32), impl="pallas")
    with pytest.raises(NotImplementedError, match="Mask.spans"):
        from effax.layers.masks import Spans

        attention(q, q, q, mask=Mask(spans=Spans(((4, 4),), ((0.5, 0.5),))), impl="pallas")


TABLE = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)


def test_block_lists_follow_the_table():
    """The loops' lists hold exactly the table's blocks, forward (key blocks per query block) and transposed,
    the fully visible ones first (counts: full, all); the rule's tables on token indices."""
    full = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]], bool)
    kblocks, kcount, qblocks, qcount = ops._static_lists(TABLE, full)
    for lists, count, t, f in ((kblocks, kcount, TABLE, full), (qblocks, qcount, TABLE.T, full.T)):
        for r, (row, row_full) in enumerate(zip(t, f)):
            assert list(lists[0, r, : count[0, r, 1]]) == list(np.flatnonzero(row_full)) + list(np.flatnonzero(row & ~row_full))
            assert count[0, r, 0] == row_full.sum()
    some, full = ops._rule_tables(lambda i, j: (j <= i) & (i - j < 20), 40, 16, 16)  # T = 40: block 2 is partial
    np.testing.assert_array_equal(some, [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(full, [[0, 0, 0], [0, 0, 0], [0, 0, 0]])
    some, full = ops._rule_tables(lambda i, j: j <= i, 64, 16, 16)
    np.testing.assert_array_equal(full, np.tril(np.ones((4, 4), bool), -1))


@pytest.mark.slow
def test_anchor_blocks_join_the_lists():
    """With packed anchors, each query block's list is the run-time union with its document start's blocks
    (the packed fp32 case runs this path end to end)."""
    table = TABLE

    @jax.jit
    def dynamic(seg):
        extra = ops._anchor_blocks(document_offsets_BT(seg), 48, 16, 16, (3, 3), anchor=2)
        return extra, ops._dynamic_lists(table, extra, 2)

    extra, (kblocks, kcount, *_) = dynamic(jnp.asarray([[1] * 5 + [2] * 43]))  # the second document starts at token 5
    np.testing.assert_array_equal(np.asarray(extra[0]), [[1, 0, 0]] * 3)  # tokens 5, 6 lie in key block 0
    assert [list(np.asarray(kblocks[0, r, : kcount[0, r, 1]])) for r in range(3)] == [[0], [0, 1], [0, 1, 2]]


def test_cuda_lowering_exports_on_cpu(monkeypatch):
    """Forward and backward lower to Triton for CUDA (block shapes that cannot compile fail here), through the
    layer's path, T = 200 (blocks of 64, padded), bf16: packed documents with anchor blocks (the run-time
    lists), and a strided block-sparse mask (static lists with fully visible blocks: the lax.cond). On CPU
    the op would pick interpret mode; the export wants the GPU lowering, so it is switched off."""
    monkeypatch.setattr(ops, "flash_attention", functools.partial(ops.flash_attention, interpret=False))
    B, T, H, K, dtype = 1, 200, 4, 2, jnp.bfloat16
    mask = lambda seg: Mask(window=100, sinks=4, segment_ids_BT=seg)  # noqa: E731
    sparse = Mask(block_sparse=BlockSparse(64, 2, 1, 3))
    loss = lambda q, k, v, seg: jnp.sum((attention(q, k, v, mask=mask(seg), impl="pallas")  # noqa: E731
                                         + attention(q, k, v, mask=sparse, impl="pallas")).astype(jnp.float32))
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, T, H, P), (B, T, K, P), (B, T, K, P))]
    args.append(jax.ShapeDtypeStruct((B, T), jnp.int32))
    safety = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    export = lambda f: jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=safety)(*args).mlir_module()  # noqa: E731
    module = export(jax.grad(loss, argnums=(0, 1, 2)))
    assert all(module.count(f'name = "flash_attention_{n}"') == 2 for n in ("fwd", "dq", "dkdv"))
    assert "__gpu$xla.gpu.triton" in module  # Triton, not Mosaic GPU
    # the forward alone: no backward kernels
    module = export(lambda q, k, v, seg: attention(q, k, v, mask=sparse, impl="pallas"))
    assert 'name = "flash_attention_fwd"' in module and "flash_attention_dq" not in module


def _splash_case():
    B, T, H, K = 2, 40, 4, 2
    seg = _segments(B, T, [13, 27])
    rule = lambda i, j: (j <= i) & (i - j < 12)  # noqa: E731  causal + window: the same on indices and offsets
    return _inputs(B, T, H, K), dict(visible=rule, segment_ids_BT=seg, offsets_BT=document_offsets_BT(seg))


@pytest.mark.slow
def test_splash_matches_reference():
    """The TPU path (JAX's splash attention, interpret mode on CPU): packed rows, a window, GQA; fp32."""
    (arrays, do), prims = _splash_case()
    got = _outputs_and_grads(lambda q, k, v: ops.flash_attention(q, k, v, index_rule=True, impl="splash", **prims), arrays, do)
    want = _outputs_and_grads(lambda q, k, v: reference.attention(q, k, v, **prims), arrays, do)
    _assert_close(got, want, 1e-5)


@pytest.mark.slow
def test_tpu_lowering_exports_on_cpu():
    """On TPU the op is splash attention: forward and backward lower for TPU on CPU (bf16, P = 128, T = 200
    padded to 256, packed rows); packed rows with a per-document rule are refused."""
    (arrays, _), prims = _splash_case()
    with pytest.raises(NotImplementedError, match="index_rule"):
        ops.flash_attention(*arrays, impl="splash", **prims)
    B, T, H, K = 1, 200, 4, 2
    rule = lambda i, j: (j <= i) & (i - j < 100)  # noqa: E731

    def loss(q, k, v, seg):
        out = ops.flash_attention(q, k, v, visible=rule, segment_ids_BT=seg, offsets_BT=document_offsets_BT(seg),
                                  index_rule=True, impl="splash", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((B, T, H, 128), (B, T, K, 128), (B, T, K, 128))]
    module = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
        *args, jax.ShapeDtypeStruct((B, T), jnp.int32)).mlir_module()
    assert all(f"splash_mqa_{n}_segmented" in module for n in ("fwd", "dq", "dkv"))


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
@given(T=st.integers(2, 64), block=st.sampled_from([16, 32]), grouped=st.booleans(), window=st.sampled_from([None, 5, 17]),
       sinks=st.sampled_from([0, 2]), cuts=st.lists(st.integers(1, 63), max_size=3))
def test_property_any_length_block_mask_and_documents(T, block, grouped, window, sinks, cuts):
    _property(T, block, grouped, window, sinks, cuts)


def _property(T, block, grouped, window, sinks, cuts):
    """T >= 2: with one token every gradient is exactly 0 in the reference (a softmax over one key) and ~1e-7
    from rounding in the kernel, so an error relative to the largest value has no scale."""
    documents = np.diff([0] + sorted({c for c in cuts if c < T}) + [T]).tolist()
    arrays, do = _inputs(1, T, 2, 1 if grouped else 2, seed=T)
    mask = Mask(window=window, sinks=sinks, segment_ids_BT=_segments(1, T, documents) if len(documents) > 1 else None)
    rule = functools.partial(visible, dataclasses.replace(mask, segment_ids_BT=None))
    seg = mask.segment_ids_BT
    prims = dict(visible=rule, segment_ids_BT=seg, offsets_BT=None if seg is None else document_offsets_BT(seg))
    from effax.layers.blockwise import schedule

    table = schedule(mask.static, T, block, block, 1, seg is not None).has_KQK[0]
    got = _outputs_and_grads(lambda q, k, v: ops.flash_attention(q, k, v, blocks_QK=table, anchor=mask.anchor if seg is not None else 0,
                                                                 block_q=block, block_k=block, impl="pallas", **prims), arrays, do)
    want = _outputs_and_grads(lambda q, k, v: reference.attention(q, k, v, **prims), arrays, do)
    _assert_close(got, want, 1e-5)


def test_layer_runs_the_kernel_when_configured():
    """model.attention_impl="pallas" reaches the attention mixer: the kernel (interpret mode) gives the xla
    path's output on packed rows (GQA, a sliding window), to the kernel's fp32 tolerance."""
    from flax import nnx
    from recurrent_testing import filled

    from effax.layers.attention import SlidingWindowAttention
    from effax.layers.mixer import LayerContext
    from effax.models.decoder import DecoderConfig

    T = 40
    seg = jnp.asarray(np.array([[1] * 15 + [2] * 25, [3] * T]), jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, 32)), jnp.float32)
    outs = {}
    for impl in ("xla", "pallas"):
        cfg = DecoderConfig(d_model=32, n_heads=4, n_kv_heads=2, sliding_window=10, attention_impl=impl)
        graphdef, state = nnx.split(filled(lambda: SlidingWindowAttention(cfg, rngs=nnx.Rngs(0))))

        @jax.jit
        def forward(state, x_BTD, seg_BT):
            ctx = LayerContext(positions_BT=jnp.broadcast_to(jnp.arange(T), (2, T)), segment_ids_BT=seg_BT)
            return nnx.merge(graphdef, state)(x_BTD, ctx)

        outs[impl] = np.asarray(forward(state, x, seg))
    assert np.max(np.abs(outs["pallas"] - outs["xla"])) <= 1e-5 * np.max(np.abs(outs["xla"]))
    with pytest.raises(ValueError, match="model.attention_impl"):
        SlidingWindowAttention(dataclasses.replace(cfg, attention_impl="triton"), rngs=nnx.Rngs(0))
