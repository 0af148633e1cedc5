"""Flash attention's algorithm in plain JAX, computing only the blocks a `Mask` keeps.

    out_BTHP = blockwise_attention(q_BTHP, k_BTKP, v_BTKP, mask=Mask(...), scale=1 / sqrt(P))

Queries are cut into blocks of `block_q` tokens, keys into blocks of `block_k`. From the mask's static
fields, numpy decides once (per shape and mask) which (query block, key block) pairs hold any visible
pair (`masks.block_visible`): the schedule. Only those pairs are ever computed.

The schedule is packed into lanes: each lane runs the key blocks of one query block after another (a
"row"), rows packed first-fit-decreasing so every lane has the same number of steps (causal: row i
pairs with row n - 1 - i). A `lax.scan` over steps computes one block per lane per step, as one batched
matmul over lanes, batch rows and heads, with an online softmax: a running max m, a running sum l and an
unnormalised output per query; at a row's last block the lane writes out acc / l and the log-sum-exp
m + log l. The backward pass (a custom VJP) saves only q, k, v, the output and the log-sum-exp, and per
kept block recomputes p = exp(q k^T * scale - lse), then dv += p^T do, dp = do v^T,
ds = p * (dp - rowsum(do * o)), dq += ds k * scale, dk += ds^T q * scale (FlashAttention-2, Dao 2023).
Within computed blocks the exact rule (`masks.visible`, segment ids, the true length) is applied.

Packed documents (segment ids): the per-document rules are unknown until run time, so the schedule uses
index rules that contain them (`masks._packed_superset`); the sinks / global tokens of the document a
query block starts in, which may lie anywhere before it, are computed by a small "anchor pass" (those
`mask.anchor` keys, gathered per query block and batch row) and merged through the log-sum-exp.

Memory: the inputs, the output and one block per lane per step; time: the kept blocks (plus the lanes'
padding, reported by `schedule(...).computed`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from effax.layers.masks import Mask, block_visible, document_offsets_BT, visible


def default_blocks(T: int, mask: Mask | None = None) -> tuple[int, int]:
    """(block_q, block_k) for T tokens: 64 up to 1024, then 128 (larger blocks run the matmuls faster on
    the 2-core CPU, docs/benchmarks.md); a block-sparse mask's own block size when it is in [16, 128], so
    that the computed blocks are the pattern's."""
    if mask is not None and mask.block_sparse is not None and 16 <= mask.block_sparse.block_size <= 128:
        return (mask.block_sparse.block_size,) * 2
    return (64, 64) if T <= 1024 else (128, 128)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which blocks run, as lanes x steps. Rows are (kv head, query block) = kv_head * n_q + q_block;
    key blocks are kv_head * n_k + k_block. Each slot also names its block's static mask, an index into
    `block_masks` (deduplicated; 0 is the padding slots' all-False mask), as splash attention does."""

    n_q: int
    n_k: int
    kept: int  # (kv head, query block, key block) triples the mask keeps
    row_SL: np.ndarray  # int32 [steps, lanes]
    kblock_SL: np.ndarray  # int32 [steps, lanes]
    first_SL: np.ndarray  # bool: the row's first key block (reset the running softmax)
    last_SL: np.ndarray  # bool: the row's last key block (write the row out)
    mask_SL: np.ndarray  # int32: which of block_masks
    block_masks: np.ndarray  # bool [n masks, block_q, block_k]
    dynamic: bool  # the exact rule needs run-time data (spans' layer, packed documents' offsets)
    has_KQK: np.ndarray  # bool [kv heads, n_q, n_k]: the schedule, as a table

    @property
    def steps(self) -> int:
        return self.row_SL.shape[0]

    @property
    def lanes(self) -> int:
        return self.row_SL.shape[1]

    @property
    def computed(self) -> int:
        """Block products computed per call (kept plus padding)."""
        return self.steps * self.lanes


@functools.lru_cache(maxsize=128)
def schedule(static: tuple, T: int, block_q: int, block_k: int, kv_heads: int, packed: bool) -> Schedule:
    """The block schedule of a mask with static fields `static` (`Mask.static`) over T tokens."""
    mask = Mask(*static)
    has = block_visible(mask, T, block_q, block_k, packed=packed, kv_heads=kv_heads)
    n_q, n_k = has.shape[1:]
    heads = range(kv_heads) if mask.spans is not None else range(1)  # without spans all kv heads agree
    rows = [(k * n_q + qb, [k * n_k + kb for kb in np.flatnonzero(has[k, qb])]) for k in heads for qb in range(n_q)]
    lanes, steps = _pack([r for r in rows if r[1]])
    if mask.spans is None:  # the same lanes for every kv head, shifted to its rows and key blocks
        lanes = [[(r + k * n_q, [kb + k * n_k for kb in kbs]) for r, kbs in lane] for k in range(kv_heads) for lane in lanes]
    # Static block masks: the whole rule on token indices when it is exact there (one document per row,
    # or packed documents under causal / window only: within a document index differences are offset
    # differences); else only causality and the true length, the rest evaluated at run time.
    anchored = any((mask.chunk, mask.sinks, mask.block_sparse))
    dynamic = mask.spans is not None or (packed and anchored)
    mask_of = _BlockMasks(Mask(causal=mask.causal) if dynamic else mask, T, block_q, block_k)
    tables = {name: np.zeros((steps, max(len(lanes), 1)), dtype) for name, dtype in
              (("row", np.int32), ("kblock", np.int32), ("first", bool), ("last", bool), ("mask", np.int32))}
    for lane_id, lane in enumerate(lanes):
        step = 0
        for r, kbs in lane:
            ids = mask_of.row(r % n_q, [kb % n_k for kb in kbs])
            for n, (kb, mask_id) in enumerate(zip(kbs, ids)):
                for name, value in (("row", r), ("kblock", kb), ("first", n == 0), ("last", n == len(kbs) - 1), ("mask", mask_id)):
                    tables[name][step, lane_id] = value
                step += 1
        tables["row"][step:, lane_id] = lane[-1][0]  # padding: any row, mask 0, never written out
    return Schedule(n_q, n_k, int(has.sum()), tables["row"], tables["kblock"], tables["first"], tables["last"],
                    tables["mask"], np.stack(mask_of.masks), dynamic, has)


class _BlockMasks:
    """Deduplicated [block_q, block_k] masks of a rule on token indices; index 0 is all False (padding)."""

    def __init__(self, rule: Mask, T: int, block_q: int, block_k: int):
        self.rule, self.T, self.bq, self.bk = rule, T, block_q, block_k
        self.masks, self.ids, self.rows = [np.zeros((block_q, block_k), bool)], {}, {}

    def row(self, q_block: int, k_blocks: list) -> list:
        """The mask ids of one query block's key blocks (cached: every kv head repeats them)."""
        key = (q_block, tuple(k_blocks))
        if key not in self.rows:
            i = q_block * self.bq + np.arange(self.bq)[:, None, None]
            j = (np.asarray(k_blocks)[:, None] * self.bk + np.arange(self.bk))[None]  # [1, blocks, bk]
            blocks = np.broadcast_to(visible(self.rule, i, j) & (j < self.T), (self.bq, len(k_blocks), self.bk))
            self.rows[key] = [self._id(np.ascontiguousarray(blocks[:, n])) for n in range(len(k_blocks))]
        return self.rows[key]

    def _id(self, block: np.ndarray) -> int:
        mask_id = self.ids.setdefault(block.tobytes(), len(self.masks))
        if mask_id == len(self.masks):
            self.masks.append(block)
        return mask_id


def _pack(rows: list) -> tuple[list, int]:
    """First-fit-decreasing into lanes of equal length; the length (>= the longest row) that needs the
    fewest slots, then the fewest steps."""
    if not rows:
        return [], 1
    longest = max(len(kbs) for _, kbs in rows)
    best = None
    for steps in range(longest, longest + min(longest, 8) + 1):
        lanes, used = [], []
        for row in sorted(rows, key=lambda r: -len(r[1])):
            fit = next((n for n, u in enumerate(used) if u + len(row[1]) <= steps), None)
            if fit is None:
                lanes.append([row])
                used.append(len(row[1]))
            else:
                lanes[fit].append(row)
                used[fit] += len(row[1])
        cost = (len(lanes) * steps, steps)
        if best is None or cost < best[0]:
            best = (cost, lanes, steps)
    return best[1], best[2]


def blockwise_attention(q_BTHP, k_BTKP, v_BTKP, *, mask: Mask, scale: float, block_q: int | None = None,
                        block_k: int | None = None) -> jax.Array:
    """softmax(q k^T * scale) v over the mask's kept blocks; output in q's dtype (see the module docstring)."""
    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    if mask.spans is not None and mask.spans.n_heads != H:
        raise ValueError(f"Mask.spans has {mask.spans.n_heads} heads per layer, the attention has {H}")
    default_q, default_k = default_blocks(T, mask)
    fn = _attention_fn(mask.static, T, H, K, block_q or default_q, block_k or default_k,
                       mask.segment_ids_BT is not None, float(scale))
    return fn(q_BTHP, k_BTKP, v_BTKP, mask.segment_ids_BT, jnp.asarray(mask.layer, jnp.int32))


@functools.lru_cache(maxsize=128)
def _attention_fn(static, T, H, K, block_q, block_k, packed, scale):
    """The custom-VJP function for one static configuration (its schedule baked in as constants)."""
    core = _Core(Mask(*static), T, H, K, block_q, block_k, packed, scale)

    @jax.custom_vjp
    def attend(q, k, v, seg, layer):
        return attend_fwd(q, k, v, seg, layer)[0]

    def attend_fwd(q, k, v, seg, layer):
        blocks = core.blocks(q, k, v, seg, layer)
        o_RBQP, lse_RBQ = core.forward(blocks)
        return core.unblock_q(o_RBQP).astype(q.dtype), (blocks, o_RBQP, lse_RBQ)

    def attend_bwd(res, do_BTHP):
        blocks, o_RBQP, lse_RBQ = res
        dq_RBQP, dk_BTKP, dv_BTKP = core.backward(blocks, o_RBQP, lse_RBQ, core.q_blocks(do_BTHP.astype(jnp.float32)))
        q_dtype, kv_dtype = blocks["q"].dtype, blocks["k"].dtype
        return (core.unblock_q(dq_RBQP).astype(q_dtype), dk_BTKP.astype(kv_dtype), dv_BTKP.astype(kv_dtype), None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


class _Core:
    """Layouts: query blocks q_RBQP [K * n_q, B, G * block_q, P] (row r = kv head * n_q + query block;
    the G query heads of a kv head side by side, so a block is one [G * block_q, P] x [P, block_k]
    matmul), key blocks k_RBKP [K * n_k, B, block_k, P]. Logits, softmax and accumulators are fp32."""

    def __init__(self, mask: Mask, T, H, K, block_q, block_k, packed, scale):
        self.mask, self.T, self.H, self.K, self.G = mask, T, H, K, H // K
        self.bq, self.bk, self.packed, self.scale = block_q, block_k, packed, scale
        self.sched = schedule(mask.static, T, block_q, block_k, K, packed)
        self.nq, self.nk = self.sched.n_q, self.sched.n_k
        self.anchor = mask.anchor if packed else 0  # unpacked: the anchors are in the schedule itself

    # --- layouts ---------------------------------------------------------------------------------

    def q_blocks(self, x_BTHP):
        B, T, H, P = x_BTHP.shape
        x = jnp.pad(x_BTHP, ((0, 0), (0, self.nq * self.bq - T), (0, 0), (0, 0)))
        x = x.reshape(B, self.nq, self.bq, self.K, self.G, P).transpose(3, 1, 0, 4, 2, 5)
        return x.reshape(self.K * self.nq, B, self.G * self.bq, P)

    def unblock_q(self, x_RBQP):
        _, B, _, P = x_RBQP.shape
        x = x_RBQP.reshape(self.K, self.nq, B, self.G, self.bq, P).transpose(2, 1, 4, 0, 3, 5)
        return x.reshape(B, self.nq * self.bq, self.H, P)[:, : self.T]

    def kv_blocks(self, x_BTKP):
        B, T, K, P = x_BTKP.shape
        x = jnp.pad(x_BTKP, ((0, 0), (0, self.nk * self.bk - T), (0, 0), (0, 0)))
        return x.reshape(B, self.nk, self.bk, K, P).transpose(3, 1, 0, 2, 4).reshape(K * self.nk, B, self.bk, P)

    def unblock_kv(self, x_RBKP):
        _, B, _, P = x_RBKP.shape
        x = x_RBKP.reshape(self.K, self.nk, B, self.bk, P).transpose(2, 1, 3, 0, 4)
        return x.reshape(B, self.nk * self.bk, self.K, P)[:, : self.T]

    def blocks(self, q, k, v, seg_BT, layer):
        """The blocked inputs and what the masks of their blocks need (a pytree: the VJP's residuals)."""
        B = q.shape[0]
        blocks = {"q": self.q_blocks(q * jnp.asarray(self.scale, q.dtype)), "k": self.kv_blocks(k), "v": self.kv_blocks(v),
                  "layer": layer}
        if self.packed:
            off_BT = document_offsets_BT(seg_BT)
            for name, n, size in (("q", self.nq, self.bq), ("k", self.nk, self.bk)):  # padding: masked by the block masks
                to_blocks = lambda x: jnp.pad(x, ((0, 0), (0, n * size - self.T))).reshape(B, n, size).transpose(1, 0, 2)  # noqa: E731
                blocks[f"{name}_off"], blocks[f"{name}_seg"] = to_blocks(off_BT), to_blocks(seg_BT)
            if self.anchor:
                blocks.update(self._anchor_keys(k, v, seg_BT, off_BT))
        return blocks

    # --- masks -----------------------------------------------------------------------------------

    def _spans(self, blocks, kv_head_L):
        """(alpha, beta) units of the G query heads of each kv head in kv_head_L, [len, G], or None."""
        if self.mask.spans is None:
            return None
        heads = kv_head_L[:, None] * self.G + jnp.arange(self.G)
        return tuple(u[heads] for u in dataclasses.replace(self.mask, layer=blocks["layer"]).spans_H())

    def lane_visible(self, blocks, row_L, kblock_L, mask_L, *, transposed: bool):
        """bool, [L, B|1, G|1, bq, bk] (or [L, B|1, bk, G|1, bq] transposed): which pairs of each lane's
        block are visible: its static block mask, then the run-time parts of the rule."""
        static = jnp.asarray(self.sched.block_masks.swapaxes(1, 2) if transposed else self.sched.block_masks)[mask_L]
        seen = static[:, None, :, None, :] if transposed else static[:, None, None]
        if not (self.packed or self.sched.dynamic):
            return seen
        q_block, k_block = row_L % self.nq, kblock_L % self.nk
        # Axes: lane, batch, then (g, query, key) or (key, g, query).
        qa = (lambda x: x[:, :, None, None, :]) if transposed else (lambda x: x[:, :, None, :, None])  # noqa: E731
        ka = (lambda x: x[:, :, :, None, None]) if transposed else (lambda x: x[:, :, None, None, :])  # noqa: E731
        ga = (lambda x: x[:, None, None, :, None]) if transposed else (lambda x: x[:, None, :, None, None])  # noqa: E731
        if self.packed:
            seen = seen & (qa(blocks["q_seg"][q_block]) == ka(blocks["k_seg"][k_block]))
        if self.sched.dynamic:
            if self.packed:
                q_off, k_off = blocks["q_off"][q_block], blocks["k_off"][k_block]  # [L, B, bq], [L, B, bk]
            else:
                q_off = (q_block[:, None] * self.bq + jnp.arange(self.bq))[:, None]  # [L, 1, bq]
                k_off = (k_block[:, None] * self.bk + jnp.arange(self.bk))[:, None]
            span = self._spans(blocks, row_L // self.nq)
            seen = seen & visible(self.mask, qa(q_off), ka(k_off), span=None if span is None else tuple(ga(u) for u in span))
        return seen

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, blocks):
        q_RBQP, k_RBKP, v_RBKP = blocks["q"], blocks["k"], blocks["v"]
        R, B, Q, P = q_RBQP.shape
        s = self.sched
        L = s.lanes

        def step(carry, xs):
            m_LBQ, l_LBQ, acc_LBQP, o_RBQP, lse_RBQ = carry
            row, kblock, first, last, mask_id = xs
            logits = jnp.einsum("lbqp,lbkp->lbqk", q_RBQP[row], k_RBKP[kblock], preferred_element_type=jnp.float32)
            seen = self.lane_visible(blocks, row, kblock, mask_id, transposed=False)
            logits = jnp.where(seen, logits.reshape(L, B, self.G, self.bq, self.bk), -jnp.inf).reshape(L, B, Q, self.bk)
            fresh = first[:, None, None]
            m_LBQ = jnp.where(fresh, -jnp.inf, m_LBQ)
            l_LBQ = jnp.where(fresh, 0.0, l_LBQ)
            acc_LBQP = jnp.where(fresh[..., None], 0.0, acc_LBQP)
            m_new = jnp.maximum(m_LBQ, logits.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: keep exp() finite
            p = jnp.exp(logits - m_safe[..., None])
            rescale = jnp.exp(m_LBQ - m_safe)
            l_LBQ = rescale * l_LBQ + p.sum(-1)
            pv = jnp.einsum("lbqk,lbkp->lbqp", p.astype(v_RBKP.dtype), v_RBKP[kblock], preferred_element_type=jnp.float32)
            acc_LBQP = rescale[..., None] * acc_LBQP + pv
            o, lse = _normalise(acc_LBQP, l_LBQ, m_safe)
            out_row = jnp.where(last, row, R)  # R: out of range, dropped
            o_RBQP = o_RBQP.at[out_row].set(o, mode="drop")
            lse_RBQ = lse_RBQ.at[out_row].set(lse, mode="drop")
            return (m_new, l_LBQ, acc_LBQP, o_RBQP, lse_RBQ), None

        init = (jnp.full((L, B, Q), -jnp.inf), jnp.zeros((L, B, Q)), jnp.zeros((L, B, Q, P)),
                jnp.zeros((R, B, Q, P)), jnp.full((R, B, Q), -jnp.inf))  # rows without blocks: 0, lse -inf
        xs = tuple(jnp.asarray(t) for t in (s.row_SL, s.kblock_SL, s.first_SL, s.last_SL, s.mask_SL))
        (_, _, _, o_RBQP, lse_RBQ), _ = jax.lax.scan(step, init, xs)
        if self.anchor:
            o_RBQP, lse_RBQ = _merge(o_RBQP, lse_RBQ, *self._anchor_forward(blocks))
        return o_RBQP, lse_RBQ

    # --- backward --------------------------------------------------------------------------------

    def backward(self, blocks, o_RBQP, lse_RBQ, do_RBQP):
        q_RBQP, k_RBKP, v_RBKP = (blocks[n].astype(jnp.float32) for n in ("q", "k", "v"))  # fp32 gradients
        s = self.sched
        delta_RBQ = jnp.sum(do_RBQP * o_RBQP, axis=-1)
        lse_RBQ = jnp.where(jnp.isfinite(lse_RBQ), lse_RBQ, 0.0)  # empty rows: every p is masked to 0 anyway
        L, B, Q = s.lanes, q_RBQP.shape[1], q_RBQP.shape[2]

        def step(carry, xs):
            dq_RBQP, dk_RBKP, dv_RBKP = carry
            row, kblock, mask_id = xs
            q, k, v, do = q_RBQP[row], k_RBKP[kblock], v_RBKP[kblock], do_RBQP[row]
            # Key-major logits [L, B, bk, Q]: dk and dv are then plain (not transposed) matmuls.
            logits = jnp.einsum("lbkp,lbqp->lbkq", k, q, preferred_element_type=jnp.float32)
            seen = self.lane_visible(blocks, row, kblock, mask_id, transposed=True)
            logits = logits.reshape(L, B, self.bk, self.G, self.bq)
            p = jnp.where(seen, jnp.exp(logits - lse_RBQ[row].reshape(L, B, 1, self.G, self.bq)), 0.0).reshape(L, B, self.bk, Q)
            dp = jnp.einsum("lbkp,lbqp->lbkq", v, do)
            ds = p * (dp - delta_RBQ[row][:, :, None, :])
            dv_RBKP = dv_RBKP.at[kblock].add(jnp.einsum("lbkq,lbqp->lbkp", p, do))
            dk_RBKP = dk_RBKP.at[kblock].add(jnp.einsum("lbkq,lbqp->lbkp", ds, q))
            dq_RBQP = dq_RBQP.at[row].add(jnp.einsum("lbkq,lbkp->lbqp", ds, k))
            return (dq_RBQP, dk_RBKP, dv_RBKP), None

        init = (jnp.zeros(q_RBQP.shape), jnp.zeros(k_RBKP.shape), jnp.zeros(v_RBKP.shape))
        xs = tuple(jnp.asarray(t) for t in (s.row_SL, s.kblock_SL, s.mask_SL))
        (dq_RBQP, dk_RBKP, dv_RBKP), _ = jax.lax.scan(step, init, xs)
        dk_BTKP, dv_BTKP = self.unblock_kv(dk_RBKP), self.unblock_kv(dv_RBKP)
        if self.anchor:
            dq_anchor, dk_anchor, dv_anchor = self._anchor_backward(blocks, lse_RBQ, do_RBQP, delta_RBQ)
            dq_RBQP, dk_BTKP, dv_BTKP = dq_RBQP + dq_anchor, dk_BTKP + dk_anchor, dv_BTKP + dv_anchor
        return dq_RBQP * self.scale, dk_BTKP, dv_BTKP

    # --- the anchor pass (packed documents with sinks or global blocks) ----------------------------

    def _anchor_keys(self, k_BTKP, v_BTKP, seg_BT, off_BT):
        """The `anchor` first keys of the document each query block starts in, [K * n_q, B, A, P]."""
        B = k_BTKP.shape[0]
        first_query_n = jnp.minimum(jnp.arange(self.nq) * self.bq, self.T - 1)
        start_Bn = first_query_n - off_BT[:, first_query_n]
        key_BnA = start_Bn[:, :, None] + jnp.arange(self.anchor)  # may run past T: masked
        clipped = jnp.minimum(key_BnA, self.T - 1)

        def gather(x_BTKP):
            x = jnp.take_along_axis(x_BTKP, clipped.reshape(B, -1)[:, :, None, None], axis=1)
            x = x.reshape(B, self.nq, self.anchor, self.K, -1).transpose(3, 1, 0, 2, 4)
            return x.reshape(self.K * self.nq, B, self.anchor, -1)

        take = lambda x_BT: jnp.take_along_axis(x_BT, clipped.reshape(B, -1), axis=1).reshape(B, self.nq, self.anchor)  # noqa: E731
        return {"anchor_k": gather(k_BTKP), "anchor_v": gather(v_BTKP), "anchor_key": key_BnA,
                "anchor_off": take(off_BT), "anchor_seg": take(seg_BT)}

    def _anchor_visible(self, blocks):
        """bool [K * n_q, B, G, bq, A]: the anchor keys a query sees that the schedule did not compute."""
        B = blocks["anchor_key"].shape[0]
        key_nBA = blocks["anchor_key"].transpose(1, 0, 2)
        q_off, q_seg = blocks["q_off"][:, :, None, :, None], blocks["q_seg"][:, :, None, :, None]  # [n, B, 1, bq, 1]
        k_off = blocks["anchor_off"].transpose(1, 0, 2)[:, :, None, None, :]
        k_seg = blocks["anchor_seg"].transpose(1, 0, 2)[:, :, None, None, :]
        kv_head_R = jnp.repeat(jnp.arange(self.K), self.nq)
        span = self._spans(blocks, kv_head_R)
        seen = []
        for k in range(self.K):  # the kv heads differ only in spans and in which blocks they computed
            head_span = None if span is None else tuple(u[k * self.nq : (k + 1) * self.nq, None, :, None, None] for u in span)
            in_schedule = jnp.asarray(self.sched.has_KQK[k])[jnp.arange(self.nq)[:, None, None], jnp.minimum(key_nBA // self.bk, self.nk - 1)]
            extra = (key_nBA < self.T) & ~in_schedule
            seen.append(visible(self.mask, q_off, k_off, span=head_span) & (q_seg == k_seg) & extra[:, :, None, None, :])
        return jnp.concatenate([jnp.broadcast_to(s, (self.nq, B, self.G, self.bq, self.anchor)) for s in seen])

    def _anchor_forward(self, blocks):
        R, B, Q, P = blocks["q"].shape
        logits = jnp.einsum("rbqp,rbap->rbqa", blocks["q"], blocks["anchor_k"], preferred_element_type=jnp.float32)
        logits = jnp.where(self._anchor_visible(blocks), logits.reshape(R, B, self.G, self.bq, -1), -jnp.inf).reshape(R, B, Q, -1)
        m = logits.max(-1)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp(logits - m_safe[..., None])
        acc = jnp.einsum("rbqa,rbap->rbqp", p.astype(blocks["anchor_v"].dtype), blocks["anchor_v"], preferred_element_type=jnp.float32)
        return _normalise(acc, p.sum(-1), m_safe)

    def _anchor_backward(self, blocks, lse_RBQ, do_RBQP, delta_RBQ):
        R, B, Q, P = blocks["q"].shape
        k, v = blocks["anchor_k"], blocks["anchor_v"]
        logits = jnp.einsum("rbqp,rbap->rbqa", blocks["q"], k, preferred_element_type=jnp.float32)
        p = jnp.where(self._anchor_visible(blocks), jnp.exp(logits - lse_RBQ[..., None]).reshape(R, B, self.G, self.bq, -1), 0.0)
        p = p.reshape(R, B, Q, -1)
        ds = p * (jnp.einsum("rbqp,rbap->rbqa", do_RBQP, v.astype(jnp.float32)) - delta_RBQ[..., None])
        dq = jnp.einsum("rbqa,rbap->rbqp", ds, k.astype(jnp.float32))
        key_BnA = jnp.where(blocks["anchor_key"] < self.T, blocks["anchor_key"], self.T)  # past the end: dropped

        def scatter(dx_RBAP):
            dx = dx_RBAP.reshape(self.K, self.nq, B, self.anchor, P).transpose(2, 1, 3, 0, 4).reshape(B, -1, self.K, P)
            return jnp.zeros((B, self.T, self.K, P)).at[jnp.arange(B)[:, None], key_BnA.reshape(B, -1)].add(dx, mode="drop")

        dk = scatter(jnp.einsum("rbqa,rbqp->rbap", ds, blocks["q"].astype(jnp.float32)))
        dv = scatter(jnp.einsum("rbqa,rbqp->rbap", p, do_RBQP))
        return dq, dk, dv


def _normalise(acc, l, m):
    """(acc / l, m + log l); a row that saw nothing gives (0, -inf)."""
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    return jnp.where(seen[..., None], acc / l_safe[..., None], 0.0), jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _merge(o1, lse1, o2, lse2):
    """Two softmaxes over disjoint key sets, combined through their log-sum-exps."""
    lse = jnp.logaddexp(lse1, lse2)
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    w1 = jnp.where(lse1 == -jnp.inf, 0.0, jnp.exp(lse1 - lse_safe))
    w2 = jnp.where(lse2 == -jnp.inf, 0.0, jnp.exp(lse2 - lse_safe))
    return w1[..., None] * o1 + w2[..., None] * o2, lse
