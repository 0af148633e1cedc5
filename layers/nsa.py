"""Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively
Trainable Sparse Attention"), the mixer "nsa". Each query attends three key sets and gates the results:

    o_t = g_cmp * Attn(q_t, K~cmp_t, V~cmp_t) + g_slc * Attn(q_t, K_slc[I_t], V_slc[I_t]) + g_win * Attn(q_t, K_win[t-w+1:t], ...)

    compressed  K~cmp_t = { phi(k_{i d : i d + l}) : i d + l - 1 <= t }: blocks of l keys every d tokens,
                each mapped to one key by phi, an MLP over the block plus a learned intra-block position
                embedding (the same for values)
    selected    p_cmp = softmax(q_t K~cmp_t) scores the compressed blocks; a selection block j (l' tokens)
                scores p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j + m - n], summed over the G
                query heads of a kv head (so the heads of a group share their blocks); I_t = the top n
                blocks, always including block 0 and the two most recent; attention over their tokens
    window      the last w keys
    gates       g = sigmoid(x W_g), one per head and branch

Keys and values are independent per branch (the paper: "to prevent shortcut learning across attention
branches"); queries are shared. Defaults are the paper's: l = 32, d = 16, l' = 64, n = 16, w = 512
(`model.nsa_*`). DeepSeek has not released NSA code. Where the paper leaves a choice open we take:
phi = W2 silu(W1 vec(block + E)), one hidden layer of P units, shared by the kv heads; a linear layer for
the gate "MLP" (as fla-org/native-sparse-attention does); RoPE on queries and on every branch's raw keys
(compressed keys are built from rotated keys). The paper prints the aggregation index as
(l'/d) j - m - n; read with m counting the stride-sized pieces of selection block j and n those of a
compressed block, the blocks overlapping j are (l'/d) j + m - n, which is what is used here.

Blocks count from each document's first token (packed documents are computed as if alone). Training
and prefill compute every compressed block and the selected branch as a masked dense product (O(T^2) on
this path: the selection is per query and data-dependent, so no static schedule skips it); the window
branch goes through `attention` (blockwise on CPU). Decoding reads only the selected blocks.
docs/attention.md has the equations and the choices above.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.layers.attention import Attention, attention, cache_attention
from effax.layers.kv_cache import KVState
from effax.layers.masks import Mask, document_offsets_BT
from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.rope import apply_rope
from effax.layers.sharding import constrain, logical_init

BRANCHES = ("cmp", "slc", "win")


@dataclasses.dataclass(frozen=True)
class NSAState:
    """Decode state: the selected branch's keys (full cache: any block may be selected), the window's
    ring, the last l raw compression-branch keys (a ring: the next block is built from them), and the
    compressed keys (slot i holds block i; `pos` its last token, -1 while incomplete)."""

    slc: KVState
    win: KVState
    raw: KVState
    cmp: KVState


jax.tree_util.register_dataclass(NSAState, data_fields=["slc", "win", "raw", "cmp"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class _Sizes:
    l: int  # tokens per compressed block
    d: int  # stride between compressed blocks
    l_sel: int  # tokens per selection block
    n: int  # selected blocks per query
    w: int  # window

    @classmethod
    def of(cls, cfg) -> "_Sizes":
        return cls(cfg.nsa_compress_block, cfg.nsa_compress_stride, cfg.nsa_select_block, cfg.nsa_select_blocks, cfg.nsa_window)

    def overlap_weights(self, r):
        """#{(m, n): m < l'/d, n < l/d, m - n = r}: how much compressed block (l'/d) j + r counts for block j."""
        a, c = self.l_sel // self.d, self.l // self.d
        return jnp.maximum(0, jnp.minimum(a, r + c) - jnp.maximum(0, r))  # m in [0, a) with n = m - r in [0, c)


