"""The one attention entry point, its mask type, the test oracle, and the attention module.

    out_BTHD = attention(q_BTHD, k_BTKD, v_BTKD, mask=Mask(...), impl="auto")

H query heads share K key/value heads (GQA, H % K == 0; K == H is MHA, K == 1 MQA). Every impl
honours every `Mask` field or raises: a backend that silently drops segment ids trains on a wrong
loss (the MaxText bug class named in DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.kv_cache import KVCache
from effax.layers.rope import apply_rope
from effax.layers.sharding import constrain, logical_init

IMPLS = ("auto", "xla", "cudnn")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives a uniform average, not NaN


@dataclasses.dataclass(frozen=True, eq=False)
class Mask:
    """Which keys each query may see (self-attention: queries and keys are the same T tokens).

    Query i sees key j iff all of:
      causal:        j <= i
      window = W:    i - j < W  (W keys counting itself; HF Mistral/Gemma `sliding_window`;
                     jax.nn.dot_product_attention's local_window_size=(W - 1, 0))
      segment_ids_BT: seg[b, i] == seg[b, j]  (packed documents never see each other)

    Extending: add a field (e.g. a block-sparse block mask, per-head spans `span_H`), honour it in
    `reference_attention` and `allowed_BTS` (a per-head field makes it [B, H, T, S]), and make each
    impl either honour it or raise NotImplementedError naming it (see `_cudnn_attention`). Static
    fields go in the pytree meta fields, arrays in the data fields.
    """

    causal: bool = True
    window: int | None = None
    segment_ids_BT: jax.Array | None = None

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"Mask.window must be a positive int or None, got {self.window!r}")

    def allowed_BTS(self, T: int) -> jax.Array:
        """Boolean [B or 1, T, T]: True where query t may attend key s."""
        q_T1 = jnp.arange(T)[:, None]
        k_1S = jnp.arange(T)[None, :]
        allowed_TS = jnp.ones((T, T), bool)
        if self.causal:
            allowed_TS &= k_1S <= q_T1
        if self.window is not None:
            allowed_TS &= q_T1 - k_1S < self.window
        allowed_BTS = allowed_TS[None]
        if self.segment_ids_BT is not None:
            seg = self.segment_ids_BT
            allowed_BTS = allowed_BTS & (seg[:, :, None] == seg[:, None, :])
        return allowed_BTS


jax.tree_util.register_dataclass(Mask, data_fields=["segment_ids_BT"], meta_fields=["causal", "window"])


def _check_shapes(q_BTHD, k_BTKD, v_BTKD, mask: Mask) -> None:
    B, T, H, D = q_BTHD.shape
    if k_BTKD.shape != v_BTKD.shape or k_BTKD.shape[:2] != (B, T) or k_BTKD.shape[3] != D:
        raise ValueError(f"attention: k {k_BTKD.shape} / v {v_BTKD.shape} do not match q {q_BTHD.shape} (self-attention, same B, T, D)")
    if H % k_BTKD.shape[2]:
        raise ValueError(f"attention: {H} query heads are not a multiple of {k_BTKD.shape[2]} kv heads")
    if mask.segment_ids_BT is not None and mask.segment_ids_BT.shape != (B, T):
        raise ValueError(f"attention: segment_ids_BT has shape {mask.segment_ids_BT.shape}, expected {(B, T)}")


def reference_attention(q_BTHD, k_BTKD, v_BTKD, *, mask: Mask, scale: float | None = None) -> jax.Array:
    """The test oracle: everything in fp32, KV repeated per query head, the mask written out from
    positions and segment ids independently of `Mask.allowed_BTS`."""
    _check_shapes(q_BTHD, k_BTKD, v_BTKD, mask)
    B, T, H, D = q_BTHD.shape
    G = H // k_BTKD.shape[2]
    q, k, v = (a.astype(jnp.float32) for a in (q_BTHD, k_BTKD, v_BTKD))
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # query head h uses kv head h // G
    pos_q = jnp.arange(T).reshape(1, 1, T, 1)
    pos_k = jnp.arange(T).reshape(1, 1, 1, T)
    visible_BHTS = jnp.full((B, H, T, T), True)
    if mask.causal:
        visible_BHTS = visible_BHTS & (pos_k <= pos_q)
    if mask.window is not None:
        visible_BHTS = visible_BHTS & (pos_q - pos_k < mask.window)
    if mask.segment_ids_BT is not None:
        seg = mask.segment_ids_BT
        visible_BHTS = visible_BHTS & (seg[:, None, :, None] == seg[:, None, None, :])
    scale = 1 / math.sqrt(D) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    probs = jax.nn.softmax(jnp.where(visible_BHTS, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v).astype(q_BTHD.dtype)


def _xla_attention(q_BTHD, k_BTKD, v_BTKD, mask: Mask, scale: float) -> jax.Array:
    """Masked einsum in [B, K, G, T, D] layout: one transpose before the einsums is 2.6x faster on CPU
    than einsums over [B, T, H, D] (shared/notes). Groups come from a reshape, KV is never repeated.
    Logits, softmax and the AV accumulation are fp32; probabilities enter the AV matmul in v's dtype."""
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    q_BKGTD = q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k_BKSD = k_BTKD.transpose(0, 2, 1, 3)
    v_BKSD = v_BTKD.transpose(0, 2, 1, 3)
    logits_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD, preferred_element_type=jnp.float32) * scale
    allowed_B11TS = mask.allowed_BTS(T)[:, None, None]
    probs_BKGTS = jax.nn.softmax(jnp.where(allowed_B11TS, logits_BKGTS, _NEG), axis=-1)
    out_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS.astype(v_BTKD.dtype), v_BKSD, preferred_element_type=jnp.float32)
    return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


