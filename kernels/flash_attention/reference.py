"""The plain-JAX oracle of ops.flash_attention: masked softmax attention over every pair, in fp32, taking
the same primitives (an element rule on document offsets, segment ids). A row that sees no key outputs 0."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention(q_BTHP, k_BTKP, v_BTKP, *, visible=None, offsets_BT=None, segment_ids_BT=None, scale: float | None = None):
    """softmax(q k^T * scale) v over the keys where visible(q_off, k_off) holds (and, with segment ids, the
    same document); offsets default to token indices. GQA: query head h uses kv head h // (H / K)."""
    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    scale = 1 / math.sqrt(P) if scale is None else scale
    off_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if offsets_BT is None else offsets_BT
    seen_BTS = jnp.ones((B, T, T), bool)
    if visible is not None:
        seen_BTS &= visible(off_BT[:, :, None], off_BT[:, None, :])
    if segment_ids_BT is not None:
        seen_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    q_BKGTP = q_BTHP.astype(jnp.float32).reshape(B, T, K, H // K, P).transpose(0, 2, 3, 1, 4)
    k_BKSP, v_BKSP = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k_BTKP, v_BTKP))
    logits = jnp.einsum("bkgtp,bksp->bkgts", q_BKGTP, k_BKSP, precision=jax.lax.Precision.HIGHEST) * scale
    seen = seen_BTS[:, None, None]
    logits = jnp.where(seen, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # a shift: no gradient
    p = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(l > 0, l, 1.0)  # a row without keys: all zeros
    out = jnp.einsum("bkgts,bksp->bkgtp", probs, v_BKSP, precision=jax.lax.Precision.HIGHEST)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, P).astype(q_BTHP.dtype)
