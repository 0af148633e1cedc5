"""The one attention entry point, the test oracle, the KV-cache read, and the attention mixers.

    out_BTHP = attention(q_BTHP, k_BTKP, v_BTKP, mask=Mask(...), impl="auto")

H query heads share K key/value heads (GQA, H % K == 0; K == H is MHA, K == 1 MQA). `Mask`
(layers/masks.py) says which keys each query sees: causal, sliding window, chunks, attention sinks,
block-sparse patterns, MoA's per-head spans, packed documents. Every impl honours every `Mask` field or
raises naming it: a backend that silently drops segment ids trains on a wrong loss (the MaxText bug
class named in DESIGN.md).

impl: "xla" (masked einsum over all T x T pairs, any backend), "blockwise" (flash attention's algorithm
in plain JAX over the mask's kept blocks only: layers/blockwise.py), "cudnn" (GPU flash attention;
causal, window and segment ids only), "pallas" (the block-sparse flash attention kernel,
kernels/flash_attention: the same schedule and rule, Triton on GPU, splash attention on TPU, interpret mode
on CPU; no MoA spans;
opt-in: `auto` never picks it until it is measured on a GPU), "auto" (`choose_impl`).

Mixers registered here: "attn" (causal, full KV cache) and "swa" (sliding window of
`model.sliding_window` keys, ring-buffer cache of that many slots); the sparse masks' mixers are in
layers/sparse_attention.py, Native Sparse Attention in layers/nsa.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.kernels.flash_attention import ops as flash_ops
from effax.layers.blockwise import blockwise_attention, schedule
from effax.layers.kv_cache import KVState
from effax.layers.linear import project
from effax.layers.masks import BlockSparse, Mask, Spans, block_visible, document_offsets_BT, keys_seen, visible
from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.rope import apply_rope
from effax.layers.sharding import constrain, logical_init

__all__ = ["IMPLS", "Mask", "BlockSparse", "Spans", "attention", "choose_impl", "reference_attention", "cache_attention",
           "Attention", "SlidingWindowAttention"]

IMPLS = ("auto", "xla", "blockwise", "cudnn", "pallas")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: masked logits stay out of NaN territory
_CUDNN_REFUSES = ("chunk", "sinks", "block_sparse", "spans")  # Mask fields cuDNN's public API cannot express
XLA_UP_TO = 2048  # on CPU, auto picks the xla impl up to this many tokens and the blockwise path past it


def _check_shapes(q_BTHP, k_BTKP, v_BTKP, mask: Mask) -> None:
    B, T, H, P = q_BTHP.shape
    if k_BTKP.shape != v_BTKP.shape or k_BTKP.shape[:2] != (B, T) or k_BTKP.shape[3] != P:
        raise ValueError(f"attention: k {k_BTKP.shape} / v {v_BTKP.shape} do not match q {q_BTHP.shape} (self-attention, same B, T, P)")
    if H % k_BTKP.shape[2]:
        raise ValueError(f"attention: {H} query heads are not a multiple of {k_BTKP.shape[2]} kv heads")
    if mask.segment_ids_BT is not None and mask.segment_ids_BT.shape != (B, T):
        raise ValueError(f"attention: segment_ids_BT has shape {mask.segment_ids_BT.shape}, expected {(B, T)}")


def reference_attention(q_BTHP, k_BTKP, v_BTKP, *, mask: Mask, scale: float | None = None) -> jax.Array:
    """The test oracle: everything in fp32, KV repeated per query head, every pair of T x T computed, and
    the mask written out here, field by field, from document offsets it derives itself (not through
    `masks.visible`). A row that sees no key outputs zeros."""
    _check_shapes(q_BTHP, k_BTKP, v_BTKP, mask)
    B, T, H, P = q_BTHP.shape
    G = H // k_BTKP.shape[2]
    q, k, v = (a.astype(jnp.float32) for a in (q_BTHP, k_BTKP, v_BTKP))
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # query head h uses kv head h // G
    index_T = jnp.arange(T)
    if mask.segment_ids_BT is None:
        offset_BT = jnp.broadcast_to(index_T, (B, T))
    else:  # distance to the latest document start at or before each token
        seg = mask.segment_ids_BT
        starts_BT = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        earlier_TT = index_T[None, :] <= index_T[:, None]
        offset_BT = index_T - jnp.max(jnp.where(earlier_TT[None] & starts_BT[:, None, :], index_T, 0), axis=-1)
    i = offset_BT[:, None, :, None]  # [B, 1, T, 1]
    j = offset_BT[:, None, None, :]
    seen_BHTS = jnp.full((B, H, T, T), True)
    if mask.causal:
        seen_BHTS &= j <= i
    local = jnp.full((B, H, T, T), True)
    if mask.window is not None:
        local &= i - j < mask.window
    if mask.chunk is not None:
        local &= i // mask.chunk == j // mask.chunk
    if mask.spans is not None:
        alpha, beta = (jnp.asarray(x, jnp.float32)[mask.layer][None, :, None, None] for x in (mask.spans.alpha, mask.spans.beta))
        local &= (i - j).astype(jnp.float32) < alpha + beta * (i + 1).astype(jnp.float32)  # exact: beta on a 1/1024 grid
    if mask.block_sparse is not None:
        bs = mask.block_sparse
        bi, bj = i // bs.block_size, j // bs.block_size
        blocks = jnp.abs(bi - bj) < bs.local_blocks
        blocks |= (bj < bs.global_blocks) | ((bi < bs.global_blocks) & (not mask.causal))
        if bs.stride_blocks:
            blocks |= (bi - bj) % bs.stride_blocks == 0
        local &= blocks
    seen_BHTS &= local | (j < mask.sinks)
    if mask.segment_ids_BT is not None:
        seen_BHTS &= seg[:, None, :, None] == seg[:, None, None, :]
    scale = 1 / math.sqrt(P) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    any_BHT1 = seen_BHTS.any(-1, keepdims=True)
    logits = jnp.where(seen_BHTS & any_BHT1, logits, jnp.where(any_BHT1, -jnp.inf, 0.0))  # an empty row: no NaN
    probs = jnp.where(seen_BHTS, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs, v).astype(q_BTHP.dtype)


def _xla_attention(q_BTHP, k_BTKP, v_BTKP, mask: Mask, scale: float, block: int | None = None) -> jax.Array:
    """Masked einsum in [B, K, G, T, P] layout: one transpose before the einsums is 2.6x faster on CPU
    than einsums over [B, T, H, P] (shared/notes). Groups come from a reshape, KV is never repeated.
    Logits, softmax and the AV accumulation are fp32; probabilities enter the AV matmul in v's dtype.

    With `block` (what `attention` passes on CPU: `xla_query_block`) and T past one block, queries go in
    blocks and each block's einsum covers only the keys from its first to its last kept key block
    (`_xla_spans_attention`). The one-block form below is kept apart: routed through the spans' layout it
    lost the dense model's bit-identity with the pre-skeleton model (tests/models/test_dense_skeleton_equivalence.py)."""
    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    if block is not None and block < T:
        spans = _key_spans(mask.static, T, K, block, mask.segment_ids_BT is not None)
        if len(spans) > 1:
            return _xla_spans_attention(q_BTHP, k_BTKP, v_BTKP, mask, scale, spans)
    q_BKGTP = q_BTHP.reshape(B, T, K, H // K, P).transpose(0, 2, 3, 1, 4)
    k_BKSP = k_BTKP.transpose(0, 2, 1, 3)
    v_BKSP = v_BTKP.transpose(0, 2, 1, 3)
    logits_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTP, k_BKSP, preferred_element_type=jnp.float32) * scale
    if mask.spans is None:
        allowed_BKGTS = mask.allowed_BTS(T)[:, None, None]
    else:
        allowed_BHTS = mask.allowed_BHTS(T, H)
        allowed_BKGTS = allowed_BHTS.reshape(allowed_BHTS.shape[0], K, H // K, T, T)
    probs_BKGTS = jax.nn.softmax(jnp.where(allowed_BKGTS, logits_BKGTS, _NEG), axis=-1)
    out_BKGTP = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS.astype(v_BTKP.dtype), v_BKSP, preferred_element_type=jnp.float32)
    if mask.spans is not None:  # only spans can leave a row without keys (span < 1 token): zeros, as in every impl
        out_BKGTP = jnp.where(allowed_BKGTS.any(-1, keepdims=True), out_BKGTP, 0.0)
    return out_BKGTP.transpose(0, 3, 1, 2, 4).reshape(B, T, H, P).astype(q_BTHP.dtype)