@register_mixer("nsa")
class NativeSparseAttention(Layer):
    """The mixer; sizes from d_model, n_heads, kv_heads, dim_per_head and the model.nsa_* fields."""

    @classmethod
    def check_config(cls, cfg) -> None:
        for key in ("nsa_compress_block", "nsa_compress_stride", "nsa_select_block", "nsa_window"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
        if cfg.nsa_select_blocks < 3:
            raise ValueError(f"model.nsa_select_blocks must be >= 3 (the initial and two local blocks), got {cfg.nsa_select_blocks}")
        for key in ("nsa_compress_block", "nsa_select_block"):
            if getattr(cfg, key) % cfg.nsa_compress_stride:
                raise ValueError(f"model.{key}={getattr(cfg, key)} must be a multiple of model.nsa_compress_stride={cfg.nsa_compress_stride}")

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.check_config(cfg)
        D, H, K, P = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        if H % K:
            raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={K}")
        self.sizes = _Sizes.of(cfg)
        self.rope_theta, self.impl, self.dtype = cfg.rope_theta, cfg.attention_impl, jnp.dtype(cfg.dtype)
        param_dtype, normal = jnp.dtype(cfg.param_dtype), nnx.initializers.normal

        def param(std, shape, axes):
            return nnx.Param(logical_init(normal(std), axes)(rngs.params(), shape, param_dtype))

        l = self.sizes.l
        self.q = param(cfg.init_std, (D, H, P), ("embed", "heads", "head_dim"))
        for branch in BRANCHES:
            setattr(self, f"k_{branch}", param(cfg.init_std, (D, K, P), ("embed", "kv_heads", "head_dim")))
            setattr(self, f"v_{branch}", param(cfg.init_std, (D, K, P), ("embed", "kv_heads", "head_dim")))
        for kv in ("k", "v"):  # phi: a 2-layer MLP over a block of l keys (values) plus a position embedding
            setattr(self, f"phi_{kv}_pos", param(cfg.init_std, (l, P), (None, "head_dim")))
            setattr(self, f"phi_{kv}_in", param(1 / math.sqrt(l * P), (l, P, P), (None, "head_dim", None)))
            setattr(self, f"phi_{kv}_out", param(1 / math.sqrt(P), (P, P), (None, "head_dim")))
        self.gate = param(cfg.init_std, (D, H, 3), ("embed", "heads", None))
        self.o = param(cfg.out_init_std, (H, P, D), ("heads", "head_dim", "embed"))

    @classmethod
    def param_count(cls, cfg) -> int:
        D, H, K, P, l = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.nsa_compress_block
        phi = l * P + l * P * P + P * P
        return 2 * D * H * P + 6 * D * K * P + 2 * phi + 3 * D * H

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        """Projections and gates, phi once per block of d tokens (keys and values of every kv head), and QK^T
        plus AV over the keys of the three branches (no causal halving)."""
        s, K, P, H = _Sizes.of(cfg), cfg.kv_heads, cfg.dim_per_head, cfg.n_heads
        D, l = cfg.d_model, s.l
        projections = 2 * (2 * D * H * P + 6 * D * K * P + 3 * D * H)
        phi = 2 * 2 * K * (l * P * P + P * P) / s.d
        keys = min(seq_len, seq_len // s.d) + min(seq_len, s.n * s.l_sel) + min(seq_len, s.w)
        return projections + phi + 4 * keys * H * P

    # --- shared pieces -------------------------------------------------------------------------------

    def _project(self, x_BTD, positions_BT):
        """q [B, T, H, P] and each branch's (k, v) [B, T, K, P], RoPE on q and k; gates [B, T, H, 3]."""
        dt = self.dtype
        x_BTD = x_BTD.astype(dt)
        proj = lambda w: jnp.einsum("btd,dhk->bthk", x_BTD, w[...].astype(dt))  # noqa: E731
        rope = lambda a: apply_rope(a, positions_BT, theta=self.rope_theta)  # noqa: E731
        q_BTHP = constrain(rope(proj(self.q)), ("batch", "seq", "heads", "head_dim"))
        kv = {b: (rope(proj(getattr(self, f"k_{b}"))), proj(getattr(self, f"v_{b}"))) for b in BRANCHES}
        gates_BTH3 = jax.nn.sigmoid(jnp.einsum("btd,dhc->bthc", x_BTD, self.gate[...].astype(dt)).astype(jnp.float32))
        return q_BTHP, kv, gates_BTH3

    def _phi(self, blocks_BClKP, kv: str):
        """Compress blocks of l keys (or values) [B, C, l, K, P] to one each, [B, C, K, P]."""
        dt = self.dtype
        x = blocks_BClKP + getattr(self, f"phi_{kv}_pos")[...].astype(dt)[None, None, :, None, :]
        h = jax.nn.silu(jnp.einsum("bclkp,lph->bckh", x, getattr(self, f"phi_{kv}_in")[...].astype(dt)))
        return jnp.einsum("bckh,hp->bckp", h, getattr(self, f"phi_{kv}_out")[...].astype(dt))

    def _select(self, p_cmp_BKGTC, block_index_BC, q_offset_BT, n_blocks: int):
        """Top-n selection blocks per (row, kv head, query): bool [B, K, T, J], J = n_blocks (document
        relative). block_index_BC: each compressed block's index i within its document (-1: none)."""
        s = self.sizes
        j_J = jnp.arange(n_blocks)
        weight_BCJ = jnp.where(block_index_BC[:, :, None] >= 0,
                               s.overlap_weights(block_index_BC[:, :, None] - (s.l_sel // s.d) * j_J), 0).astype(jnp.float32)
        score_BKTJ = jnp.einsum("bkgtc,bcj->bktj", p_cmp_BKGTC, weight_BCJ)
        current_BT1 = (q_offset_BT // s.l_sel)[:, None, :, None]
        forced = (j_J == 0) | (j_J == current_BT1) | (j_J == current_BT1 - 1)
        score_BKTJ = jnp.where(forced, jnp.inf, jnp.where(j_J <= current_BT1, score_BKTJ, -jnp.inf))
        top_scores, top_j = jax.lax.top_k(jax.lax.stop_gradient(score_BKTJ), min(s.n, n_blocks))
        chosen = jax.nn.one_hot(top_j, n_blocks, dtype=bool) & (top_scores > -jnp.inf)[..., None]
        return chosen.any(axis=-2)

    def _gated_out(self, outs, gates_BTH3):
        """sum_c g_c * o_c over the three branches ([B, T, H, P] each), projected to D."""
        out_BTHP = sum(gates_BTH3[..., c, None] * o.astype(jnp.float32) for c, o in enumerate(outs))
        return jnp.einsum("bthk,hkd->btd", out_BTHP.astype(self.dtype), self.o[...].astype(self.dtype))

    # --- training / prefill ----------------------------------------------------------------------

    def __call__(self, x_BTD, ctx: LayerContext):
        return self._forward(x_BTD, ctx)[0]

    def _forward(self, x_BTD, ctx: LayerContext):
        s = self.sizes
        B, T, _ = x_BTD.shape
        seg_BT = jnp.zeros((B, T), jnp.int32) if ctx.segment_ids_BT is None else ctx.segment_ids_BT
        offset_BT = document_offsets_BT(seg_BT)
        q_BTHP, kv, gates_BTH3 = self._project(x_BTD, ctx.positions_BT)
        K, G = kv["cmp"][0].shape[2], q_BTHP.shape[2] // kv["cmp"][0].shape[2]
        q_BKGTP = _heads_first(q_BTHP, K)
        t_T = jnp.arange(T)
        same_doc_BTS = seg_BT[:, :, None] == seg_BT[:, None, :]

        # Compressed branch: a block starts at every document offset multiple of d and must end inside
        # its document. At most T // d of them per row; compacted to the front.
        last_BT = jnp.broadcast_to(jnp.minimum(t_T + s.l - 1, T - 1), (B, T))
        starts_BT = (offset_BT % s.d == 0) & (t_T + s.l - 1 < T) & (jnp.take_along_axis(seg_BT, last_BT, 1) == seg_BT)
        C = max(1, T // s.d)
        start_BC = jax.vmap(lambda row: jnp.nonzero(row, size=C, fill_value=T)[0])(starts_BT)
        block_ok_BC = start_BC < T
        gather_BCl = jnp.minimum(start_BC[:, :, None] + jnp.arange(s.l), T - 1)
        take = lambda a: jnp.take_along_axis(a, gather_BCl.reshape(B, -1)[:, :, None, None], 1).reshape(B, C, s.l, *a.shape[2:])  # noqa: E731
        k_cmp_BCKP, v_cmp_BCKP = self._phi(take(kv["cmp"][0]), "k"), self._phi(take(kv["cmp"][1]), "v")
        start_safe_BC = jnp.minimum(start_BC, T - 1)
        seen_cmp_BTC = (block_ok_BC[:, None, :] & (start_BC[:, None, :] + s.l - 1 <= t_T[None, :, None])
                        & (jnp.take_along_axis(seg_BT, start_safe_BC, 1)[:, None, :] == seg_BT[:, :, None]))
        o_cmp_BKGTP, p_cmp_BKGTC = _masked_attention(q_BKGTP, k_cmp_BCKP, v_cmp_BCKP, seen_cmp_BTC[:, None, None])

        # Selected branch: blocks of l' tokens from each document's start, top-n per kv head and query.
        block_index_BC = jnp.where(block_ok_BC, jnp.take_along_axis(offset_BT, start_safe_BC, 1) // s.d, -1)
        chosen_BKTJ = self._select(p_cmp_BKGTC, block_index_BC, offset_BT, -(-T // s.l_sel))
        key_block_BS = offset_BT // s.l_sel
        chosen_BKTS = jnp.take_along_axis(chosen_BKTJ, jnp.broadcast_to(key_block_BS[:, None, None, :], (B, K, T, T)), axis=-1)
        seen_slc_BKTS = chosen_BKTS & (same_doc_BTS & (t_T[None, :] <= t_T[:, None]))[:, None]
        o_slc_BKGTP, _ = _masked_attention(q_BKGTP, *kv["slc"], seen_slc_BKTS[:, :, None])

        # Window branch: the one attention entry point.
        o_win_BTHP = attention(q_BTHP, *kv["win"], mask=Mask(window=s.w, segment_ids_BT=ctx.segment_ids_BT), impl=self.impl)
        outs = (_heads_last(o_cmp_BKGTP), _heads_last(o_slc_BKGTP), o_win_BTHP)
        return self._gated_out(outs, gates_BTH3), (kv, k_cmp_BCKP, v_cmp_BCKP, start_BC)

    # --- decoding --------------------------------------------------------------------------------

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype) -> NSAState:
        s, K, P = _Sizes.of(cfg), cfg.kv_heads, cfg.dim_per_head
        n_blocks = max(1, (max_len - s.l) // s.d + 1)
        win = min(s.w, max_len)
        return NSAState(
            slc=KVState.zeros(batch, max_len, K, P, dtype, ring=False),
            win=KVState.zeros(batch, win, K, P, dtype, ring=win < max_len),
            raw=KVState.zeros(batch, s.l, K, P, dtype, ring=True),
            cmp=KVState.zeros(batch, n_blocks, K, P, dtype, ring=False),
        )

    @classmethod
    def constrain_state(cls, state_R: NSAState) -> NSAState:
        return NSAState(*(Attention.constrain_state(getattr(state_R, f.name)) for f in dataclasses.fields(NSAState)))

    def prefill(self, x_BTD, ctx: LayerContext, state: NSAState, i):
        """The training forward over right-padded prompts (one document per row), then every branch's
        cache from it: compressed block b is kept iff it ends before the row's length."""
        s = self.sizes
        y_BTD, (kv, k_cmp_BCKP, v_cmp_BCKP, start_BC) = self._forward(x_BTD, ctx)
        write = lambda st, k, v: st.write_prompt(i, k, v, ctx.valid_BT, ctx.lengths_B)  # noqa: E731
        end_BC = start_BC + s.l - 1
        end_BC = jnp.where(end_BC < ctx.lengths_B[:, None], end_BC, -1)
        n = min(state.cmp.slots, end_BC.shape[1])
        cmp = dataclasses.replace(state.cmp, k=state.cmp.k.at[i, :, :n].set(k_cmp_BCKP[:, :n].astype(state.cmp.k.dtype)),
                                  v=state.cmp.v.at[i, :, :n].set(v_cmp_BCKP[:, :n].astype(state.cmp.v.dtype)),
                                  pos=state.cmp.pos.at[i, :, :n].set(end_BC[:, :n]))
        return y_BTD, NSAState(slc=write(state.slc, *kv["slc"]), win=write(state.win, *kv["win"]), raw=write(state.raw, *kv["cmp"]), cmp=cmp)

    def decode(self, x_BTD, ctx: LayerContext, state: NSAState, i):
        """One token per row at position t = ctx.positions_BT: it completes compressed block (t + 1 - l) / d
        when that is a whole number, then attends the compressed keys, its top-n blocks and its window."""
        s = self.sizes
        B = x_BTD.shape[0]
        t_B = ctx.positions_BT[:, 0]
        q_BTHP, kv, gates_BTH3 = self._project(x_BTD, ctx.positions_BT)
        K = kv["cmp"][0].shape[2]
        write = lambda st, k, v: st.write_tokens(i, k, v, ctx.positions_BT, ctx.valid_BT)  # noqa: E731
        raw = write(state.raw, *kv["cmp"])
        slc = write(state.slc, *kv["slc"])
        win = write(state.win, *kv["win"])

        # A block completes at t = b d + l - 1: compress the ring's l keys, oldest first.
        order_Bl = raw.slot_of(t_B[:, None] - s.l + 1 + jnp.arange(s.l))
        block_B = (t_B + 1 - s.l) // s.d
        done_B = ((t_B + 1 - s.l) % s.d == 0) & (t_B + 1 >= s.l) & ctx.valid_BT[:, 0]
        slot_B = jnp.where(done_B, block_B, state.cmp.slots)  # out of range: dropped
        ordered = lambda a: jnp.take_along_axis(a[i], order_Bl[:, :, None, None], axis=1)[:, None]  # noqa: E731
        new_k, new_v = self._phi(ordered(raw.k), "k")[:, 0], self._phi(ordered(raw.v), "v")[:, 0]
        rows = jnp.arange(B)
        cmp = dataclasses.replace(state.cmp, k=state.cmp.k.at[i, rows, slot_B].set(new_k.astype(state.cmp.k.dtype), mode="drop"),
                                  v=state.cmp.v.at[i, rows, slot_B].set(new_v.astype(state.cmp.v.dtype), mode="drop"),
                                  pos=state.cmp.pos.at[i, rows, slot_B].set(t_B, mode="drop"))

        q_BKGTP = _heads_first(q_BTHP, K)
        cmp_pos_BC = cmp.pos[i]
        seen_cmp_B1C = (cmp_pos_BC >= 0)[:, None, :] & (cmp_pos_BC[:, None, :] <= t_B[:, None, None])
        o_cmp, p_cmp_BKGTC = _masked_attention(q_BKGTP, cmp.k[i], cmp.v[i], seen_cmp_B1C[:, None, None])
        n_sel = -(-slc.slots // s.l_sel)
        block_index_BC = jnp.where(cmp_pos_BC >= 0, jnp.arange(cmp.slots), -1)
        chosen_BK1J = self._select(p_cmp_BKGTC, block_index_BC, t_B[:, None], n_sel)
        key_block_S = jnp.arange(slc.slots) // s.l_sel
        slot_pos_BS = slc.pos[i]
        seen_slc_BK1S = chosen_BK1J[..., key_block_S] & ((slot_pos_BS >= 0) & (slot_pos_BS <= t_B[:, None]))[:, None, None]
        o_slc, _ = _masked_attention(q_BKGTP, slc.k[i], slc.v[i], seen_slc_BK1S[:, :, None])
        o_win = cache_attention(q_BTHP, win.k[i], win.v[i], q_positions_BT=ctx.positions_BT, mask=Mask(window=s.w),
                                slot_positions_BS=win.pos[i])
        y_BTD = self._gated_out((_heads_last(o_cmp), _heads_last(o_slc), o_win), gates_BTH3)
        return y_BTD, NSAState(slc=slc, win=win, raw=raw, cmp=cmp)


def _heads_first(q_BTHP, K):
    B, T, H, P = q_BTHP.shape
    return q_BTHP.reshape(B, T, K, H // K, P).transpose(0, 2, 3, 1, 4)


def _heads_last(o_BKGTP):
    B, K, G, T, P = o_BKGTP.shape
    return o_BKGTP.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, P)


def _masked_attention(q_BKGTP, k_BSKP, v_BSKP, seen):
    """softmax over the keys `seen` allows (broadcastable to [B, K, G, T, S]), in fp32; rows that see
    nothing give zeros. Returns the output [B, K, G, T, P] and the probabilities."""
    P = q_BKGTP.shape[-1]
    logits = jnp.einsum("bkgtp,bskp->bkgts", q_BKGTP, k_BSKP, preferred_element_type=jnp.float32) / math.sqrt(P)
    any_seen = jnp.any(seen, axis=-1, keepdims=True)
    probs = jnp.where(seen, jax.nn.softmax(jnp.where(seen, logits, -1e30), axis=-1), 0.0)
    out = jnp.einsum("bkgts,bskp->bkgtp", probs.astype(v_BSKP.dtype), v_BSKP, preferred_element_type=jnp.float32)
    return jnp.where(any_seen, out, 0.0), probs
