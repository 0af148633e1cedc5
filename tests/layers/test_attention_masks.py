"""Every Mask field: its definition checked pair by pair, and every impl against `reference_attention`
(forward and gradients) on packed documents of lengths that are not multiples of the blocks, with rows
that see no key. Impls that cannot honour a field raise naming it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_testing import compiled
from effax.layers.attention import BlockSparse, Mask, Spans, _key_spans, _xla_attention, attention, reference_attention
from effax.layers.blockwise import blockwise_attention
from effax.layers.masks import document_offsets_BT

B, T, H, K, P = 2, 37, 4, 2, 8  # T = 37: no block size below divides it
BLOCKS = (8, 4)  # query, key blocks: several of each, not aligned with the documents
# Row 0: documents of 20 and 17 tokens; row 1: 5, 9 and 23 (so documents start mid-block).
SEGMENTS = np.array([[0] * 20 + [1] * 17, [3] * 5 + [4] * 9 + [7] * 23], np.int32)
# Per layer and head; head 1 of layer 0 has alpha = -8: its queries before offset 15 see no key.
SPANS = Spans(alpha=((3, -8, 0, 2), (1, 1, 1, 1)), beta=((0.25, 0.5, 0.125, 0.0), (0.0, 0.0, 0.0, 1.0)))

MASKS = {
    "window": dict(window=5),
    "chunk": dict(chunk=6),
    "chunk_bidirectional": dict(causal=False, chunk=6),
    "sinks_window": dict(sinks=3, window=4),
    "sinks_chunk": dict(sinks=2, chunk=5),
    "block_sparse": dict(block_sparse=BlockSparse(3, local_blocks=2, global_blocks=1, stride_blocks=3)),
    "block_sparse_bidirectional": dict(causal=False, block_sparse=BlockSparse(3, local_blocks=1, global_blocks=1, stride_blocks=2)),
    "spans": dict(spans=SPANS),
    "spans_layer1_sinks": dict(spans=SPANS, sinks=2, layer=1),
}


def _mask(name, packed=True):
    return Mask(**MASKS[name], segment_ids_BT=jnp.asarray(SEGMENTS) if packed else None)


def _allowed_by_loops(fields, segments):
    """The Mask docstring's rule, one (query, key, head) at a time, on offsets within each document."""
    causal, window, chunk = fields.get("causal", True), fields.get("window"), fields.get("chunk")
    sinks, bs, spans, layer = fields.get("sinks", 0), fields.get("block_sparse"), fields.get("spans"), fields.get("layer", 0)
    rows, n = segments.shape
    out = np.zeros((rows, H, n, n), bool)
    for b in range(rows):
        start = [max(t for t in range(i + 1) if t == 0 or segments[b][t] != segments[b][t - 1]) for i in range(n)]
        for h in range(H):
            for i in range(n):
                for j in range(n):
                    oi, oj = i - start[i], j - start[j]
                    local = True
                    if window is not None:
                        local &= oi - oj < window
                    if chunk is not None:
                        local &= oi // chunk == oj // chunk
                    if spans is not None:
                        local &= oi - oj < spans.alpha[layer][h] + spans.beta[layer][h] * (oi + 1)
                    if bs is not None:
                        bi, bj = oi // bs.block_size, oj // bs.block_size
                        local &= (abs(bi - bj) < bs.local_blocks or bj < bs.global_blocks
                                  or (not causal and bi < bs.global_blocks)
                                  or (bs.stride_blocks > 0 and (bi - bj) % bs.stride_blocks == 0))
                    out[b, h, i, j] = segments[b][i] == segments[b][j] and (not causal or oj <= oi) and (oj < sinks or local)
    return out


@pytest.mark.parametrize("name", MASKS)
def test_masks_follow_the_definition(name):
    """Mask.allowed_BHTS (what the xla impl uses) against the rule written as loops; the oracle writes its
    own mask, and the tests below compare it with the xla impl, so a pattern that differs fails there."""
    want = _allowed_by_loops(MASKS[name], SEGMENTS)
    np.testing.assert_array_equal(np.broadcast_to(_mask(name).allowed_BHTS(T, H), want.shape), want)


