"""Decoder-decoder layers: YOCO's shared KV cache (Sun et al. 2024) and SambaY's Gated Memory Unit (Ren et al.
2025), as ArchScale (microsoft/ArchScale, lit_gpt/model.py) builds them. docs/hybrid.md has the equations.

    yoco_kv        full causal self-attention (RoPE unless model.nope) whose keys and values are THE cache of
                   the cross-decoder: handed on as ctx.carry["yoco/k"], ["yoco/v"] in training and prefill, and
                   kept once in the decode state's shared part (ctx.shared["yoco/kv"]) when decoding
    yoco_cross     cross-attention: queries and output projection of its own, keys and values read from that
                   cache; no decode state of its own (the cross-decoder allocates no KV cache)
    mamba2_memory  a Mamba2 block that also hands on its pre-gate output m = y + D x [B, T, E] (before the gated
                   RMSNorm) as ctx.carry["sambay/memory"]: SambaY's memory, read by the GMUs
    gmu            Gated Memory Unit: y = W_out(silu(W_in x) ⊙ m); with model.gmu_norm (ArchScale's form for
                   a Mamba2 memory) y = W_out(RMSNorm(m ⊙ silu(W_in x)) ⊙ w); stateless, reads the memory of the
                   same token from the carry in training and decoding alike

`check_config` enforces the order: one `yoco_kv`, every `yoco_cross` after it; a `mamba2_memory` before every
`gmu` (exactly one of it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.attention import Attention, attention, cache_attention
from effax.layers.kv_cache import KVState
from effax.layers.masks import Mask
from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.rope import apply_rope
from effax.layers.sharding import constrain, logical_init
from effax.layers.ssm import Mamba2, gated_rms_norm, mamba2_sizes

KEYS, VALUES, SHARED_KV, MEMORY = "yoco/k", "yoco/v", "yoco/kv", "sambay/memory"


def _mixers(cfg) -> list[str]:
    return [s.mixer for s in cfg.layer_specs]


def _check_yoco(cfg) -> None:
    mixers = _mixers(cfg)
    if mixers.count("yoco_kv") != 1:
        raise ValueError(f"model.pattern: a YOCO cross-decoder needs exactly one yoco_kv layer (its KV cache), "
                         f"got {mixers.count('yoco_kv')}")
    first_cross = mixers.index("yoco_cross") if "yoco_cross" in mixers else len(mixers)
    if mixers.index("yoco_kv") > first_cross:
        raise ValueError("model.pattern: every yoco_cross layer must come after the yoco_kv layer whose cache it reads")


def _kv_carry(cfg, batch: int, seq_len: int) -> dict:
    shape = (batch, seq_len, cfg.kv_heads, cfg.dim_per_head)
    return {KEYS: jnp.zeros(shape, jnp.dtype(cfg.dtype)), VALUES: jnp.zeros(shape, jnp.dtype(cfg.dtype))}


@register_mixer("yoco_kv")
class YocoKV(Attention):
    """Full causal self-attention whose keys and values are shared with the cross-decoder (its own cache)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        _check_yoco(cfg)

    @classmethod
    def init_carry(cls, cfg, batch: int, seq_len: int) -> dict:
        return _kv_carry(cfg, batch, seq_len)

    def __call__(self, x_BTD, ctx: LayerContext):
        q_BTHP, k_BTKP, v_BTKP = self.qkv(x_BTD, ctx.positions_BT)
        ctx.carry[KEYS], ctx.carry[VALUES] = k_BTKP, v_BTKP
        return self.project_out(attention(q_BTHP, k_BTKP, v_BTKP, mask=self.call_mask(ctx, ctx.segment_ids_BT), impl=self.impl))

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype):
        return None  # its cache is the shared one

    @classmethod
    def init_shared(cls, cfg, batch: int, max_len: int, dtype) -> dict:
        one = KVState.zeros(batch, max_len, cfg.kv_heads, cfg.dim_per_head, dtype, ring=False)
        # a leading [1] (the KVState write methods' index), sharded like an attention layer's cache
        return {SHARED_KV: cls.constrain_state(jax.tree.map(lambda a: a[None], one))}

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        q_BTHP, k_BTKP, v_BTKP = self.qkv(x_BTD, ctx.positions_BT)
        ctx.shared[SHARED_KV] = ctx.shared[SHARED_KV].write_prompt(0, k_BTKP, v_BTKP, ctx.valid_BT, ctx.lengths_B)
        ctx.carry[KEYS], ctx.carry[VALUES] = k_BTKP, v_BTKP  # the cross layers of the prompt read them as in training
        return self.project_out(attention(q_BTHP, k_BTKP, v_BTKP, mask=self.call_mask(ctx), impl=self.impl)), state

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        q_BTHP, k_BTKP, v_BTKP = self.qkv(x_BTD, ctx.positions_BT)
        kv = ctx.shared[SHARED_KV].write_tokens(0, k_BTKP, v_BTKP, ctx.positions_BT, ctx.valid_BT)
        ctx.shared[SHARED_KV] = kv
        out = cache_attention(q_BTHP, kv.k[0], kv.v[0], q_positions_BT=ctx.positions_BT, mask=self.call_mask(ctx),
                              slot_positions_BS=kv.pos[0])
        return self.project_out(out), state


