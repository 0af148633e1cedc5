"""Block-sparse flash attention: the op layers (and benchmarks) call.

    out_BTHP = flash_attention(q_BTHP, k_BTKP, v_BTKP, blocks_QK=None, visible=None, segment_ids_BT=None,
                               offsets_BT=None, anchor=0, scale=None, block_q=64, block_k=64, impl="auto")

softmax(q k^T * scale) v per query head h, with kv head h // (H / K) (GQA); output in q's dtype,
differentiable in q, k, v. This op knows no mask type (kernels import nothing from layers/); the caller
hands it primitives:

  visible      a jnp callable (q_off, k_off) -> bool on broadcast int32 offsets: which key a query sees
               (None: every key). It is evaluated inside the kernel on every visited block.
  offsets_BT   each token's position within its document (given with segment ids; else token indices)
  segment_ids_BT  packed documents: a query sees only keys with its id
  blocks_QK    numpy bool [ceil(T / block_q), ceil(T / block_k)], static: the key blocks each query block
               visits; it must contain every visible pair (the kernel never looks outside it). None: from
               `visible` on token indices in numpy (rows of one document), or every block (packed).
  anchor       packed documents only: each query block also visits the key blocks holding the first
               `anchor` tokens of the document its first query is in (sinks, global blocks: where they lie
               is known only at run time, so these blocks join the list then)

  index_rule   `visible` on token indices equals it on document offsets (causal, window): what the splash
               path needs for packed rows (its static mask is on token indices, its segment ids separate
               the documents)

impl (dispatch):
  auto     pallas on GPU, splash on TPU, xla elsewhere
  pallas   kernel.py: Pallas forward, dq and dk/dv kernels (Triton lowering), custom_vjp; on CPU it runs in
           interpret mode (slow: tests only). On TPU: splash.
  splash   JAX's splash attention (jax.experimental.pallas.ops.tpu.splash_attention, TPU; interpret mode on
           CPU), its static mask the rule evaluated in numpy on token indices, padded to blocks of 128;
           packed rows only with index_rule=True (else NotImplementedError)
  xla      reference.attention: every pair, masked, fp32 (autodiff)

Benchmarks, e.g. causal and a 512-token window:
    flash_attention(q, k, v, visible=lambda i, j: j <= i, impl="pallas")
    flash_attention(q, k, v, visible=lambda i, j: (j <= i) & (i - j < 512), impl="pallas")
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from effax.kernels.flash_attention import kernel, reference

IMPLS = ("auto", "pallas", "splash", "xla")


def flash_attention(q_BTHP, k_BTKP, v_BTKP, *, blocks_QK=None, visible=None, segment_ids_BT=None, offsets_BT=None,
                    anchor: int = 0, index_rule: bool = False, scale: float | None = None, block_q: int = 64,
                    block_k: int = 64, impl: str = "auto", interpret: bool | None = None):
    """See the module docstring. interpret: run the Pallas kernels in interpret mode (default: on CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"flash_attention impl={impl!r} is not one of {IMPLS}")
    B, T, H, P = q_BTHP.shape
    if k_BTKP.shape != v_BTKP.shape or k_BTKP.shape[:2] != (B, T) or k_BTKP.shape[3] != P or H % k_BTKP.shape[2]:
        raise ValueError(f"flash_attention: q {q_BTHP.shape} [B, T, H, P], k {k_BTKP.shape} and v {v_BTKP.shape} "
                         "[B, T, K, P] with K dividing H")
    packed = segment_ids_BT is not None
    if packed and offsets_BT is None:
        raise ValueError("flash_attention: segment_ids_BT needs offsets_BT (each token's position in its document)")
    scale = 1 / math.sqrt(P) if scale is None else float(scale)
    backend = jax.default_backend()
    if impl == "auto":
        impl = {"gpu": "pallas", "tpu": "splash"}.get(backend, "xla")
    if impl == "pallas" and backend == "tpu":
        impl = "splash"  # the Triton kernel is for GPUs; on TPU the same op is JAX's splash attention
    if impl == "xla":
        return reference.attention(q_BTHP, k_BTKP, v_BTKP, visible=visible, segment_ids_BT=segment_ids_BT,
                                   offsets_BT=offsets_BT if packed else None, scale=scale)
    interpret = backend == "cpu" if interpret is None else interpret
    if impl == "splash":
        if packed and not index_rule:
            raise NotImplementedError("flash_attention impl='splash': packed documents need a rule that is the same on "
                                      "token indices as on document offsets (index_rule=True: causal, window); chunks, "
                                      "sinks and block-sparse patterns restart per document, which splash cannot express")
        return _splash(q_BTHP, k_BTKP, v_BTKP, visible, segment_ids_BT, scale, interpret)
    n_q, n_k = -(-T // block_q), -(-T // block_k)
    full_QK = np.zeros((n_q, n_k), bool)  # packed: documents may split any block, so none is known full
    if not packed:
        some_QK, full_QK = _rule_tables(visible, T, block_q, block_k)
    if blocks_QK is None:
        blocks_QK = some_QK if not packed else np.ones((n_q, n_k), bool)
    blocks_QK = np.asarray(blocks_QK, bool)
    if blocks_QK.shape != (n_q, n_k):
        raise ValueError(f"flash_attention: blocks_QK has shape {blocks_QK.shape}, expected {(n_q, n_k)} "
                         f"(T={T}, block_q={block_q}, block_k={block_k})")
    Tp = -(-T // max(block_q, block_k)) * max(block_q, block_k)  # the kernel's padded length
    table, full = (np.zeros((Tp // block_q, Tp // block_k), bool) for _ in range(2))
    table[:n_q, :n_k] = blocks_QK
    full[:n_q, :n_k] = full_QK & blocks_QK
    if packed and anchor:
        lists = _dynamic_lists(table, _anchor_blocks(offsets_BT, T, block_q, block_k, table.shape, anchor),
                               -(-anchor // block_k) + 1)
    else:
        lists = _static_lists(table, full)
    return kernel.flash_attention(q_BTHP, k_BTKP, v_BTKP, lists=lists, scale=scale, block_q=block_q, block_k=block_k,
                                  visible=visible, offsets_BT=offsets_BT, segment_ids_BT=segment_ids_BT,
                                  interpret=interpret)


def _splash(q_BTHP, k_BTKP, v_BTKP, visible, segment_ids_BT, scale, interpret):
    """JAX's splash attention: per batch row (vmap), per kv head (vmap) its MQA kernel over the G query
    heads. T is padded to blocks of 128 (TPU tiles); a padded query sees only itself, so no real row sees a
    padded key and no row is empty (splash needs every row to see a key; real rows that see none are
    zeroed afterwards). Splash does not scale: q is pre-scaled."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    G, Tp = H // K, -(-T // 128) * 128
    i, j = np.arange(Tp)[:, None], np.arange(Tp)[None, :]
    seen = np.ones((Tp, Tp), bool) if visible is None else np.broadcast_to(np.asarray(visible(i, j)), (Tp, Tp))
    seen = (seen & (i < T) & (j < T)) | ((i == j) & (i >= T))
    empty_T = ~seen[:T].any(1)
    block = min(512, Tp) if Tp % min(512, Tp) == 0 else 128
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel_fn = splash.make_splash_mqa(splash_mask.MultiHeadMask([splash_mask.NumpyMask(seen)] * G), block_sizes=sizes,
                                       head_shards=1, q_seq_shards=1, interpret=interpret)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    q_BKGTP = pad(q_BTHP * jnp.asarray(scale, q_BTHP.dtype)).reshape(B, Tp, K, G, P).transpose(0, 2, 3, 1, 4)
    k_BKTP, v_BKTP = (pad(x.astype(q_BTHP.dtype)).transpose(0, 2, 1, 3) for x in (k_BTKP, v_BTKP))
    seg_BT = jnp.zeros((B, Tp), jnp.int32) if segment_ids_BT is None else pad(segment_ids_BT.astype(jnp.int32))

    def row(q_KGTP, k_KTP, v_KTP, seg_T):
        ids = splash.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel_fn(q, k, v, segment_ids=ids))(q_KGTP, k_KTP, v_KTP)

    out_BKGTP = jax.vmap(row)(q_BKGTP, k_BKTP, v_BKTP, seg_BT)
    out_BTHP = out_BKGTP.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, P)[:, :T]
    if empty_T.any():
        out_BTHP = jnp.where(jnp.asarray(empty_T)[None, :, None, None], 0, out_BTHP)
    return out_BTHP.astype(q_BTHP.dtype)


def _rule_tables(visible, T: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """bool [n_q, n_k] twice: the blocks holding a visible pair, and the blocks visible everywhere (inside
    T), the rule evaluated on token indices in numpy (exact for one document per row), a slab of query
    blocks at a time."""
    n_q, n_k = -(-T // block_q), -(-T // block_k)
    some, full = np.zeros((n_q, n_k), bool), np.zeros((n_q, n_k), bool)
    j = np.arange(n_k * block_k)[None, :]
    rows = max(1, (1 << 22) // (n_k * block_k * block_q))
    for start in range(0, n_q, rows):
        n = min(rows, n_q - start)
        i = np.arange(start * block_q, (start + n) * block_q)[:, None]
        rule = np.ones((), bool) if visible is None else np.asarray(visible(i, j))
        seen = np.broadcast_to(rule, (i.shape[0], j.shape[1])) & (i < T) & (j < T)
        seen = seen.reshape(n, block_q, n_k, block_k)
        some[start : start + n], full[start : start + n] = seen.any(axis=(1, 3)), seen.all(axis=(1, 3))
    return some, full


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _static_lists(table_QK: np.ndarray, full_QK: np.ndarray | None = None):
    """(kblocks [1, n_q, M], kcount [1, n_q, 2], qblocks [1, n_k, N], qcount [1, n_k, 2]), int32 numpy; each
    list holds its fully visible blocks first, its count is (full blocks, all blocks)."""
    full_QK = np.zeros_like(table_QK) if full_QK is None else full_QK

    def lists(table, full):
        out = np.zeros((1, table.shape[0], _pow2(max(int(table.sum(1).max(initial=0)), 1))), np.int32)
        count = np.zeros((1, table.shape[0], 2), np.int32)
        for r, (row, row_full) in enumerate(zip(table, full)):
            idx = np.concatenate([np.flatnonzero(row_full), np.flatnonzero(row & ~row_full)])
            out[0, r, : len(idx)] = idx
            count[0, r] = row_full.sum(), len(idx)
        return out, count

    return (*lists(table_QK, full_QK), *lists(table_QK.T, full_QK.T))


def _anchor_blocks(offsets_BT, T, block_q, block_k, shape, anchor):
    """bool [B, n_q, n_k]: the key blocks holding the first `anchor` tokens of the document each query
    block's first query is in."""
    n_q, n_k = shape
    first_Q = jnp.minimum(jnp.arange(n_q) * block_q, T - 1)
    start_BQ = (first_Q - offsets_BT[:, first_Q])[:, :, None]  # that document's first token
    key_start = jnp.arange(n_k) * block_k
    return (key_start < start_BQ + anchor) & (key_start + block_k > start_BQ) & (key_start < T)


def _dynamic_lists(table_QK: np.ndarray, extra_BQK, extra_per_row: int):
    """The lists of `table | extra` per batch row (jnp). A row's list is its blocks in increasing order:
    argsort of (not visited) is stable, so the visited blocks come first. Sizes are static bounds: a query
    block gains at most `extra_per_row` key blocks; a key block may gain every query block."""
    table_BQK = jnp.asarray(table_QK)[None] | extra_BQK
    n_q, n_k = table_QK.shape

    def lists(t, width):
        width = _pow2(max(min(width, t.shape[-1]), 1))
        order = jnp.argsort(~t, axis=-1, stable=True).astype(jnp.int32)
        order = jnp.pad(order, ((0, 0), (0, 0), (0, max(width - t.shape[-1], 0))))[..., :width]
        count = jnp.sum(t, axis=-1, dtype=jnp.int32)[..., None]
        return order, jnp.concatenate([jnp.zeros_like(count), count], axis=-1)  # no block known full (packed)

    return (*lists(table_BQK, int(table_QK.sum(1).max(initial=0)) + extra_per_row),
            *lists(jnp.swapaxes(table_BQK, 1, 2), n_q))