def test_rows_without_keys_give_zeros():
    empty_BHT = ~_allowed_by_loops(MASKS["spans"], SEGMENTS).any(-1)
    assert empty_BHT.any() and not empty_BHT.all()
    out_BTHP = np.asarray(_reference("spans", True)[0])
    np.testing.assert_array_equal(out_BTHP.transpose(0, 2, 1, 3)[empty_BHT], 0.0)


def test_document_offsets_restart_per_document():
    np.testing.assert_array_equal(document_offsets_BT(jnp.asarray(SEGMENTS))[1, :16],
                                  list(range(5)) + list(range(9)) + [0, 1])


def _qkv(dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, P))
    k = jax.random.normal(kk, (B, T, K, P))
    v = jax.random.normal(kv, (B, T, K, P))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


COTANGENT = jax.random.normal(jax.random.key(9), (B, T, H, P))


def _output_and_grads(fn, mask, q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return (out, *vjp(COTANGENT))


def _blockwise(q, k, v, mask):
    return blockwise_attention(q, k, v, mask=mask, scale=P ** -0.5, block_q=BLOCKS[0], block_k=BLOCKS[1])


@functools.cache
def _blockwise_program(static, packed):
    """One compiled forward+backward per static mask; masks that differ only in segment ids share it."""
    args = (Mask(*static, segment_ids_BT=jnp.asarray(SEGMENTS) if packed else None), *_qkv())
    return compiled(functools.partial(_output_and_grads, _blockwise), *args)


@functools.cache
def _xla_spans_program(static, packed):
    """One compiled program per static mask, as for blockwise (eagerly, each span's shapes would compile op by op)."""
    args = (Mask(*static, segment_ids_BT=jnp.asarray(SEGMENTS) if packed else None), *_qkv())
    spans = lambda q, k, v, mask: _xla_attention(q, k, v, mask, P ** -0.5, BLOCKS[0])  # noqa: E731
    return compiled(functools.partial(_output_and_grads, spans), *args)


IMPLS = {  # the reference and xla run eagerly (cheap after the first call); blockwise is one compile per mask
    "reference": functools.partial(_output_and_grads, lambda q, k, v, mask: reference_attention(q, k, v, mask=mask)),
    "xla": functools.partial(_output_and_grads, lambda q, k, v, mask: attention(q, k, v, mask=mask, impl="xla")),
    "blockwise": lambda mask, *qkv: _blockwise_program(mask.static, mask.segment_ids_BT is not None)(mask, *qkv),
    # The xla impl as on CPU at long T: each query block over its key span (`attention` passes blocks of 64+).
    "xla_spans": lambda mask, *qkv: _xla_spans_program(mask.static, mask.segment_ids_BT is not None)(mask, *qkv),
}


@functools.cache
def _reference(name, packed):
    return IMPLS["reference"](_mask(name, packed), *_qkv())


# Blockwise paths: static block masks (window), the anchor pass (sinks, global blocks of packed
# documents), run-time rules (chunk, block-sparse and spans of packed documents; spans always),
# non-causal, global rows (unpacked), and a spans plan's second layer.
CASES = [(name, "xla", True) for name in MASKS]
CASES += [(name, "xla_spans", True) for name in MASKS]  # the packed superset, anchors from key 0, global rows
CASES += [(name, "xla_spans", False) for name in ("sinks_window", "block_sparse", "spans")]
CASES += [(name, "blockwise", True) for name in ("window", "sinks_chunk", "block_sparse", "spans", "chunk_bidirectional")]
CASES += [(name, "blockwise", False) for name in ("sinks_window", "block_sparse_bidirectional", "spans_layer1_sinks")]


@pytest.mark.parametrize("name,impl,packed", CASES)
def test_impls_match_the_reference_forward_and_gradients(name, impl, packed):
    """fp32: only the order of sums differs. Outputs are averages of |v| <~ 4; gradients sum over up to
    37 keys and 2 heads per kv head, so 1e-5 absolute is ~30 ulp of their size."""
    got = IMPLS[impl](_mask(name, packed), *_qkv())
    for g, want, what in zip(got, _reference(name, packed), ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-5, err_msg=f"{name} {impl} {what}")


@settings(max_examples=6, derandomize=True, deadline=None)
@given(st.lists(st.lists(st.integers(1, 24), min_size=1, max_size=6), min_size=B, max_size=B))
def test_blockwise_on_random_packings(doc_lengths):
    """Documents anywhere: the packed schedule must contain every document's blocks, and the anchor pass
    its sinks and global tokens. Same compiled programs as above (only the segment ids change)."""
    rows = []
    for lengths in doc_lengths:
        ids = np.concatenate([np.full(n, d) for d, n in enumerate(lengths)] + [np.full(T, len(lengths))])[:T]
        rows.append(ids)
    segments = jnp.asarray(np.stack(rows), jnp.int32)
    for name in ("sinks_chunk", "block_sparse"):
        mask = Mask(**MASKS[name], segment_ids_BT=segments)
        for g, want in zip(IMPLS["blockwise"](mask, *_qkv()), IMPLS["reference"](mask, *_qkv())):
            np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_xla_spans_skip_the_blocks_a_mask_removes():
    """The key spans of the xla impl's query blocks: causal T 256 in blocks of 64 computes 10 of the 16
    blocks; a window of 64 at most two key blocks per query block; packed documents with sinks start at key 0."""
    causal = _key_spans(Mask().static, 256, 2, 64, False)
    assert [(q_lo, k_lo, k_hi) for q_lo, _, k_lo, k_hi in causal] == [(0, 0, 64), (64, 0, 128), (128, 0, 192), (192, 0, 256)]
    window = _key_spans(Mask(window=64).static, 1024, 2, 64, False)
    assert max(k_hi - k_lo for _, _, k_lo, k_hi in window) == 128 and window[-1][2] == 1024 - 128
    assert all(k_lo == 0 for _, _, k_lo, _ in _key_spans(Mask(window=64, sinks=4).static, 1024, 2, 64, True))
    assert _key_spans(Mask(window=64, sinks=4).static, 1024, 2, 64, False)[-1][2] == 0  # unpacked sinks: block 0 is kept
    empty = _key_spans(Mask(spans=Spans(alpha=((-200,),), beta=((0.0,),))).static, 256, 1, 64, False)
    assert all(k_lo == k_hi for _, _, k_lo, k_hi in empty)  # no key visible anywhere: no einsum, zeros
    # and the compiled program does only that work: XLA's FLOP count of the spans is 10/16 of all pairs (the
    # score and AV matmuls dominate; the O(T P) work outside them is under 1% at P 64)
    q, k, v = (jnp.zeros((1, 256, h, 64)) for h in (2, 1, 1))
    flops = [jax.jit(lambda q, k, v, b=b: _xla_attention(q, k, v, Mask(), 0.125, b)).lower(q, k, v).compile().cost_analysis()
             for b in (64, None)]
    flops = [(c[0] if isinstance(c, (list, tuple)) else c)["flops"] for c in flops]
    assert abs(flops[0] / flops[1] - 10 / 16) < 0.02, flops


def test_blockwise_refuses_global_rows_of_packed_documents():
    with pytest.raises(NotImplementedError, match="global_blocks"):
        _blockwise(*_qkv(), _mask("block_sparse_bidirectional"))


def test_cudnn_refuses_the_fields_it_cannot_express():
    q, k, v = _qkv(jnp.bfloat16)
    for field, value in (("chunk", 4), ("sinks", 2), ("block_sparse", BlockSparse(4)), ("spans", SPANS)):
        with pytest.raises(NotImplementedError, match=f"Mask.{field}"):
            attention(q, k, v, mask=Mask(**{field: value}), impl="cudnn")


def test_bad_fields_are_refused_naming_them():
    for kwargs, field in ((dict(chunk=0), "chunk"), (dict(sinks=-1), "sinks"), (dict(spans=SPANS, causal=False), "spans")):
        with pytest.raises(ValueError, match=field):
            Mask(**kwargs)
    with pytest.raises(ValueError, match="stride_blocks"):
        BlockSparse(4, stride_blocks=-1)
    with pytest.raises(ValueError, match=r"beta\[0\]\[0\]"):
        Spans(alpha=((1,),), beta=((0.3,),))  # not on the 1/1024 grid
    with pytest.raises(ValueError, match="heads"):
        attention(*_qkv(), mask=Mask(spans=Spans(alpha=((1, 1),), beta=((0.5, 0.5),))), impl="xla")
