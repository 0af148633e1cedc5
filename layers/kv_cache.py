"""Decode-time state of the attention layers: a fixed-size KV cache, stacked over layers.

    cache = KVCache.zeros(n_layers, batch, max_len, kv_heads, head_dim, dtype)
    cache.k_LBSKD, cache.v_LBSKD   [L, B, S_max, K, Dh]: slot s of row b holds the key/value of position s
    cache.lengths_B                int32 [B]: tokens held per row = the position of that row's next token

Stacking over layers lets the model's `jax.lax.scan` over blocks carry the whole cache and update one
layer's slots in place (a per-layer `xs`/`ys` slice would copy every layer's cache at every step).
A model treats its cache as an opaque pytree it owns: the dense model's is this; a recurrent family
would hold its state here instead, with the same `init_cache / prefill / decode_step` methods.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVCache:
    k_LBSKD: jax.Array
    v_LBSKD: jax.Array
    lengths_B: jax.Array

    @classmethod
    def zeros(cls, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (n_layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k_LBSKD.shape[2]

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """Layer `layer`'s (k_BSKD, v_BSKD); `layer` may be traced (the scan's layer index)."""
        return self.k_LBSKD[layer], self.v_LBSKD[layer]

    def write(self, layer, k_BTKD: jax.Array, v_BTKD: jax.Array, *, start_B: jax.Array) -> "KVCache":
        """Stores T new keys/values of row b in slots start_B[b] .. start_B[b] + T - 1 of `layer`.
        Slots at or past max_len are dropped (the caller sizes the cache; see Dense.decode_step)."""
        B, T = k_BTKD.shape[:2]
        b_B1 = jnp.arange(B)[:, None]
        s_BT = start_B[:, None] + jnp.arange(T)[None, :]
        k = self.k_LBSKD.at[layer, b_B1, s_BT].set(k_BTKD.astype(self.k_LBSKD.dtype), mode="drop")
        v = self.v_LBSKD.at[layer, b_B1, s_BT].set(v_BTKD.astype(self.v_LBSKD.dtype), mode="drop")
        return dataclasses.replace(self, k_LBSKD=k, v_LBSKD=v)


jax.tree_util.register_dataclass(KVCache, data_fields=["k_LBSKD", "v_LBSKD", "lengths_B"], meta_fields=[])