def _xla_spans_attention(q_BTHP, k_BTKP, v_BTKP, mask: Mask, scale: float, spans) -> jax.Array:
    """The masked einsum, one query block at a time over the keys of its span (`_key_spans`): under a causal
    mask at T 256 in blocks of 64, 10 of the 16 blocks' work. Every row's visible keys lie in its span, so
    each softmax is the whole row's. Layout [B, K, T, G, P], q scaled once (in q's dtype: for half-precision
    q a rounding of the size q already carries): a query block is then one contiguous slice, which measured
    faster in the CPU training step than [B, K, G, T, P] (docs/benchmarks.md). The einsums are unrolled, one
    per query block: `xla_query_block` keeps them few."""
    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    G = H // K
    q_BKTGP = (q_BTHP * jnp.asarray(scale, q_BTHP.dtype)).reshape(B, T, K, G, P).transpose(0, 2, 1, 3, 4)
    k_BKSP = k_BTKP.transpose(0, 2, 1, 3)
    v_BKSP = v_BTKP.transpose(0, 2, 1, 3)
    if mask.spans is None:
        allowed_BKTGS = mask.allowed_BTS(T)[:, None, :, None, :]
    else:
        allowed_BHTS = mask.allowed_BHTS(T, H)
        allowed_BKTGS = allowed_BHTS.reshape(allowed_BHTS.shape[0], K, G, T, T).transpose(0, 1, 3, 2, 4)
    outs = []
    for q_lo, q_hi, k_lo, k_hi in spans:
        if k_lo == k_hi:  # a query block that sees no key (MoA spans under one token): zeros, as in every impl
            outs.append(jnp.zeros((B, K, q_hi - q_lo, G, P), jnp.float32))
            continue
        allowed = allowed_BKTGS[:, :, q_lo:q_hi, :, k_lo:k_hi]
        logits = jnp.einsum("bktgd,bksd->bktgs", q_BKTGP[:, :, q_lo:q_hi], k_BKSP[:, :, k_lo:k_hi],
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(jnp.where(allowed, logits, _NEG), axis=-1)
        out = jnp.einsum("bktgs,bksd->bktgd", probs.astype(v_BTKP.dtype), v_BKSP[:, :, k_lo:k_hi],
                         preferred_element_type=jnp.float32)
        if mask.spans is not None:
            out = jnp.where(allowed.any(-1, keepdims=True), out, 0.0)
        outs.append(out)
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3, 4).reshape(B, T, H, P).astype(q_BTHP.dtype)


