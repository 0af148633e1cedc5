"""The dense baseline: a Llama-style pre-norm decoder (RMSNorm, GQA attention with RoPE, SwiGLU).

    embed -> L x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head (tied: x @ E^T)

The L blocks are created stacked (`nnx.vmap`, leading axis named "layers") and run with
`jax.lax.scan`, so compile time does not grow with depth. Parameters are fp32 master weights
(`param_dtype`), cast to the compute `dtype` at each matmul; norms, softmax and logits are fp32.

Init: normal(init_std) for the embedding and every projection, except the two projections that
write into the residual stream (attention output, MLP down), which use init_std / sqrt(2 * n_layers)
(GPT-2): the residual then grows like the sum of 2L roughly independent terms of that size, so its
variance at the top stays ~init_std^2 whatever the depth.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.attention import IMPLS, Attention, Mask
from effax.layers.kv_cache import KVCache
from effax.layers.mlp import SwiGLU
from effax.layers.norms import RMSNorm
from effax.layers.sharding import constrain, logical_init
from effax.models.registry import ConfigError, ModelConfig, register

RESIDUAL = ("batch", "seq", "embed")
REMAT_POLICIES = {
    "none": None,  # keep every activation of the layer
    "full": None,  # save only the layer input: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep projection outputs, recompute attention
}


@dataclasses.dataclass(frozen=True)
class DenseConfig(ModelConfig):
    """Counts (conventions used by the scaling-law code):

    param_count(): every parameter, norms included (matches the built model exactly).
    param_count(non_embedding=True): without the input embedding table (V*D). An untied LM head
      stays in (it is a matmul whose cost scales like the rest); a tied one is that same table, so
      nothing more is removed. Norm scales stay in.
    flops_per_token(T): training FLOPs = 3 x forward (backward = 2 x forward), where forward =
      2 * (matmul parameters: all projections + the LM head, counted once whether tied or not) +
      attention 2 * 2 * n_layers * T * n_heads * head_dim (QK^T and AV over the full T x T, no causal
      halving: the PaLM / Chinchilla convention, 6N + 12 L H Dh T per token). Norms, RoPE, softmax and
      the embedding lookup are not counted.
    """

    @property
    def attn_params_per_layer(self) -> int:
        return self.d_model * self.dim_per_head * (2 * self.n_heads + 2 * self.kv_heads)  # q, o + k, v

    @property
    def mlp_params_per_layer(self) -> int:
        return 3 * self.d_model * self.ffn_dim  # gate, up, down

    def param_count(self, *, non_embedding: bool = False) -> int:
        V, D, L = self.vocab_size, self.d_model, self.n_layers
        per_layer = self.attn_params_per_layer + self.mlp_params_per_layer + 2 * D  # + two norm scales
        total = L * per_layer + D + V * D  # + final norm + embedding
        if not self.tie_embeddings:
            total += D * V
        return total - V * D if non_embedding else total

    def matmul_params(self) -> int:
        """Parameters that enter a matmul once per token (the FLOPs-bearing N)."""
        return self.n_layers * (self.attn_params_per_layer + self.mlp_params_per_layer) + self.d_model * self.vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        attn = 2 * 2 * self.n_layers * seq_len * self.n_heads * self.dim_per_head
        return 3.0 * (2 * self.matmul_params() + attn)

    def validate(self) -> None:
        super().validate()
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r} is not one of {list(REMAT_POLICIES)}")
        if self.attention_impl not in IMPLS:
            raise ConfigError(f"model.attention_impl={self.attention_impl!r} is not one of {list(IMPLS)}")


class Block(nnx.Module):
    """x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, rope_theta=cfg.rope_theta,
            init_std=cfg.init_std, out_std=out_std, impl=cfg.attention_impl, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(
            cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std, out_std=out_std, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask: Mask) -> jax.Array:
        x_BTD = constrain(x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT=positions_BT, mask=mask), RESIDUAL)
        return constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), RESIDUAL)

    def cached(self, x_BTD, positions_BT, mask: Mask, cache: KVCache, layer, *, prefill: bool):
        """The same block, with attention reading/writing `cache` (Attention.prefill or .decode)."""
        attend = self.attn.prefill if prefill else self.attn.decode
        out_BTD, cache = attend(self.attn_norm(x_BTD), positions_BT=positions_BT, mask=mask, cache=cache, layer=layer)
        x_BTD = constrain(x_BTD + out_BTD, RESIDUAL)
        return constrain(x_BTD + self.mlp(self.mlp_norm(x_BTD)), RESIDUAL), cache