def _cudnn_attention(q_BTHD, k_BTKD, v_BTKD, mask: Mask, scale: float) -> jax.Array:
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
    if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"attention impl='cudnn' takes bfloat16/float16 inputs, got {q_BTHD.dtype}; use impl='xla'")
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
        q_BTHD,
        k_BTKD,
        v_BTKD,
        mask=seg_mask_B1TS,
        scale=scale,
        is_causal=mask.causal,
        local_window_size=None if mask.window is None else (mask.window - 1, 0),
        implementation="cudnn",
    )


def _cudnn_ok(q_BTHD, mask: Mask) -> bool:
    """What impl='auto' sends to cuDNN: a GPU, half-precision inputs, a mask it honours, and shapes
    its forward and backward both take (head dim a multiple of 8 up to 128, even T)."""
    _, T, _, D = q_BTHD.shape
    return (
        jax.default_backend() == "gpu"
        and q_BTHD.dtype in (jnp.bfloat16, jnp.float16)
        and D % 8 == 0
        and D <= 128
        and T % 2 == 0
        and (mask.window is None or mask.causal)
    )


def attention(q_BTHD, k_BTKD, v_BTKD, *, mask: Mask, impl: str = "auto", scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v per head; scale defaults to 1/sqrt(D). Output in q's dtype.

    impl: "xla" (masked einsum, any backend), "cudnn" (GPU flash attention; raises for what it cannot
    honour), "auto" (cudnn when `_cudnn_ok`, else xla).
    """
    _check_shapes(q_BTHD, k_BTKD, v_BTKD, mask)
    scale = 1 / math.sqrt(q_BTHD.shape[-1]) if scale is None else scale
    if impl == "auto":
        impl = "cudnn" if _cudnn_ok(q_BTHD, mask) else "xla"
    if impl == "xla":
        return _xla_attention(q_BTHD, k_BTKD, v_BTKD, mask, scale)
    if impl == "cudnn":
        return _cudnn_attention(q_BTHD, k_BTKD, v_BTKD, mask, scale)
    raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")


def cache_attention(q_BTHD, k_BSKD, v_BSKD, *, q_positions_BT, mask: Mask, scale: float | None = None) -> jax.Array:
    """Queries at absolute positions `q_positions_BT` attend a KV cache whose slot s holds position s.

    Key s is visible to a query at position p iff s <= p and, with a window W, p - s < W: the `Mask`
    rules with positions in place of indices. Slots past a row's current length (stale prompt padding,
    zeros) all have s > p, so causality alone hides them, and rows of different lengths need nothing
    more. Segment ids and non-causal masks have no meaning for a cache and raise. Same fp32 numerics
    and [B, K, G, ., .] layout as `_xla_attention`; a single query row makes it memory-bound, so a
    fused decode kernel (jax.experimental.pallas.ops gpu decode_attention) is the lever on GPU.
    """
    if not mask.causal or mask.segment_ids_BT is not None:
        raise NotImplementedError("cache_attention: a KV cache takes only causal masks (optionally windowed), no segment ids")
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    q_BKGTD = q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k_BKSD = k_BSKD.transpose(0, 2, 1, 3)
    v_BKSD = v_BSKD.transpose(0, 2, 1, 3)
    logits_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD, preferred_element_type=jnp.float32) * scale
    pos_BT1 = q_positions_BT[:, :, None]
    slot_11S = jnp.arange(S)[None, None, :]
    allowed_BTS = slot_11S <= pos_BT1
    if mask.window is not None:
        allowed_BTS &= pos_BT1 - slot_11S < mask.window
    probs_BKGTS = jax.nn.softmax(jnp.where(allowed_BTS[:, None, None], logits_BKGTS, _NEG), axis=-1)
    out_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS.astype(v_BSKD.dtype), v_BKSD, preferred_element_type=jnp.float32)
    return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with RoPE; no biases.

    Kernels keep heads as their own axis (q: [D, H, Dh], o: [H, Dh, D]) so the heads axis can be
    sharded by name.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float = 10000.0,
        init_std: float = 0.02,
        out_std: float | None = None,  # std of the output projection (defaults to init_std)
        impl: str = "auto",
        dtype=jnp.float32,  # compute dtype
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if impl not in IMPLS:
            raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.rope_theta, self.impl, self.dtype = rope_theta, impl, dtype
        normal = nnx.initializers.normal
        out_std = init_std if out_std is None else out_std

        def kernel(std, shape, axes):
            return nnx.Param(logical_init(normal(std), axes)(rngs.params(), shape, param_dtype))

        self.q = kernel(init_std, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"))
        self.k = kernel(init_std, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.v = kernel(init_std, (d_model, n_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
        self.o = kernel(out_std, (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"))

    def __call__(self, x_BTD: jax.Array, *, positions_BT: jax.Array, mask: Mask) -> jax.Array:
        q_BTHD, k_BTKD, v_BTKD = self.qkv(x_BTD, positions_BT)
        return self.project_out(attention(q_BTHD, k_BTKD, v_BTKD, mask=mask, impl=self.impl))

    def qkv(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections, with RoPE at `positions_BT` on q and k, in the compute dtype."""
        dt = self.dtype
        x_BTD = x_BTD.astype(dt)
        q_BTHD = jnp.einsum("btd,dhk->bthk", x_BTD, self.q[...].astype(dt))
        k_BTKD = jnp.einsum("btd,dhk->bthk", x_BTD, self.k[...].astype(dt))
        v_BTKD = jnp.einsum("btd,dhk->bthk", x_BTD, self.v[...].astype(dt))
        q_BTHD = constrain(apply_rope(q_BTHD, positions_BT, theta=self.rope_theta), ("batch", "seq", "heads", "head_dim"))
        k_BTKD = constrain(apply_rope(k_BTKD, positions_BT, theta=self.rope_theta), ("batch", "seq", "kv_heads", "head_dim"))
        return q_BTHD, k_BTKD, v_BTKD

    def project_out(self, out_BTHD: jax.Array) -> jax.Array:
        return jnp.einsum("bthk,hkd->btd", out_BTHD, self.o[...].astype(self.dtype))

    # Decoding with a KV cache (layers/kv_cache.py). `layer` indexes the cache's stacked layer axis.

    def prefill(self, x_BTD, *, positions_BT, mask: Mask, cache: KVCache, layer) -> tuple[jax.Array, KVCache]:
        """Self-attention over a prompt (the same `attention` call as training, so the same impls),
        storing its K/V in slots 0..T-1 of an empty cache. Right padding is harmless: under a causal
        mask no real token sees a pad, and decoding overwrites pad slots before it can see them."""
        q_BTHD, k_BTKD, v_BTKD = self.qkv(x_BTD, positions_BT)
        cache = cache.write(layer, k_BTKD, v_BTKD, start_B=jnp.zeros(x_BTD.shape[0], jnp.int32))
        return self.project_out(attention(q_BTHD, k_BTKD, v_BTKD, mask=mask, impl=self.impl)), cache

    def decode(self, x_BTD, *, positions_BT, mask: Mask, cache: KVCache, layer) -> tuple[jax.Array, KVCache]:
        """New tokens at `positions_BT` (T consecutive positions per row, usually T=1): their K/V go into
        the cache at those slots, then their queries attend over the whole cache."""
        q_BTHD, k_BTKD, v_BTKD = self.qkv(x_BTD, positions_BT)
        cache = cache.write(layer, k_BTKD, v_BTKD, start_B=positions_BT[:, 0])
        k_BSKD, v_BSKD = cache.layer(layer)
        out_BTHD = cache_attention(q_BTHD, k_BSKD, v_BSKD, q_positions_BT=positions_BT, mask=mask)
        return self.project_out(out_BTHD), cache