def xla_query_block(T: int) -> int:
    """The query block of the xla impl on CPU: 64 tokens (the fastest at T 256, docs/benchmarks.md), larger
    past T 1024 so that at most 16 einsums are unrolled."""
    return max(64, -(-T // 16))


@functools.lru_cache(maxsize=256)
def _kept_blocks(static: tuple, T: int, heads: int, block: int, packed: bool) -> np.ndarray | None:
    """bool [query blocks, key blocks]: `masks.block_visible` for any head, or None where no block table
    exists (global rows of packed documents)."""
    try:
        return block_visible(Mask(*static), T, block, block, packed=packed, kv_heads=heads).any(axis=0)
    except NotImplementedError:
        return None


@functools.lru_cache(maxsize=256)
def _key_spans(static: tuple, T: int, kv_heads: int, block: int, packed: bool) -> tuple[tuple[int, int, int, int], ...]:
    """(query lo, query hi, key lo, key hi) per query block: from the first to the last key block the mask
    keeps for it (`_kept_blocks`; packed documents use its superset, and with anchor tokens the span starts
    at key 0, where a document's sinks or global blocks may lie). Without a block table: every pair, one einsum."""
    has_QK = _kept_blocks(static, T, kv_heads, block, packed)
    if has_QK is None:
        return ((0, T, 0, T),)
    anchored = packed and Mask(*static).anchor
    spans = []
    for i, row in enumerate(has_QK):
        kept = np.flatnonzero(row)
        q_lo, q_hi = i * block, min(T, (i + 1) * block)
        if kept.size == 0:
            spans.append((q_lo, q_hi, 0, 0))
            continue
        k_lo = 0 if anchored else int(kept[0]) * block
        spans.append((q_lo, q_hi, k_lo, min(T, (int(kept[-1]) + 1) * block)))
    return tuple(spans)


def _spans_overhead(static: tuple, T: int, kv_heads: int, block: int, packed: bool) -> float:
    """Query-key pairs the spans compute over those of the kept blocks (1.0: no block computed in vain)."""
    has_QK = _kept_blocks(static, T, kv_heads, block, packed)
    if has_QK is None:
        return 1.0  # one einsum over every pair
    kept_pairs = sum(min(block, T - i * block) * min(block, T - j * block) for i, j in zip(*np.nonzero(has_QK)))
    computed = sum((q_hi - q_lo) * (k_hi - k_lo) for q_lo, q_hi, k_lo, k_hi in _key_spans(static, T, kv_heads, block, packed))
    return computed / max(kept_pairs, 1)


def _cudnn_attention(q_BTHP, k_BTKP, v_BTKP, mask: Mask, scale: float) -> jax.Array:
    """cuDNN flash attention through the public `jax.nn.dot_product_attention`.

    causal and window map to is_causal / local_window_size. Segment ids have no public cuDNN argument
    (query_seq_lengths only trims padding at the end of a row; the packed-offset form is private), so
    they go in as a boolean [B, 1, T, T] mask, which jax turns into an additive bias: exact, at the
    cost of reading a B*T*T bias. Anything else it cannot honour raises.

    Checked on an H200 (jax 0.11.2): forward and gradients match `reference_attention` for causal,
    window, segment ids, non-causal, GQA and MHA (bf16, relative error ~3e-3). B8 T2048 H16 K4 D128:
    causal 0.29 ms forward / 1.3 ms forward+backward, with segment ids 0.55 / 2.3 ms; xla 2.9 / 8.7 ms.
    jax's cuDNN backward refuses odd T (NotImplementedError "Unsupported sequence length"); the
    forward takes it.
    """
    for name in _CUDNN_REFUSES:
        if getattr(mask, name):
            raise NotImplementedError(f"attention impl='cudnn' cannot honour Mask.{name}; use impl='blockwise' or 'xla'")
    if q_BTHP.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"attention impl='cudnn' takes bfloat16/float16 inputs, got {q_BTHP.dtype}; use impl='xla'")
    if mask.window is not None and not mask.causal:
        raise NotImplementedError("attention impl='cudnn' supports Mask.window only with causal=True (a left window)")
    if jax.default_backend() != "gpu":
        raise RuntimeError(
            f"attention impl='cudnn' needs an NVIDIA GPU, but the JAX backend is {jax.default_backend()!r}; "
            "use impl='xla' (or 'auto', which picks xla here)"
        )
    seg_mask_B1TS = None
    if mask.segment_ids_BT is not None:
        seg = mask.segment_ids_BT
        seg_mask_B1TS = seg[:, None, :, None] == seg[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BTHP,
        k_BTKP,
        v_BTKP,
        mask=seg_mask_B1TS,
        scale=scale,
        is_causal=mask.causal,
        local_window_size=None if mask.window is None else (mask.window - 1, 0),
        implementation="cudnn",
    )


@functools.lru_cache(maxsize=None)
def _visibility(static: tuple):
    """The mask's element rule on document offsets (`masks.visible`), one callable per static mask, for
    the kernel (which knows no Mask)."""
    return functools.partial(visible, Mask(*static))


def _pallas_attention(q_BTHP, k_BTKP, v_BTKP, mask: Mask, scale: float) -> jax.Array:
    """The flash attention kernel (kernels/flash_attention) driven by this mask: the blocks it visits are
    the blockwise schedule's table (`schedule(...).has_KQK`, exact for one document per row, a superset for
    packed ones), the rule inside them is `masks.visible` on document offsets, and with packed documents
    each query block also visits its document's anchor tokens (sinks, global blocks). On TPU the op runs
    JAX's splash attention instead (packed rows: causal and window only)."""
    if mask.spans is not None:
        raise NotImplementedError("attention impl='pallas' cannot honour Mask.spans (MoA per-head spans); "
                                  "use impl='blockwise' or 'xla'")
    T, K = q_BTHP.shape[1], k_BTKP.shape[2]
    bs = mask.block_sparse.block_size if mask.block_sparse else 0
    block = bs if bs in (16, 32, 64, 128) else min(64, flash_ops.kernel.pow2(T))  # Triton: a power of two >= 16
    packed = mask.segment_ids_BT is not None
    table = schedule(mask.static, T, block, block, K, packed).has_KQK[0]  # without spans every kv head agrees
    return flash_ops.flash_attention(
        q_BTHP, k_BTKP, v_BTKP, blocks_QK=table, visible=_visibility(mask.static), segment_ids_BT=mask.segment_ids_BT,
        offsets_BT=document_offsets_BT(mask.segment_ids_BT) if packed else None, anchor=mask.anchor if packed else 0,
        index_rule=not any((mask.chunk, mask.sinks, mask.block_sparse)),  # packed rows on TPU (splash) need it
        scale=scale, block_q=block, block_k=block, impl="pallas")


def _cudnn_ok(q_BTHP, mask: Mask) -> bool:
    """What impl='auto' sends to cuDNN: a GPU, half-precision inputs, a mask it honours, and shapes
    its forward and backward both take (head dim a multiple of 8 up to 128, even T)."""
    _, T, _, P = q_BTHP.shape
    return (
        jax.default_backend() == "gpu"
        and q_BTHP.dtype in (jnp.bfloat16, jnp.float16)
        and P % 8 == 0
        and P <= 128
        and T % 2 == 0
        and (mask.window is None or mask.causal)
        and not any(getattr(mask, name) for name in _CUDNN_REFUSES)
    )


def choose_impl(q_BTHP, mask: Mask) -> str:
    """impl='auto': cuDNN where it honours the call (`_cudnn_ok`). On CPU the masked einsum over each query
    block's key span up to T 2048, where it is fastest (docs/benchmarks.md; it saves probabilities for the
    kept blocks, T^2 / 2 under a causal mask), unless the spans would compute over 1.5x the kept blocks
    (sinks or global tokens far behind a window, strided patterns); past that, the blockwise path (O(T)
    saved). Otherwise the masked einsum: on GPU without cuDNN and on TPU the blockwise path is unmeasured."""
    if _cudnn_ok(q_BTHP, mask):
        return "cudnn"
    T, H = q_BTHP.shape[1], q_BTHP.shape[2]
    if jax.default_backend() != "cpu" or T <= xla_query_block(T):
        return "xla"
    packed = mask.segment_ids_BT is not None
    # The kv heads are not known here; the spans are a union over heads, which their grouping does not change.
    if T <= XLA_UP_TO and _spans_overhead(mask.static, T, H, xla_query_block(T), packed) <= 1.5:
        return "xla"
    return "blockwise"


def attention(q_BTHP, k_BTKP, v_BTKP, *, mask: Mask, impl: str = "auto", scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v per head; scale defaults to 1/sqrt(P). Output in q's dtype."""
    _check_shapes(q_BTHP, k_BTKP, v_BTKP, mask)
    scale = 1 / math.sqrt(q_BTHP.shape[-1]) if scale is None else scale
    if impl == "auto":
        impl = choose_impl(q_BTHP, mask)
    if impl == "xla":  # on CPU over each query block's key span; elsewhere all T x T pairs (unmeasured there)
        block = xla_query_block(q_BTHP.shape[1]) if jax.default_backend() == "cpu" else None
        return _xla_attention(q_BTHP, k_BTKP, v_BTKP, mask, scale, block)
    if impl == "blockwise":
        return blockwise_attention(q_BTHP, k_BTKP, v_BTKP, mask=mask, scale=scale)
    if impl == "cudnn":
        return _cudnn_attention(q_BTHP, k_BTKP, v_BTKP, mask, scale)
    if impl == "pallas":
        return _pallas_attention(q_BTHP, k_BTKP, v_BTKP, mask, scale)
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")


def cache_attention(q_BTHP, k_BSKP, v_BSKP, *, q_positions_BT, mask: Mask, scale: float | None = None,
                    slot_positions_BS: jax.Array | None = None) -> jax.Array:
    """Queries at absolute positions `q_positions_BT` attend a KV cache whose slot s holds the position
    `slot_positions_BS[b, s]` (-1: empty), by default s itself.

    A slot is visible to a query at position q iff its position is >= 0 and the `Mask` rule holds with
    positions in place of offsets (one document per row; layers/kv_cache.py). Segment ids and
    non-causal masks have no meaning for a cache and raise. Same fp32 numerics and [B, K, G, ., .]
    layout as `_xla_attention`; a single query row makes it memory-bound, so a fused decode kernel
    (jax.experimental.pallas.ops gpu decode_attention) is the lever on GPU.
    """
    if not mask.causal or mask.segment_ids_BT is not None:
        raise NotImplementedError("cache_attention: a KV cache takes only causal masks, no segment ids")
    B, T, H, P = q_BTHP.shape
    S, K = k_BSKP.shape[1], k_BSKP.shape[2]
    G = H // K
    scale = 1 / math.sqrt(P) if scale is None else scale
    if slot_positions_BS is None:
        slot_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    q_BKGTP = q_BTHP.reshape(B, T, K, G, P).transpose(0, 2, 3, 1, 4)
    k_BKSP = k_BSKP.transpose(0, 2, 1, 3)
    v_BKSP = v_BSKP.transpose(0, 2, 1, 3)
    logits_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTP, k_BKSP, preferred_element_type=jnp.float32) * scale
    span = None
    if mask.spans is not None:
        span = tuple(u.reshape(1, K, G, 1, 1) for u in mask.spans_H())
    slot_B11S = slot_positions_BS[:, None, None, None, :]
    allowed_BKGTS = (slot_B11S >= 0) & visible(mask, q_positions_BT[:, None, None, :, None], slot_B11S, span=span)
    probs_BKGTS = jax.nn.softmax(jnp.where(allowed_BKGTS, logits_BKGTS, _NEG), axis=-1)
    out_BKGTP = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS.astype(v_BSKP.dtype), v_BKSP, preferred_element_type=jnp.float32)
    out_BKGTP = jnp.where(allowed_BKGTS.any(-1, keepdims=True), out_BKGTP, 0.0)  # a query that sees nothing: zeros
    return out_BKGTP.transpose(0, 3, 1, 2, 4).reshape(B, T, H, P).astype(q_BTHP.dtype)


