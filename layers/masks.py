"""Attention masks as data: `Mask`, its sparse patterns, and the one visibility rule every impl uses.

    Mask(causal=True, window=None, chunk=None, sinks=0, block_sparse=None, spans=None,
         segment_ids_BT=None, layer=0)

Query i sees key j iff all of

    same document        segment_ids_BT[b, i] == segment_ids_BT[b, j]           (when given)
    causal               j <= i
    (j is a sink  or  j is local to i)
    sinks = s            j < s: the first s tokens (StreamingLLM's attention sinks)
    local                every restriction present holds (no restriction: every key is local):
      window = W         i - j < W   (W keys counting itself: HF Mistral/Gemma `sliding_window`)
      chunk = C          i // C == j // C   (Llama 4's chunked attention)
      spans              i - j < alpha[l, h] + beta[l, h] * (i + 1)   (MoA, per layer l and query head h)
      block_sparse       on blocks bi = i // S, bj = j // S of S tokens (BigBird / Longformer / Sparse
                         Transformer): |bi - bj| < local, or bj < global (global columns), or (not
                         causal) bi < global (global rows), or stride > 0 and (bi - bj) % stride == 0

where i and j count from the start of their *document*: with segment ids, a packed document is masked
exactly as if it were alone in its row (its sinks, chunks, blocks and spans start at its first token,
as positions do). Documents are contiguous runs of equal ids (as train/data.py packs them).

A row that sees no key (a MoA span below one token, without sinks) outputs zeros, in every impl.

Static fields (everything but `segment_ids_BT` and `layer`) are pytree meta fields, so a jitted
function sees them as constants: the blockwise impl derives its block schedule from them in numpy.
`layer` (an int, or a traced one inside the layer scan) picks the spans' row of a per-layer plan.
Build a Mask per call from static config; do not store one on an nnx Module (eq=False).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

SPAN_UNITS = 1024  # beta is kept as an integer number of 1/1024ths, so numpy and XLA agree on every span


@dataclasses.dataclass(frozen=True)
class BlockSparse:
    """Block-level pattern (BigBird's sliding + global blocks, with Sparse Transformer's strided blocks in
    place of BigBird's random ones, so the pattern is static). Causal: a query block sees its own and the
    `local_blocks - 1` before it."""

    block_size: int
    local_blocks: int = 3
    global_blocks: int = 1
    stride_blocks: int = 0  # 0: no strided blocks

    def __post_init__(self):
        for name in ("block_size", "local_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BlockSparse.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("global_blocks", "stride_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"BlockSparse.{name} must be an int >= 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Spans:
    """MoA's per-head spans: query head h of layer l sees the last alpha[l][h] + beta[l][h] * N keys, N the
    tokens seen so far (MoA's "elastic rule" S = alpha + beta * N). alpha in tokens (may be negative, as in
    MoA's plans), beta in [0, 1] on a 1/1024 grid (MoA's plans use eighths)."""

    alpha: tuple[tuple[int, ...], ...]
    beta: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        if not self.alpha or len(self.alpha) != len(self.beta):
            raise ValueError(f"Spans: alpha and beta need the same non-zero number of layers, got {len(self.alpha)} and {len(self.beta)}")
        for l, (a_row, b_row) in enumerate(zip(self.alpha, self.beta)):
            if len(a_row) != len(self.alpha[0]) or len(b_row) != len(a_row):
                raise ValueError(f"Spans: layer {l} has {len(a_row)} alphas and {len(b_row)} betas, expected {len(self.alpha[0])} each")
            for h, (a, b) in enumerate(zip(a_row, b_row)):
                if a != int(a):
                    raise ValueError(f"Spans: alpha[{l}][{h}] = {a} is not a whole number of tokens")
                if not 0 <= b <= 1 or b * SPAN_UNITS != round(b * SPAN_UNITS):
                    raise ValueError(f"Spans: beta[{l}][{h}] = {b} must lie in [0, 1] on a 1/{SPAN_UNITS} grid")

    @property
    def n_layers(self) -> int:
        return len(self.alpha)

    @property
    def n_heads(self) -> int:
        return len(self.alpha[0])

    @functools.cached_property
    def units_LH(self) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta) in 1/1024 token units, int32 [layers, heads]."""
        alpha = np.asarray(self.alpha, np.int64) * SPAN_UNITS
        beta = np.rint(np.asarray(self.beta, np.float64) * SPAN_UNITS).astype(np.int64)
        return alpha.astype(np.int32), beta.astype(np.int32)

    def reach(self, n_tokens: int) -> int:
        """The most keys any head sees (its span) once `n_tokens` tokens are in: the ring a cache needs."""
        alpha, beta = (u.astype(np.int64) for u in self.units_LH)
        return int(max(1, np.max(-(-(alpha + beta * n_tokens) // SPAN_UNITS))))

    @classmethod
    def from_json(cls, path: str) -> "Spans":
        """A MoA plan as MoA writes it: {"alphas": [[per head] per layer], "betas": [...]}."""
        return _load_plan(path)


@functools.lru_cache(maxsize=None)
def _load_plan(path: str) -> Spans:
    with open(path) as f:
        plan = json.load(f)
    missing = {"alphas", "betas"} - set(plan)
    if missing:
        raise ValueError(f"MoA plan {path}: missing keys {sorted(missing)} (expected 'alphas' and 'betas', [layers][heads])")
    return Spans(tuple(tuple(int(a) if a == int(a) else a for a in row) for row in plan["alphas"]),
                 tuple(tuple(float(b) for b in row) for row in plan["betas"]))


@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """Which keys each query may see; the module docstring gives the rule."""

    causal: bool = True
    window: int | None = None
    chunk: int | None = None
    sinks: int = 0
    block_sparse: BlockSparse | None = None
    spans: Spans | None = None
    segment_ids_BT: jax.Array | None = None
    layer: int | jax.Array = 0

    def __post_init__(self):
        for name in ("window", "chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Mask.{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"Mask.sinks must be an int >= 0, got {self.sinks!r}")
        if self.spans is not None and not self.causal:
            raise ValueError("Mask.spans (MoA) is defined for causal attention only; set causal=True")

    @property
    def static(self) -> tuple:
        """The static fields, hashable: what a block schedule depends on."""
        return (self.causal, self.window, self.chunk, self.sinks, self.block_sparse, self.spans)

    @property
    def anchor(self) -> int:
        """Tokens at the start of each document that every later query may see (sinks, global blocks)."""
        globals_ = self.block_sparse.global_blocks * self.block_sparse.block_size if self.block_sparse else 0
        return max(self.sinks, globals_)

    def reach(self, n_tokens: int) -> int | None:
        """The most keys back (itself included) that a query may see besides the anchor, when `n_tokens`
        tokens are in; None when unbounded. Sizes a decode cache's ring."""
        bounds = [b for b in (self.window, self.chunk) if b is not None]
        if self.spans is not None:
            bounds.append(self.spans.reach(n_tokens))
        if self.block_sparse is not None and not self.block_sparse.stride_blocks:
            bounds.append(self.block_sparse.local_blocks * self.block_sparse.block_size)
        return min(bounds) if bounds else None

    def spans_H(self):
        """This layer's (alpha, beta) span units per query head, int32 [H] each, or None (no spans)."""
        if self.spans is None:
            return None
        return tuple(jnp.asarray(u)[self.layer] for u in self.spans.units_LH)

    def allowed_BTS(self, T: int) -> jax.Array:
        """Boolean [B or 1, T, T]: True where query t may attend key s (masks without per-head spans)."""
        if self.spans is not None:
            raise ValueError("Mask.allowed_BTS: this mask has per-head spans; use allowed_BHTS")
        return self.allowed_BHTS(T, 1)[:, 0]

    def allowed_BHTS(self, T: int, n_heads: int) -> jax.Array:
        """Boolean [B or 1, H or 1, T, T] (H only with spans)."""
        index_T = jnp.arange(T, dtype=jnp.int32)
        off_BT = index_T[None] if self.segment_ids_BT is None else document_offsets_BT(self.segment_ids_BT)
        span = None
        if self.spans is not None:
            if self.spans.n_heads != n_heads:
                raise ValueError(f"Mask.spans has {self.spans.n_heads} heads per layer, the attention has {n_heads}")
            span = tuple(u[None, :, None, None] for u in self.spans_H())
        allowed = visible(self, off_BT[:, None, :, None], off_BT[:, None, None, :], span=span)
        if self.segment_ids_BT is not None:
            seg = self.segment_ids_BT
            allowed &= seg[:, None, :, None] == seg[:, None, None, :]
        return allowed


jax.tree_util.register_dataclass(
    Mask, data_fields=["segment_ids_BT", "layer"], meta_fields=["causal", "window", "chunk", "sinks", "block_sparse", "spans"])


def visible(mask: Mask, q_off, k_off, *, span=None):
    """The rule of the module docstring, without segment ids, on offsets within a document; works on numpy
    and jax arrays alike (broadcasting). `span`: this query head's (alpha, beta) units, broadcastable."""
    ok = (k_off <= q_off) | (not mask.causal)  # an array whatever the mask
    local = []
    if mask.window is not None:
        local.append(q_off - k_off < mask.window)
    if mask.chunk is not None:
        local.append(q_off // mask.chunk == k_off // mask.chunk)
    if span is not None:
        alpha, beta = span
        local.append(SPAN_UNITS * (q_off - k_off) < alpha + beta * (q_off + 1))
    if mask.block_sparse is not None:
        local.append(_block_sparse_visible(mask.block_sparse, mask.causal, q_off, k_off))
    if not local:  # no restriction: every key is local (and sinks add nothing)
        return ok
    local = functools.reduce(lambda a, b: a & b, local)
    if mask.sinks:
        local = local | (k_off < mask.sinks)
    return ok & local


def _block_sparse_visible(bs: BlockSparse, causal: bool, q_off, k_off):
    bi, bj = q_off // bs.block_size, k_off // bs.block_size
    seen = abs(bi - bj) < bs.local_blocks
    if bs.global_blocks:
        seen = seen | (bj < bs.global_blocks)
        if not causal:
            seen = seen | (bi < bs.global_blocks)
    if bs.stride_blocks:
        seen = seen | ((bi - bj) % bs.stride_blocks == 0)
    return seen


def document_offsets_BT(segment_ids_BT: jax.Array) -> jax.Array:
    """Each token's index within its document (a run of equal segment ids): positions restarting at 0."""
    B, T = segment_ids_BT.shape
    index_T = jnp.arange(T, dtype=jnp.int32)
    starts_BT = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return index_T - jax.lax.cummax(jnp.where(starts_BT, index_T, 0), axis=1)


def block_visible(mask: Mask, T: int, block_q: int, block_k: int, *, packed: bool, kv_heads: int = 1) -> np.ndarray:
    """bool [kv_heads, ceil(T / block_q), ceil(T / block_k)]: which key blocks a query block needs, for any
    query head sharing the kv head (and any layer of a spans plan). Evaluated token by token in numpy
    with `visible`, so it is exact for one document per row.

    packed (segment ids given): documents may start anywhere, so the per-document rules are replaced by
    index rules that contain them (`_packed_superset`), and the anchor keys of the document a query
    block starts in are left to the blockwise impl's anchor pass."""
    nq, nk = -(-T // block_q), -(-T // block_k)
    heads = kv_heads if mask.spans is not None else 1  # without spans every kv head has the same blocks
    out = np.zeros((heads, nq, nk), bool)
    j = np.arange(nk * block_k, dtype=np.int32)[None, None, :]
    for k in range(heads):
        span = _spans_of_kv_head(mask, k, kv_heads)
        n_spans = 1 if span is None else span[0].shape[0]
        rows = max(1, (1 << 24) // (nk * block_k * n_spans * block_q))  # query blocks per numpy pass: ~16M pairs
        for start in range(0, nq, rows):
            n = min(rows, nq - start)
            i = np.arange(start * block_q, (start + n) * block_q, dtype=np.int32)[None, :, None]
            rule = _packed_superset(mask, i, j, span, block_q) if packed else visible(mask, i, j, span=span)
            rule = rule & (i < T) & (j < T)
            out[k, start : start + n] = rule.any(axis=0).reshape(n, block_q, nk, block_k).any(axis=(1, 3))
    return np.broadcast_to(out, (kv_heads, nq, nk))


def _spans_of_kv_head(mask: Mask, k: int, kv_heads: int):
    """The spans (alpha, beta units, [layers * G, 1, 1]) of the query heads sharing kv head k, or None."""
    if mask.spans is None:
        return None
    alpha_LH, beta_LH = mask.spans.units_LH
    G = mask.spans.n_heads // kv_heads
    heads = slice(k * G, (k + 1) * G)
    return alpha_LH[:, heads].reshape(-1, 1, 1), beta_LH[:, heads].reshape(-1, 1, 1)


def _packed_superset(mask: Mask, i, j, span, block_q: int):
    """An index rule containing the per-document rule wherever documents start. Within a document the
    offset difference equals the index difference, so causal and window are unchanged; the others:
      chunk C          -> |i - j| < C
      spans            -> N = i + 1 >= the document's N (spans grow with N)
      block_sparse     -> local: |i - j| < local * S; strided: i - j within S of a multiple of stride * S
                          (a document's blocks straddle at most two row blocks)
      sinks / global   -> keys of documents that start inside i's query block (their anchors lie there);
                          the anchors of the document a query block starts in are the anchor pass's."""
    ok = (j <= i) | (not mask.causal)
    local = []
    if mask.window is not None:
        local.append(i - j < mask.window)
    if mask.chunk is not None:
        local.append(abs(i - j) < mask.chunk)
    if span is not None:
        alpha, beta = span
        local.append(SPAN_UNITS * (i - j) < alpha + beta * (i + 1))
    bs = mask.block_sparse
    if bs is not None:
        if bs.global_blocks and not mask.causal:
            raise NotImplementedError("blockwise attention: BlockSparse.global_blocks with causal=False (global rows) "
                                      "and segment ids; use impl='xla'")
        S = bs.block_size
        seen = abs(i - j) < bs.local_blocks * S
        if bs.stride_blocks:
            r = (i - j) % (bs.stride_blocks * S)
            seen = seen | (r < S) | (r > bs.stride_blocks * S - S)
        local.append(seen)
    if not local:
        return ok
    local = functools.reduce(lambda a, b: a & b, local)
    if mask.anchor:
        block_start = (i // block_q) * block_q
        local = local | ((j >= block_start) & (j < block_start + block_q + mask.anchor))
    return ok & local


def keys_seen(mask: Mask, seq_len: int) -> float:
    """Keys a query at the end of a `seq_len`-token document sees, averaged over heads and layers, counting
    whole windows, chunks and blocks (the FLOPs convention: no causal halving)."""
    if mask.spans is not None:
        alpha, beta = (u.astype(np.float64) for u in mask.spans.units_LH)
        span = np.clip(np.ceil((alpha + beta * seq_len) / SPAN_UNITS), 0, seq_len)
        return float(np.mean(np.minimum(seq_len, span + mask.sinks)))
    if mask.block_sparse is not None:
        bs = mask.block_sparse
        n_blocks = math.ceil(seq_len / bs.block_size)
        last = n_blocks - 1
        seen = [bj for bj in range(last + 1) if _block_sparse_visible(bs, True, last * bs.block_size, bj * bs.block_size)]
        keys = min(seq_len, len(seen) * bs.block_size)
    else:
        keys = min([seq_len] + [b for b in (mask.window, mask.chunk) if b is not None])
    return float(min(seq_len, keys + (mask.sinks if keys < seq_len else 0)))