def remat_layer(fn, remat: str):
    """Wraps a scan body (carry, layer_params) -> ... in jax.checkpoint per `remat`."""
    if remat == "none":
        return fn
    # prevent_cse=False: scan already keeps XLA from merging the recomputation into the forward.
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


@register("dense", DenseConfig)
class Dense(nnx.Module):
    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        if cfg.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be set (> 0) before building, got {cfg.vocab_size}")
        self.cfg = cfg
        V, D, param_dtype = cfg.vocab_size, cfg.d_model, jnp.dtype(cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Param(logical_init(normal, ("vocab", "embed"))(rngs.params(), (V, D), param_dtype))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # every parameter gets a leading [n_layers] axis named "layers"
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = nnx.Param(logical_init(normal, ("embed", "vocab"))(rngs.params(), (D, V), param_dtype))

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, aux {}).

        positions_BT default to 0..T-1; pass positions restarting at 0 per packed document together
        with `segment_ids_BT` so a packed document is computed as if it were alone.
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = Mask(causal=True, segment_ids_BT=segment_ids_BT)
        x_BTD = self.embed_tokens(tokens_BT)
        x_BTD = self.run_blocks(x_BTD, positions_BT, mask)
        return self.logits(x_BTD), {}

    def embed_tokens(self, tokens_BT) -> jax.Array:
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.cfg.dtype)
        return constrain(x_BTD, RESIDUAL)

    def run_blocks(self, x_BTD, positions_BT, mask: Mask) -> jax.Array:
        """Scans the stacked blocks: layer i's slice of every stacked parameter is merged into a Block."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x_BTD, params):
            return nnx.merge(graphdef, params)(x_BTD, positions_BT, mask), None

        x_BTD, _ = jax.lax.scan(remat_layer(layer, self.cfg.remat), x_BTD, stacked)
        return x_BTD

    # Decoding with a cache. `cache` is opaque to callers: build it with init_cache, thread it through.

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated), in the
        compute dtype unless `dtype` says otherwise."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        cache = KVCache.zeros(cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.dim_per_head, dtype)
        axes = ("layers", "batch", "seq", "kv_heads", "head_dim")  # rows over data axes, kv heads over tensor
        return dataclasses.replace(cache, k_LBSKD=constrain(cache.k_LBSKD, axes), v_LBSKD=constrain(cache.v_LBSKD, axes))

    def prefill(self, tokens_BT, lengths_B, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs right-padded prompts (row b's prompt is tokens_BT[b, :lengths_B[b]], lengths >= 1) through
        an empty cache. Returns fp32 logits [B, V] at each row's last prompt token, and the cache
        holding lengths_B tokens per row. The LM head runs on those B positions only."""
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, cache = self._run_cached(self.embed_tokens(tokens_BT), positions_BT, cache, prefill=True)
        last_B11 = (lengths_B.astype(jnp.int32) - 1)[:, None, None]
        x_B1D = jnp.take_along_axis(x_BTD, last_B11, axis=1)
        return self.logits(x_B1D)[:, 0], dataclasses.replace(cache, lengths_B=lengths_B.astype(jnp.int32))

    def decode_step(self, tokens_B, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Appends one token per row at position cache.lengths_B and returns the fp32 logits [B, V] for
        the next one. The caller keeps lengths below the cache's max_len (writes past it are dropped)."""
        positions_B1 = cache.lengths_B[:, None]
        x_B1D, cache = self._run_cached(self.embed_tokens(tokens_B[:, None]), positions_B1, cache, prefill=False)
        return self.logits(x_B1D)[:, 0], dataclasses.replace(cache, lengths_B=cache.lengths_B + 1)

    def _run_cached(self, x_BTD, positions_BT, cache: KVCache, *, prefill: bool):
        """`run_blocks` with the cache in the scan carry (updated in place), the layer index as xs."""
        graphdef, stacked = nnx.split(self.blocks)
        mask = Mask(causal=True)  # as in __call__ (no window, no packing at decode time)

        def layer(carry, xs):
            x_BTD, cache = carry
            params, i = xs
            return nnx.merge(graphdef, params).cached(x_BTD, positions_BT, mask, cache, i, prefill=prefill), None

        (x_BTD, cache), _ = jax.lax.scan(layer, (x_BTD, cache), (stacked, jnp.arange(self.cfg.n_layers)))
        return x_BTD, cache

    def logits(self, x_BTD) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        x_BTD = self.final_norm(x_BTD).astype(dt)
        if self.cfg.tie_embeddings:
            logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
        else:
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.head[...].astype(dt), preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "seq", "vocab"))