@register_mixer("yoco_cross")
class YocoCross(Layer):
    """Cross-attention to the yoco_kv layer's keys and values: q [D, H, P] and o [H, P, D] only."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D, H, P = cfg.d_model, cfg.n_heads, cfg.dim_per_head
        self.rope_theta, self.impl, self.dtype = cfg.rope_theta, cfg.attention_impl, jnp.dtype(cfg.dtype)
        self.rope = not getattr(cfg, "nope", False)
        pdt, normal = jnp.dtype(cfg.param_dtype), nnx.initializers.normal
        self.q = nnx.Param(logical_init(normal(cfg.init_std), ("embed", "heads", "head_dim"))(rngs.params(), (D, H, P), pdt))
        self.o = nnx.Param(logical_init(normal(cfg.out_init_std), ("heads", "head_dim", "embed"))(rngs.params(), (H, P, D), pdt))

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"model.n_heads={cfg.n_heads} is not a multiple of model.n_kv_heads={cfg.kv_heads}")
        _check_yoco(cfg)

    @classmethod
    def param_count(cls, cfg) -> int:
        return 2 * cfg.d_model * cfg.n_heads * cfg.dim_per_head

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        return 2 * cls.param_count(cfg) + 4 * seq_len * cfg.n_heads * cfg.dim_per_head

    @classmethod
    def init_carry(cls, cfg, batch: int, seq_len: int) -> dict:
        return _kv_carry(cfg, batch, seq_len)

    def _query(self, x_BTD, positions_BT):
        q_BTHP = jnp.einsum("btd,dhk->bthk", x_BTD.astype(self.dtype), self.q[...].astype(self.dtype))
        if self.rope:
            q_BTHP = apply_rope(q_BTHP, positions_BT, theta=self.rope_theta)
        return constrain(q_BTHP, ("batch", "seq", "heads", "head_dim"))

    def _out(self, out_BTHP):
        return jnp.einsum("bthk,hkd->btd", out_BTHP, self.o[...].astype(self.dtype))

    def __call__(self, x_BTD, ctx: LayerContext):  # training and prefill: the keys of the same tokens, causal
        q_BTHP = self._query(x_BTD, ctx.positions_BT)
        mask = Mask(segment_ids_BT=ctx.segment_ids_BT)
        return self._out(attention(q_BTHP, ctx.carry[KEYS], ctx.carry[VALUES], mask=mask, impl=self.impl))

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        q_BTHP = self._query(x_BTD, ctx.positions_BT)
        kv = ctx.shared[SHARED_KV]
        out = cache_attention(q_BTHP, kv.k[0], kv.v[0], q_positions_BT=ctx.positions_BT, mask=Mask(),
                              slot_positions_BS=kv.pos[0])
        return self._out(out), state


def _memory_carry(cfg, batch: int, seq_len: int) -> dict:
    E = mamba2_sizes(cfg)[0]
    return {MEMORY: jnp.zeros((batch, seq_len, E), jnp.float32)}


@register_mixer("mamba2_memory")
class Mamba2Memory(Mamba2):
    """Mamba2 (layers/ssm.py, same parameters and state) that also hands on m = y + D x, the SSM's output before
    the gated RMSNorm (ArchScale's `gmu_save`: `gmu_mems = y` just before `y = self.norm(y, z)`)."""

    @classmethod
    def init_carry(cls, cfg, batch: int, seq_len: int) -> dict:
        return _memory_carry(cfg, batch, seq_len)

    def _finish(self, ctx, y_BTHP, xbc, z_BTE):
        E = self.sizes[0]
        x_BTHP = xbc[..., :E].reshape(y_BTHP.shape).astype(jnp.float32)
        ctx.carry[MEMORY] = (y_BTHP + self.D[...].astype(jnp.float32)[:, None] * x_BTHP).reshape(z_BTE.shape)
        return self._out(y_BTHP, xbc, z_BTE)


def gmu(x_BTD, m_BTE, w_in_DE, w_out_ED, norm_E=None, *, eps: float = 1e-5, dtype=jnp.float32):
    """y = W_out(silu(W_in x) ⊙ m), or with a norm gain w: W_out(RMSNorm(m ⊙ silu(W_in x)) ⊙ w)."""
    h_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(dtype), w_in_DE.astype(dtype), preferred_element_type=jnp.float32)
    if norm_E is None:
        g_BTE = jax.nn.silu(h_BTE) * m_BTE.astype(jnp.float32)
    else:
        g_BTE = gated_rms_norm(m_BTE, h_BTE, norm_E, eps, norm_before_gate=False)
    return jnp.einsum("bte,ed->btd", g_BTE.astype(dtype), w_out_ED.astype(dtype))


