"""Mixers that exist only for the tests of the decoder skeleton (importing this file registers them).

  running_sum   a recurrent mixer: y_t = (sum of W_in x_s over s <= t in t's document) W_out; decode state
                the running sum [B, D] (fixed size), reset between packed documents
  reporter      reports an aux loss and diagnostics with every reduction; its aux loss is c * sum(probe)
                for a probe parameter that nothing else uses, so the probe moves only if the loss is added
  counter       a non-trainable Buffer that changes every training step: a step count and a running sum of
                the mean input (data-dependent, so an inexact resume shows)
  trace_a/b/c   count how often they are traced (the compile-per-super-block test)
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.mixer import Buffer, Layer, LayerContext, register_mixer
from effax.layers.sharding import logical_init

AUX_COEF = 1e-2
TRACES = collections.Counter()


def _weight(rngs, cfg, shape, axes, std=None):
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return nnx.Param(logical_init(init, axes)(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))


class _Linear(Layer):
    """y = x W (one D x D matrix): the trainable part of the toy mixers."""

    def __init__(self, cfg, *, rngs):
        self.w = _weight(rngs, cfg, (cfg.d_model, cfg.d_model), ("embed", "mlp"), cfg.out_init_std)

    @classmethod
    def param_count(cls, cfg) -> int:
        return cfg.d_model**2

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        return 2 * cfg.d_model**2

    def __call__(self, x_BTD, ctx: LayerContext):
        return x_BTD @ self.w[...]


@register_mixer("running_sum")
class RunningSum(Layer):
    def __init__(self, cfg, *, rngs):
        self.w_in = _weight(rngs, cfg, (cfg.d_model, cfg.d_model), ("embed", "mlp"))
        self.w_out = _weight(rngs, cfg, (cfg.d_model, cfg.d_model), ("mlp", "embed"), cfg.out_init_std)

    @classmethod
    def param_count(cls, cfg) -> int:
        return 2 * cfg.d_model**2

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        return 2 * cls.param_count(cfg)

    def __call__(self, x_BTD, ctx: LayerContext):
        h_BTD = x_BTD @ self.w_in[...]
        seg_BT = ctx.segment_ids_BT if ctx.segment_ids_BT is not None else jnp.zeros(x_BTD.shape[:2], jnp.int32)

        def step(s_BD, inputs):  # the recurrence itself, so the test compares two different programs
            h_BD, new_doc_B = inputs
            s_BD = jnp.where(new_doc_B[:, None], 0.0, s_BD) + h_BD
            return s_BD, s_BD

        new_doc_BT = jnp.concatenate([jnp.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
        _, s_TBD = jax.lax.scan(step, jnp.zeros_like(h_BTD[:, 0]), (h_BTD.swapaxes(0, 1), new_doc_BT.swapaxes(0, 1)))
        return s_TBD.swapaxes(0, 1) @ self.w_out[...]

    @classmethod
    def init_state(cls, cfg, batch, max_len, dtype):
        return jnp.zeros((batch, cfg.d_model), jnp.float32)

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        """Each row's state stops at its own prompt length: padding never enters the sum."""
        y_BTD = self(x_BTD, ctx)
        h_BTD = jnp.where(ctx.valid_BT[:, :, None], x_BTD @ self.w_in[...], 0.0)
        return y_BTD, state.at[i].set(h_BTD.sum(axis=1))

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        s_BD = state[i] + jnp.where(ctx.valid_BT[:, 0, None], (x_BTD @ self.w_in[...])[:, 0], 0.0)
        return (s_BD @ self.w_out[...])[:, None], state.at[i].set(s_BD)


@register_mixer("reporter")
class Reporter(_Linear):
    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.probe = nnx.Param(jnp.ones((3,), jnp.float32), no_decay=True)

    @classmethod
    def param_count(cls, cfg) -> int:
        return cfg.d_model**2 + 3

    def __call__(self, x_BTD, ctx: LayerContext):
        layer = jnp.asarray(ctx.layer, jnp.float32)
        ctx.aux_loss("toy/aux", AUX_COEF * jnp.sum(self.probe[...]))
        ctx.diagnostic("toy/layer", layer, reduce="per_layer")
        ctx.diagnostic("toy/mean_layer", layer, reduce="mean")
        ctx.diagnostic("toy/max_layer", layer, reduce="max")
        ctx.diagnostic("toy/sum_layer", layer, reduce="sum")
        ctx.diagnostic("toy/load", jnp.stack([layer, 2 * layer, 10.0]))  # a vector: mean over layers
        return super().__call__(x_BTD, ctx)


@register_mixer("counter")
class Counter(_Linear):
    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.steps = Buffer(logical_init(nnx.initializers.zeros, ())(rngs.params(), (), jnp.float32))
        self.input_sum = Buffer(logical_init(nnx.initializers.zeros, ())(rngs.params(), (), jnp.float32))

    def __call__(self, x_BTD, ctx: LayerContext):
        if ctx.train:
            self.steps[...] = self.steps[...] + 1.0
            self.input_sum[...] = self.input_sum[...] + jnp.mean(x_BTD.astype(jnp.float32))
        return super().__call__(x_BTD, ctx)


def _tracing(name):
    @register_mixer(name)
    class Traced(_Linear):
        def __call__(self, x_BTD, ctx: LayerContext):
            TRACES[name] += 1
            return super().__call__(x_BTD, ctx)

    Traced.__qualname__ = f"Traced_{name}"
    return Traced


TraceA, TraceB, TraceC = (_tracing(n) for n in ("trace_a", "trace_b", "trace_c"))
