"""SwiGLU feed-forward (Shazeer 2020), as in Llama: down(silu(x @ gate) * (x @ up)). No biases.

Registered as the feed-forward "swiglu" (width `model.d_ff`, default 8/3 d_model rounded up to 64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.linear import project
from effax.layers.mixer import Layer, LayerContext, register_ffn
from effax.layers.sharding import constrain, logical_init


@register_ffn("swiglu")
class SwiGLU(Layer):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        init_std: float = 0.02,
        out_std: float | None = None,  # std of the down projection (defaults to init_std)
        dtype=jnp.float32,  # compute dtype
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        normal = nnx.initializers.normal
        self.gate = nnx.Param(logical_init(normal(init_std), ("embed", "mlp"))(rngs.params(), (d_model, d_ff), param_dtype))
        self.up = nnx.Param(logical_init(normal(init_std), ("embed", "mlp"))(rngs.params(), (d_model, d_ff), param_dtype))
        out_std = init_std if out_std is None else out_std
        self.down = nnx.Param(logical_init(normal(out_std), ("mlp", "embed"))(rngs.params(), (d_ff, d_model), param_dtype))

    @classmethod
    def from_config(cls, cfg, *, rngs: nnx.Rngs) -> "SwiGLU":
        return cls(cfg.d_model, cfg.ffn_dim, init_std=cfg.init_std, out_std=cfg.out_init_std, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)

    @classmethod
    def param_count(cls, cfg) -> int:
        return 3 * cfg.d_model * cfg.ffn_dim  # gate, up, down

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        return 2 * cls.param_count(cfg)

    def __call__(self, x_BTD: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        x_BTD = x_BTD.astype(self.dtype)
        gate_BTF, up_BTF = project(x_BTD, self.gate[...]), project(x_BTD, self.up[...])
        h_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
        return project(h_BTF, self.down[...])
