"""Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys"), the feed-forward "pkm".

Per head h (model.pkm_heads), a query q = x W_q[h] of model.pkm_key_dim d_k is split in halves q1, q2; each half
is scored against its own n = model.pkm_keys sub-keys, and the N = n² keys of the memory are the pairs (i, j)
with score s1_i + s2_j. The top k = model.pkm_topk of each half give k² candidates that contain the exact
top k of all N pairs (a pair outside them is beaten by k pairs inside); of those, the top k are read:

    w = softmax(top-k scores)          y = Σ_h Σ_k w_k V[i_k · n + j_k]          V: [N, D], shared by the heads

Cost per token: 2 D H d_k (query) + 2 H n d_k (sub-key scores) + 2 H k D (the weighted read), not N D.
Where we differ from the paper: no BatchNorm on the query (it couples the rows of a batch and needs running
statistics at inference; later memory layers use a query norm or none), the keys drawn normal(0, (d_k/2)^-½)
rather than uniform. Values are drawn normal(0, D^-½) as in the paper's code. Stateless for decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.mixer import Layer, LayerContext, register_ffn
from effax.layers.sharding import logical_init


def pkm_sizes(cfg) -> tuple[int, int, int, int]:
    """(H heads, n sub-keys per half, k read per head, d_k query dim)."""
    return cfg.pkm_heads, cfg.pkm_keys, cfg.pkm_topk, cfg.pkm_key_dim


def product_key_lookup(q_BTHK, keys1_HnK2, keys2_HnK2, k: int):
    """-> (scores [B, T, H, k] of the best k of the n² product keys, their indices i · n + j)."""
    half = q_BTHK.shape[-1] // 2
    s1 = jnp.einsum("bthc,hnc->bthn", q_BTHK[..., :half], keys1_HnK2)
    s2 = jnp.einsum("bthc,hnc->bthn", q_BTHK[..., half:], keys2_HnK2)
    n = s1.shape[-1]
    top1, i1 = jax.lax.top_k(s1, k)
    top2, i2 = jax.lax.top_k(s2, k)
    cand = (top1[..., :, None] + top2[..., None, :]).reshape(*top1.shape[:-1], k * k)
    index = (i1[..., :, None] * n + i2[..., None, :]).reshape(cand.shape)
    best, j = jax.lax.top_k(cand, k)
    return best, jnp.take_along_axis(index, j, axis=-1)


@register_ffn("pkm")
class ProductKeyMemory(Layer):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        H, n, k, dk = pkm_sizes(cfg)
        D, pdt, normal = cfg.d_model, jnp.dtype(cfg.param_dtype), nnx.initializers.normal
        self.k, self.dtype = k, jnp.dtype(cfg.dtype)
        self.query = nnx.Param(logical_init(normal(cfg.init_std), ("embed", None, None))(rngs.params(), (D, H, dk), pdt))
        key_std = (dk // 2) ** -0.5
        self.keys1 = nnx.Param(logical_init(normal(key_std), (None, None, None))(rngs.params(), (H, n, dk // 2), pdt))
        self.keys2 = nnx.Param(logical_init(normal(key_std), (None, None, None))(rngs.params(), (H, n, dk // 2), pdt))
        self.values = nnx.Param(logical_init(normal(D ** -0.5), (None, "embed"))(rngs.params(), (n * n, D), pdt))

    @classmethod
    def check_config(cls, cfg) -> None:
        for key in ("pkm_heads", "pkm_keys", "pkm_topk", "pkm_key_dim"):
            if not hasattr(cfg, key):
                raise ValueError(f"feed-forward 'pkm' needs model.{key} (model.type=hybrid or hydra)")
            if getattr(cfg, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
        if cfg.pkm_key_dim % 2:
            raise ValueError(f"model.pkm_key_dim={cfg.pkm_key_dim} must be even (two halves of product keys)")
        if cfg.pkm_topk > cfg.pkm_keys:
            raise ValueError(f"model.pkm_topk={cfg.pkm_topk} exceeds model.pkm_keys={cfg.pkm_keys}")

    @classmethod
    def param_count(cls, cfg) -> int:
        H, n, k, dk = pkm_sizes(cfg)
        return cfg.d_model * H * dk + H * n * dk + n * n * cfg.d_model

    @classmethod
    def active_param_count(cls, cfg) -> int:
        """Query and sub-keys, and the H k value rows a token reads."""
        H, n, k, dk = pkm_sizes(cfg)
        return cfg.d_model * H * dk + H * n * dk + H * k * cfg.d_model

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        H, n, k, dk = pkm_sizes(cfg)
        return 2.0 * (cfg.d_model * H * dk + H * n * dk + H * k * cfg.d_model)

    def __call__(self, x_BTD, ctx: LayerContext):
        q_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD.astype(jnp.float32), self.query[...].astype(jnp.float32))
        scores_BTHk, index_BTHk = product_key_lookup(q_BTHK, self.keys1[...].astype(jnp.float32),
                                                     self.keys2[...].astype(jnp.float32), self.k)
        w_BTHk = jax.nn.softmax(scores_BTHk, axis=-1)
        rows_BTHkD = jnp.take(self.values[...], index_BTHk, axis=0).astype(jnp.float32)
        return jnp.einsum("bthk,bthkd->btd", w_BTHk, rows_BTHkD).astype(self.dtype)