@register_mixer("gmu")
class GatedMemoryUnit(Layer):
    """SambaY's GMU over the memory of the mamba2_memory layer; width E = expand · d_model (the memory's)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D, E = cfg.d_model, mamba2_sizes(cfg)[0]
        pdt, normal = jnp.dtype(cfg.param_dtype), nnx.initializers.normal
        self.dtype, self.eps = jnp.dtype(cfg.dtype), cfg.norm_eps
        self.w_in = nnx.Param(logical_init(normal(cfg.init_std), ("embed", "mlp"))(rngs.params(), (D, E), pdt))
        self.w_out = nnx.Param(logical_init(normal(cfg.out_init_std), ("mlp", "embed"))(rngs.params(), (E, D), pdt))
        self.norm = (nnx.Param(logical_init(nnx.initializers.ones, ("mlp",))(rngs.params(), (E,), pdt), no_decay=True)
                     if cfg.gmu_norm else None)

    @classmethod
    def check_config(cls, cfg) -> None:
        mixers = _mixers(cfg)
        if mixers.count("mamba2_memory") != 1:
            raise ValueError(f"model.pattern: gmu layers read the memory of exactly one mamba2_memory layer, got "
                             f"{mixers.count('mamba2_memory')}")
        if mixers.index("gmu") < mixers.index("mamba2_memory"):
            raise ValueError("model.pattern: every gmu layer must come after the mamba2_memory layer whose memory it reads")

    @classmethod
    def param_count(cls, cfg) -> int:
        E = mamba2_sizes(cfg)[0]
        return 2 * cfg.d_model * E + (E if cfg.gmu_norm else 0)

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        return 4 * cfg.d_model * mamba2_sizes(cfg)[0]

    @classmethod
    def init_carry(cls, cfg, batch: int, seq_len: int) -> dict:
        return _memory_carry(cfg, batch, seq_len)

    def __call__(self, x_BTD, ctx: LayerContext):
        norm = None if self.norm is None else self.norm[...]
        return gmu(x_BTD, ctx.carry[MEMORY], self.w_in[...], self.w_out[...], norm, eps=self.eps, dtype=self.dtype)


__all__ = ["YocoKV", "YocoCross", "Mamba2Memory", "GatedMemoryUnit", "gmu", "KEYS", "VALUES", "SHARED_KV", "MEMORY"]
