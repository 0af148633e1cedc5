"""Decode state of an attention layer: keys, values and the position each slot holds.

    state = KVState.zeros(batch, slots, kv_heads, head_dim, dtype, ring=False)
    state.k, state.v   [..., B, S, K, P]: slot s of row b holds a key/value ...
    state.pos          int32 [..., B, S]: ... of this absolute position, or -1 (empty: never written,
                       prompt padding, or a token that skipped the layer)

Full cache (`ring=False`, S = max_len): position p lives in slot p.
Ring buffer (`ring=True`, `sinks` = A anchor slots then R ring slots, S = A + R): position p < A lives
in slot p (attention sinks, global tokens: kept forever); position p >= A in slot A + (p - A) % R, so
memory is O(A + R) whatever the length; writing p evicts p - R, which no query at >= p can see when
every non-anchor key a query sees is less than R positions back (`Mask.reach`: a window W needs R = W,
counting the query itself).

A query at position q sees slot s iff pos[s] >= 0 and the mask's rule holds for (q, pos[s])
(`attention.cache_attention`). Recording positions, not just a row length, is what keeps right-padded
prompts and tokens that skip a layer (Mixture-of-Recursions) invisible, whatever the slot layout.

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
    sinks: int = 0  # ring only: slots [0, sinks) hold positions [0, sinks) for good

    @classmethod
    def zeros(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, *, ring: bool, sinks: int = 0) -> "KVState":
        if sinks and (not ring or sinks >= slots):
            raise ValueError(f"KVState: {sinks} sink slots need a ring with more than that many slots (got {slots}, ring={ring})")
        shape = (batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32), ring, sinks)

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]

    def slot_of(self, positions):
        """The slot position p is written to."""
        if not self.ring:
            return positions
        return jnp.where(positions < self.sinks, positions, self.sinks + (positions - self.sinks) % (self.slots - self.sinks))

    def write_prompt(self, i, k_BTKP, v_BTKP, valid_BT, lengths_B) -> "KVState":
        """Stores a right-padded prompt (row b: positions 0 .. lengths_B[b] - 1; `valid_BT` False for
        padding and skipped tokens) into this empty state's repeat `i`.

        Full: slot t <- token t (slots past S are dropped). Ring: sink slot w <- token w; ring slot A + w
        <- the latest prompt token t < length with t >= A and (t - A) % R == w; gathered rather than
        scattered (scattering T > S tokens would write one slot several times, in an order XLA does not
        define)."""
        B, T = valid_BT.shape
        if not self.ring:
            t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            return self._scatter(i, k_BTKP, v_BTKP, t_BT, jnp.where(valid_BT, t_BT, -1))
        A, R = self.sinks, self.slots - self.sinks
        w_1R = jnp.arange(R, dtype=jnp.int32)[None]
        ring_BR = A + w_1R + R * ((lengths_B[:, None].astype(jnp.int32) - 1 - A - w_1R) // R)  # < A: no such token
        sink_BA = jnp.broadcast_to(jnp.arange(A, dtype=jnp.int32), (B, A))
        t_BS = jnp.concatenate([jnp.where(sink_BA < lengths_B[:, None], sink_BA, -1), jnp.where(ring_BR >= A, ring_BR, -1)], axis=1)
        src_BS = jnp.clip(t_BS, 0, T - 1)
        keep_BS = (t_BS >= 0) & jnp.take_along_axis(valid_BT, src_BS, axis=1)
        take = lambda a: jnp.take_along_axis(a, src_BS[:, :, None, None], axis=1).astype(self.k.dtype)  # noqa: E731
        return dataclasses.replace(self, k=self.k.at[i].set(take(k_BTKP)), v=self.v.at[i].set(take(v_BTKP)),
                                   pos=self.pos.at[i].set(jnp.where(keep_BS, t_BS, -1)))

    def write_tokens(self, i, k_BTKP, v_BTKP, positions_BT, valid_BT) -> "KVState":
        """Appends T new tokens per row (decoding; T <= the ring's slots) at their positions."""
        return self._scatter(i, k_BTKP, v_BTKP, self.slot_of(positions_BT), jnp.where(valid_BT, positions_BT, -1))

    def _scatter(self, i, k_BTKP, v_BTKP, slot_BT, pos_BT) -> "KVState":
        b_B1 = jnp.arange(slot_BT.shape[0])[:, None]
        return dataclasses.replace(
            self,
            k=self.k.at[i, b_B1, slot_BT].set(k_BTKP.astype(self.k.dtype), mode="drop"),
            v=self.v.at[i, b_B1, slot_BT].set(v_BTKP.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[i, b_B1, slot_BT].set(pos_BT.astype(jnp.int32), mode="drop"),
        )


jax.tree_util.register_dataclass(KVState, data_fields=["k", "v", "pos"], meta_fields=["ring", "sinks"])

