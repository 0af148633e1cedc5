"""Decode state of an attention layer: keys, values and the position each slot holds.

    state = KVState.zeros(batch, slots, kv_heads, head_dim, dtype, ring=False)
    state.k, state.v   [..., B, S, K, P]: slot s of row b holds a key/value ...
    state.pos          int32 [..., B, S]: ... of this absolute position, or -1 (empty: never written,
                       prompt padding, or a token that skipped the layer)

Full cache (`ring=False`, S = max_len): position p lives in slot p.
Ring buffer (`ring=True`, sliding window W, S = min(W, max_len)): position p lives in slot p % S, so
memory is O(W) whatever the length; writing p evicts p - S, which no query at >= p can see (window W
counts the query itself: p - s < W).

A query at position q sees slot s iff pos[s] >= 0, pos[s] <= q and (windowed) q - pos[s] < W:
`visible_BTS`. Recording positions, not just a row length, is what keeps right-padded prompts and
tokens that skip a layer (Mixture-of-Recursions) invisible, whatever the slot layout.

The decoder skeleton stacks a layer's state over the repeats of its scan group (a leading [R] axis);
the write methods take that index `i` and scatter only the new slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVState:
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    ring: bool = False

    @classmethod
    def zeros(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, *, ring: bool) -> "KVState":
        shape = (batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32), ring)

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]

    def write_prompt(self, i, k_BTKP, v_BTKP, valid_BT, lengths_B) -> "KVState":
        """Stores a right-padded prompt (row b: positions 0 .. lengths_B[b] - 1; `valid_BT` False for
        padding and skipped tokens) into this empty state's repeat `i`.

        Full: slot t <- token t (slots past S are dropped). Ring: slot w <- the latest prompt token t <
        length with t % S == w, gathered rather than scattered (scattering T > S tokens would write one
        slot several times, in an order XLA does not define)."""
        B, T = valid_BT.shape
        S = self.slots
        if not self.ring:
            t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            return self._scatter(i, k_BTKP, v_BTKP, t_BT, jnp.where(valid_BT, t_BT, -1))
        w_1S = jnp.arange(S, dtype=jnp.int32)[None]
        t_BS = w_1S + S * ((lengths_B[:, None].astype(jnp.int32) - 1 - w_1S) // S)  # < 0: no such token
        src_BS = jnp.clip(t_BS, 0, T - 1)
        keep_BS = (t_BS >= 0) & jnp.take_along_axis(valid_BT, src_BS, axis=1)
        take = lambda a: jnp.take_along_axis(a, src_BS[:, :, None, None], axis=1).astype(self.k.dtype)  # noqa: E731
        return dataclasses.replace(self, k=self.k.at[i].set(take(k_BTKP)), v=self.v.at[i].set(take(v_BTKP)),
                                   pos=self.pos.at[i].set(jnp.where(keep_BS, t_BS, -1)))

    def write_tokens(self, i, k_BTKP, v_BTKP, positions_BT, valid_BT) -> "KVState":
        """Appends T new tokens per row (decoding; T <= S for a ring) at their positions."""
        slot_BT = positions_BT % self.slots if self.ring else positions_BT
        return self._scatter(i, k_BTKP, v_BTKP, slot_BT, jnp.where(valid_BT, positions_BT, -1))

    def _scatter(self, i, k_BTKP, v_BTKP, slot_BT, pos_BT) -> "KVState":
        b_B1 = jnp.arange(slot_BT.shape[0])[:, None]
        return dataclasses.replace(
            self,
            k=self.k.at[i, b_B1, slot_BT].set(k_BTKP.astype(self.k.dtype), mode="drop"),
            v=self.v.at[i, b_B1, slot_BT].set(v_BTKP.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[i, b_B1, slot_BT].set(pos_BT.astype(jnp.int32), mode="drop"),
        )


jax.tree_util.register_dataclass(KVState, data_fields=["k", "v", "pos"], meta_fields=["ring"])


def visible_BTS(slot_pos_BS: jax.Array, q_positions_BT: jax.Array, window: int | None) -> jax.Array:
    """Which cache slots each query may attend (the `Mask` rules, with positions in place of indices)."""
    pos_B1S = slot_pos_BS[:, None, :]
    q_BT1 = q_positions_BT[:, :, None]
    seen_BTS = (pos_B1S >= 0) & (pos_B1S <= q_BT1)
    if window is not None:
        seen_BTS &= q_BT1 - pos_B1S < window
    return seen_BTS
