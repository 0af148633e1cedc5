"""The blockwise path's block schedule: which blocks it computes (counted, and checked against the dense
mask), that the compiled program runs exactly those, and which impl `auto` picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_testing import compiled
from effax.layers import attention as attn
from effax.layers.attention import BlockSparse, Mask, Spans, attention, choose_impl, reference_attention
from effax.layers.blockwise import blockwise_attention, schedule
from effax.layers.masks import block_visible


def _counts(mask, T, block, kv_heads=1):
    s = schedule(mask.static, T, block, block, kv_heads, False)
    return s.kept, s.computed


def test_block_counts():
    assert _counts(Mask(), 256, 64, kv_heads=2) == (20, 20)  # 10 of 16 blocks per kv head; rows paired: no padding
    assert _counts(Mask(causal=False), 256, 64) == (16, 16)
    assert _counts(Mask(window=64), 256, 64) == (7, 8)  # the diagonal and the one before (the first row: one)
    assert _counts(Mask(chunk=64), 256, 64) == (4, 4)  # the diagonal only
    assert _counts(Mask(block_sparse=BlockSparse(64, local_blocks=1, global_blocks=1)), 256, 64) == (7, 8)
    # A sliding window's kept blocks grow linearly with T, causal attention's quadratically.
    window = [_counts(Mask(window=128), T, 64)[0] for T in (1024, 2048)]
    causal = [_counts(Mask(), T, 64)[0] for T in (1024, 2048)]
    assert window == [45, 93] and causal == [136, 528]  # 1 + 2 + 3 per later row; n(n + 1) / 2


MASKS = [Mask(), Mask(causal=False, window=5), Mask(chunk=6, sinks=2), Mask(window=3, sinks=5),
         Mask(block_sparse=BlockSparse(3, 2, 1, 3)), Mask(causal=False, block_sparse=BlockSparse(5, 1, 1, 2)),
         Mask(spans=Spans(alpha=((3, -8, 0, 2),), beta=((0.25, 0.5, 0.125, 0.0),)))]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: str(m.static))
def test_schedule_is_exactly_the_blocks_the_mask_touches(mask):
    """One document per row: a block is computed iff some pair in it is visible (for some head of its kv
    head). Checked against the dense [H, T, T] mask, which tests/layers/test_attention_masks.py checks
    against the rule written as loops."""
    T, bq, bk, H, K = 37, 8, 4, 4, 2
    dense_HTS = np.asarray(mask.allowed_BHTS(T, H))[0]
    dense_HTS = np.broadcast_to(dense_HTS, (H, T, T))
    padded = np.pad(dense_HTS, ((0, 0), (0, 40 - T), (0, 40 - T)))
    want_KQK = padded.reshape(K, H // K, 5, bq, 10, bk).any(axis=(1, 3, 5))
    np.testing.assert_array_equal(block_visible(mask, T, bq, bk, packed=False, kv_heads=K), want_KQK)


def _scans(jaxpr):
    """Every scan in a jaxpr, nested ones included (custom_vjp and pjit bodies)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _scans(inner)
    return found


def test_the_compiled_program_computes_only_the_scheduled_blocks():
    """The forward and the backward are each one scan over the schedule's steps, each step one
    [lanes, ...] batch of block products: steps x lanes = 20 blocks where the masked einsum does 32."""
    B, T, H, K, P = 1, 256, 4, 2, 16
    q, k, v = (jnp.zeros((B, T, n, P)) for n in (H, K, K))
    sched = schedule(Mask().static, T, 64, 64, K, False)
    assert (sched.steps, sched.lanes) == (5, 4)

    def loss(q, k, v):
        return blockwise_attention(q, k, v, mask=Mask(), scale=0.25, block_q=64, block_k=64).sum()

    scans = _scans(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    assert [s.params["length"] for s in scans] == [sched.steps, sched.steps]  # forward, backward
    for scan in scans:
        logits = [e for e in scan.params["jaxpr"].jaxpr.eqns if e.primitive.name == "dot_general"][0]
        assert logits.outvars[0].aval.shape[:2] == (sched.lanes, B)  # one block per lane per step


def test_bf16_inputs():
    """bf16 q, k, v: probabilities meet v in bf16 and the output is rounded to bf16 (2 x 2^-8 relative of
    |out| <~ 3), as in the xla impl's bf16 test."""
    seg = jnp.asarray([[0] * 20 + [1] * 17, [3] * 5 + [4] * 9 + [7] * 23], jnp.int32)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 37, n, 8)).astype(jnp.bfloat16) for i, n in enumerate((4, 2, 2)))
    mask = Mask(window=6, segment_ids_BT=seg)
    got = compiled(lambda q, k, v: blockwise_attention(q, k, v, mask=mask, scale=8 ** -0.5, block_q=8, block_k=4), q, k, v)(q, k, v)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference_attention(q, k, v, mask=mask), np.float32),
                               atol=3e-2, rtol=2e-2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice of impl='auto'")
def test_auto_on_cpu_is_xla_up_to_2048_tokens_then_blockwise_and_never_cudnn():
    for dtype in (jnp.float32, jnp.bfloat16):
        assert choose_impl(jnp.zeros((1, 4096, 4, 64), dtype), Mask()) == "blockwise"
        assert choose_impl(jnp.zeros((1, 2048, 4, 64), dtype), Mask()) == "xla"  # over each query block's key span
        assert choose_impl(jnp.zeros((1, 64, 4, 64), dtype), Mask(window=8, sinks=4)) == "xla"  # one block
        # sinks far behind a window: the span from key 0 would compute ~8x the kept blocks
        assert choose_impl(jnp.zeros((1, 2048, 4, 64), dtype), Mask(window=128, sinks=4)) == "blockwise"


def test_auto_sends_to_cudnn_only_masks_it_takes(monkeypatch):
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")  # the choice, not the kernel
    bf16 = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    assert choose_impl(bf16, Mask(window=8)) == "cudnn"
    for mask in (Mask(chunk=8), Mask(sinks=4, window=8), Mask(block_sparse=BlockSparse(64))):
        assert choose_impl(bf16, mask) == "xla"
    assert choose_impl(bf16.astype(jnp.float32), Mask()) == "xla"


def test_attention_entry_point_runs_blockwise():
    """impl="blockwise" through `attention`, default blocks (64): T = 70 is two query blocks."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 70, n, 4)) for i, n in enumerate((2, 1, 1)))
    mask = Mask(window=30)
    got = compiled(lambda q, k, v: attention(q, k, v, mask=mask, impl="blockwise"), q, k, v)(q, k, v)
    want = compiled(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v)(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