@register_mixer("attn")
class Attention(Layer):
    """Causal multi-head / grouped-query self-attention with RoPE, no biases; a full KV cache.

    Sizes from the model config: d_model, n_heads, kv_heads, dim_per_head, rope_theta, attention_impl.
    Kernels keep heads as their own axis (q: [D, H, P], o: [H, P, D]) so the heads axis can be sharded by
    name. The output projection writes into the residual stream, so it starts at `cfg.out_init_std`.

    A subclass is another mask: it overrides `mask(cfg)` (layers/sparse_attention.py), and its training
    pass, FLOPs and decode cache (full, or sinks + a ring of `Mask.reach` slots) follow from it.
    """

    @classmethod
    def mask(cls, cfg) -> Mask:
        """The layer's mask from the config: static fields only (segment ids and the layer index are
        added per call)."""
        return Mask()

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.mask(cfg)  # a bad value raises, naming its model.* key

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        if cfg.attention_impl not in IMPLS:
            raise ValueError(f"model.attention_impl={cfg.attention_impl!r} is not one of {IMPLS}")
        D, H, K, P = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        if H % K:
            raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={K}")
        self.rope_theta, self.impl, self.dtype = cfg.rope_theta, cfg.attention_impl, jnp.dtype(cfg.dtype)
        self.rope = not getattr(cfg, "nope", False)  # model.nope (hybrid configs): no positional encoding (SambaY)
        self.mask_static = self.mask(cfg).static  # hashable; a Mask itself is not stored (eq=False)
        param_dtype, normal = jnp.dtype(cfg.param_dtype), nnx.initializers.normal

        def kernel(std, shape, axes):
            return nnx.Param(logical_init(normal(std), axes)(rngs.params(), shape, param_dtype))

        self.q = kernel(cfg.init_std, (D, H, P), ("embed", "heads", "head_dim"))
        self.k = kernel(cfg.init_std, (D, K, P), ("embed", "kv_heads", "head_dim"))
        self.v = kernel(cfg.init_std, (D, K, P), ("embed", "kv_heads", "head_dim"))
        self.o = kernel(cfg.out_init_std, (H, P, D), ("heads", "head_dim", "embed"))

    @classmethod
    def param_count(cls, cfg) -> int:
        return cfg.d_model * cfg.dim_per_head * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # q, o + k, v

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        """Projections, plus QK^T and AV over every key the mask allows a query at the end of the sequence
        (no causal halving: the PaLM / Chinchilla convention, 4 * keys * H * P)."""
        return 2 * cls.param_count(cfg) + 4 * keys_seen(cls.mask(cfg), seq_len) * cfg.n_heads * cfg.dim_per_head

    def call_mask(self, ctx: LayerContext, segment_ids_BT=None) -> Mask:
        return Mask(*self.mask_static, segment_ids_BT=segment_ids_BT, layer=ctx.layer)

    def __call__(self, x_BTD: jax.Array, ctx: LayerContext) -> jax.Array:
        q_BTHP, k_BTKP, v_BTKP = self.qkv(x_BTD, ctx.positions_BT)
        mask = self.call_mask(ctx, ctx.segment_ids_BT)
        return self.project_out(attention(q_BTHP, k_BTKP, v_BTKP, mask=mask, impl=self.impl))

    def qkv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections, with RoPE at `positions_BT` on q and k (unless model.nope), in the compute dtype."""
        dt = self.dtype
        x_BTD = x_BTD.astype(dt)
        q_BTHP, k_BTKP, v_BTKP = (project(x_BTD, w[...]) for w in (self.q, self.k, self.v))
        if self.rope:
            q_BTHP, k_BTKP = (apply_rope(a, positions_BT, theta=self.rope_theta) for a in (q_BTHP, k_BTKP))
        q_BTHP = constrain(q_BTHP, ("batch", "seq", "heads", "head_dim"))
        k_BTKP = constrain(k_BTKP, ("batch", "seq", "kv_heads", "head_dim"))
        return q_BTHP, k_BTKP, v_BTKP

    def project_out(self, out_BTHP: jax.Array) -> jax.Array:
        return project(out_BTHP.astype(self.dtype), self.o[...], 2)

    # Decoding (layers/kv_cache.py): the state holds keys/values and the position of each slot.

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype) -> KVState:
        """Full (max_len slots) unless the mask bounds how far back a query sees: then the anchor tokens
        (sinks, global blocks) in fixed slots and a ring of `Mask.reach` slots."""
        mask = cls.mask(cfg)
        reach = mask.reach(max_len)
        if reach is None or mask.anchor + reach >= max_len:
            return KVState.zeros(batch, max_len, cfg.kv_heads, cfg.dim_per_head, dtype, ring=False)
        return KVState.zeros(batch, mask.anchor + reach, cfg.kv_heads, cfg.dim_per_head, dtype, ring=True, sinks=mask.anchor)

    @classmethod
    def constrain_state(cls, state_R: KVState) -> KVState:
        # Rows over the data axes, kv heads over tensor, like the activations that fill it.
        kv = ("layers", "batch", "seq", "kv_heads", "head_dim")
        return dataclasses.replace(state_R, k=constrain(state_R.k, kv), v=constrain(state_R.v, kv),
                                   pos=constrain(state_R.pos, ("layers", "batch", "seq")))

    def prefill(self, x_BTD, ctx: LayerContext, state: KVState, i) -> tuple[jax.Array, KVState]:
        """Self-attention over right-padded prompts (the same `attention` call as training, so the same
        impls; under the causal mask no real token sees a pad), storing the real tokens' keys."""
        q_BTHP, k_BTKP, v_BTKP = self.qkv(x_BTD, ctx.positions_BT)
        state = state.write_prompt(i, k_BTKP, v_BTKP, ctx.valid_BT, ctx.lengths_B)
        return self.project_out(attention(q_BTHP, k_BTKP, v_BTKP, mask=self.call_mask(ctx), impl=self.impl)), state

    def decode(self, x_BTD, ctx: LayerContext, state: KVState, i) -> tuple[jax.Array, KVState]:
        """New tokens (usually one per row) go into the cache, then attend every slot they may see."""
        q_BTHP, k_BTKP, v_BTKP = self.qkv(x_BTD, ctx.positions_BT)
        state = state.write_tokens(i, k_BTKP, v_BTKP, ctx.positions_BT, ctx.valid_BT)
        out_BTHP = cache_attention(q_BTHP, state.k[i], state.v[i], q_positions_BT=ctx.positions_BT, mask=self.call_mask(ctx),
                                   slot_positions_BS=state.pos[i])
        return self.project_out(out_BTHP), state


@register_mixer("swa")
class SlidingWindowAttention(Attention):
    """Attention over the last `model.sliding_window` keys (itself included); its cache is a ring
    buffer of that many slots, so decode memory does not grow with the context."""

    @classmethod
    def mask(cls, cfg) -> Mask:
        if cfg.sliding_window < 1:
            raise ValueError(f"model.sliding_window must be >= 1, got {cfg.sliding_window}")
        return Mask(window=cfg.sliding_window)
