"""A frozen, self-contained copy of the dense model as it was before the shared decoder skeleton
(models/dense.py at commit 1e1df2b, training forward only), kept as the oracle of
test_dense_skeleton_equivalence.py: the dense model built on the skeleton must reproduce it bit for bit.

Everything it computes is copied here (attention core, RoPE, RMSNorm, SwiGLU), so later changes to
layers/ cannot move the oracle along with the code under test. Do not edit the numerics.

One deliberate exception: the projections are 2-D matmuls on [B*T, .] (`_proj`, the form of
layers/linear.project since 39d7429, chosen for XLA:CPU's backward speed) instead of [B, T, .] einsums.
The same products and sums, another matmul kernel: logits and one gradient stayed bit-identical, but the
20-step curve differed in the last bit at step 20 (3.5084967 vs 3.5084965, found by `make test-slow`).
Everything else is the frozen model.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.sharding import constrain, logical_init
from effax.models.registry import ModelConfig, register

RESIDUAL = ("batch", "seq", "embed")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class LegacyDenseConfig(ModelConfig):
    type: str = "dense_legacy"


def _rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rope(x_BTHD, positions_BT, theta):
    D = x_BTHD.shape[-1]
    inv_freq_F = theta ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angles_BT1F = (positions_BT.astype(jnp.float32)[..., None] * inv_freq_F)[:, :, None, :]
    sin, cos = jnp.sin(angles_BT1F), jnp.cos(angles_BT1F)
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHD.dtype)


def _proj(x, w, contract):
    """x [..., *w.shape[:contract]] @ w as one [rows, k] x [k, n] matmul (see the module docstring)."""
    lead, k = x.shape[: x.ndim - contract], math.prod(w.shape[:contract])
    return jnp.dot(x.reshape(-1, k), w.reshape(k, -1)).reshape(*lead, *w.shape[contract:])


def _attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    scale = 1 / math.sqrt(D)
    q_BKGTD = q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k_BKSD = k_BTKD.transpose(0, 2, 1, 3)
    v_BKSD = v_BTKD.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD, preferred_element_type=jnp.float32) * scale
    allowed_BTS = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None]
    if segment_ids_BT is not None:
        allowed_BTS = allowed_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    probs = jax.nn.softmax(jnp.where(allowed_BTS[:, None, None], logits, _NEG), axis=-1)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v_BTKD.dtype), v_BKSD, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


def _param(rngs, std, shape, axes, dtype):
    return nnx.Param(logical_init(nnx.initializers.normal(std), axes)(rngs.params(), shape, dtype))


class _Norm(nnx.Module):
    def __init__(self, dim, dtype, rngs):
        self.scale = nnx.Param(logical_init(nnx.initializers.ones, ("embed",))(rngs.params(), (dim,), dtype), no_decay=True)


class _Attn(nnx.Module):
    def __init__(self, cfg, out_std, rngs):
        pd, D, H, K, Dh = jnp.dtype(cfg.param_dtype), cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.q = _param(rngs, cfg.init_std, (D, H, Dh), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, cfg.init_std, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, cfg.init_std, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, out_std, (H, Dh, D), ("heads", "head_dim", "embed"), pd)


class _MLP(nnx.Module):
    def __init__(self, cfg, out_std, rngs):
        pd, D, F = jnp.dtype(cfg.param_dtype), cfg.d_model, cfg.ffn_dim
        self.gate = _param(rngs, cfg.init_std, (D, F), ("embed", "mlp"), pd)
        self.up = _param(rngs, cfg.init_std, (D, F), ("embed", "mlp"), pd)
        self.down = _param(rngs, out_std, (F, D), ("mlp", "embed"), pd)


class _Block(nnx.Module):
    """The old module tree (attn_norm, attn, mlp_norm, mlp): the optimizer's global norm sums the leaves
    in tree order, so the oracle must have the same order to be bit-exact."""

    def __init__(self, cfg, *, rngs):
        pd = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.cfg = cfg
        self.attn_norm = _Norm(cfg.d_model, pd, rngs)
        self.attn = _Attn(cfg, out_std, rngs)
        self.mlp_norm = _Norm(cfg.d_model, pd, rngs)
        self.mlp = _MLP(cfg, out_std, rngs)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        cfg, dt, a, m = self.cfg, jnp.dtype(self.cfg.dtype), self.attn, self.mlp
        h = _rms_norm(x_BTD, self.attn_norm.scale[...], cfg.norm_eps).astype(dt)
        q, k, v = (_proj(h, w[...].astype(dt), 1) for w in (a.q, a.k, a.v))
        q = constrain(_rope(q, positions_BT, cfg.rope_theta), ("batch", "seq", "heads", "head_dim"))
        k = constrain(_rope(k, positions_BT, cfg.rope_theta), ("batch", "seq", "kv_heads", "head_dim"))
        out = _proj(_attention(q, k, v, segment_ids_BT), a.o[...].astype(dt), 2)
        x_BTD = constrain(x_BTD + out, RESIDUAL)
        h = _rms_norm(x_BTD, self.mlp_norm.scale[...], cfg.norm_eps).astype(dt)
        gate, up = _proj(h, m.gate[...].astype(dt), 1), _proj(h, m.up[...].astype(dt), 1)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return constrain(x_BTD + _proj(h, m.down[...].astype(dt), 1), RESIDUAL)


@register("dense_legacy", LegacyDenseConfig)
class LegacyDense(nnx.Module):
    """Same parameter creation order as the old model (embed, then per layer: attention norm, q, k, v,
    o, MLP norm, gate, up, down; then the final norm and the untied head), so one seed gives the same
    weights; same tree order (blocks, embed, final_norm, head). No remat (the tests use remat="none")."""

    def __init__(self, cfg, *, rngs):
        self.cfg = cfg
        V, D, pd = cfg.vocab_size, cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, cfg.init_std, (V, D), ("vocab", "embed"), pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return _Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = _Norm(D, pd, rngs)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, cfg.init_std, (D, V), ("embed", "vocab"), pd)

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, **_):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD = constrain(jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt), RESIDUAL)
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x_BTD, params):
            return nnx.merge(graphdef, params)(x_BTD, positions_BT, segment_ids_BT), None

        x_BTD, _ = jax.lax.scan(layer, x_BTD, stacked)
        x_BTD = _rms_norm(x_BTD, self.final_norm.scale[...], cfg.norm_eps).astype(dt)
        w = self.embed[...].astype(dt) if cfg.tie_embeddings else self.head[...].astype(dt)
        spec = "btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv"
        return constrain(jnp.einsum(spec, x_BTD, w, preferred_element_type=jnp.float32), ("batch", "seq", "vocab")), {}
