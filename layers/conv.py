"""Short causal depthwise convolution, its decode state, and Based's gated convolution mixer "gated_conv".

    y_t = bias + sum_{i < W} w_i * x_{t - (W - 1) + i}          per channel, W = model.conv_kernel

The tap order is PyTorch's `Conv1d(groups=channels, padding=W - 1)` truncated to the first T outputs (as
in Mamba2, gated DeltaNet and Based): the last tap w_{W-1} multiplies the current token, so official
weights load unchanged. Inputs before a document's first token count as zero: with `segment_ids_BT`
(packed documents) a token never sees the previous document, exactly as if it were alone.

Decode state: the last W - 1 inputs of each row, `history` [B, W - 1, *channels]. A step concatenates
the history with the new input and keeps the last W - 1; prefill gathers the last W - 1 *valid* inputs
of each right-padded prompt (`history_at`), so padding never enters it.

The functions take any trailing channel shape (x [B, T, *ch], w [W, *ch]): the mixers convolve their
head-shaped tensors ([B, T, H, P], [B, T, N]) directly, which equals one convolution over their
concatenation (each channel is convolved alone).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effax.layers.mixer import Layer, LayerContext, register_mixer
from effax.layers.sharding import logical_init


def causal_conv(x, w, bias=None, *, segment_ids_BT=None, history=None):
    """x [B, T, *ch], w [W, *ch] (bias [*ch]) -> [B, T, *ch] in x's dtype (accumulated in fp32).

    history [B, W - 1, *ch]: the inputs just before x (decoding); zeros when None. Segment ids zero
    the taps that reach into an earlier document (training on packed sequences)."""
    W, T = w.shape[0], x.shape[1]
    if history is None:
        history = jnp.zeros((x.shape[0], W - 1, *x.shape[2:]), x.dtype)
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [B, W - 1 + T, *ch]
    if segment_ids_BT is not None:  # the history slots belong to the first token's document
        seg = jnp.concatenate([jnp.repeat(segment_ids_BT[:, :1], W - 1, axis=1), segment_ids_BT], axis=1)
    # One row (B = 1) is convolved without its batch axis: XLA:CPU (jax 0.10) fuses the weight gradient's
    # product and reduction over [1, T, ch] into a YNNPACK kernel ~40x slower than over [T, ch], which made
    # batch-1 training steps 1.5x slower per token (docs/benchmarks.md, "Batch-1 reductions"). With B > 1
    # the batched form is kept: it fuses better (the flat form cost Mamba2's step 11% at 16 x 512).
    rows = x.shape[:1] if x.shape[0] > 1 else ()  # the batch axis, dropped when it is 1
    padded = padded.reshape(*rows, *padded.shape[1:])
    if segment_ids_BT is not None:
        seg, segment_ids_BT = seg.reshape(*rows, -1), segment_ids_BT.reshape(*rows, T)
    shape = (*rows, *x.shape[1:])
    y = jnp.zeros(shape, jnp.float32) if bias is None else jnp.broadcast_to(bias.astype(jnp.float32), shape)
    extra = (1,) * (x.ndim - 2)
    for i in range(W):  # tap i reads W - 1 - i tokens back
        tap = jax.lax.slice_in_dim(padded, i, i + T, axis=len(rows)).astype(jnp.float32)
        if segment_ids_BT is not None:
            same_doc = jax.lax.slice_in_dim(seg, i, i + T, axis=len(rows)) == segment_ids_BT
            tap = jnp.where(same_doc.reshape(*same_doc.shape, *extra), tap, 0.0)
        y = y + tap * w[i].astype(jnp.float32)
    y = y.reshape(x.shape)
    return y.astype(x.dtype)


def next_history(history, x, valid_BT):
    """The history after appending x [B, T, *ch] (decoding): invalid tokens (valid_BT False) are skipped,
    so a row's history only ever holds its own real inputs."""
    def push(h, inputs):
        x_B, valid_B = inputs
        shifted = jnp.concatenate([h[:, 1:], x_B[:, None].astype(h.dtype)], axis=1)
        return jnp.where(valid_B.reshape(-1, *(1,) * (h.ndim - 1)), shifted, h), None

    history, _ = jax.lax.scan(push, history, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(valid_BT, 1, 0)))
    return history


def history_at(x, lengths_B, width: int):
    """The decode history after a right-padded prompt: inputs at positions lengths_B - (W - 1) ..
    lengths_B - 1 of x [B, T, *ch], zero where that position is < 0 (a prompt shorter than W - 1)."""
    t_BW = lengths_B[:, None] - (width - 1) + jnp.arange(width - 1)[None, :]  # [B, W - 1]
    extra = (1,) * (x.ndim - 2)
    taken = jnp.take_along_axis(x, jnp.clip(t_BW, 0, x.shape[1] - 1).reshape(*t_BW.shape, *extra), axis=1)
    return jnp.where((t_BW >= 0).reshape(*t_BW.shape, *extra), taken, 0).astype(x.dtype)


def conv_weight(rngs: nnx.Rngs, width: int, channels: tuple[int, ...], axes, param_dtype) -> nnx.Param:
    """PyTorch's Conv1d default init, which Mamba2, GDN and Based keep: U(-1/sqrt(W), 1/sqrt(W))
    (fan-in of a depthwise filter = W)."""
    bound = 1 / math.sqrt(width)
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
    return nnx.Param(logical_init(init, (None, *axes))(rngs.params(), (width, *channels), param_dtype))


def require_fields(cfg, *fields: str, mixer: str) -> None:
    """A clear error when a mixer sits in a config that lacks its fields (e.g. model.type=dense)."""
    missing = [f for f in fields if not hasattr(cfg, f)]
    if missing:
        raise ValueError(f"mixer {mixer!r} needs model.{', model.'.join(missing)}: use model.type=hybrid "
                         f"(models/hybrid.py), not model.type={getattr(cfg, 'type', '?')!r}")


@register_mixer("gated_conv")
class GatedConv(Layer):
    """Based's gated short convolution (BaseConv in HazyResearch/based):

        u, gate = x W_in + b_in                 (two halves of width E = model.expand * d_model)
        y = (silu(causal_conv(u)) * gate) W_out + b_out

    with a bias-free depthwise filter of width model.conv_kernel (3 in Based). Based's 360M and 1.3B
    configs use an input projection of 4 d_model (expand_proj=4), i.e. E = 2 d_model: model.expand=2.
    Decode state: the filter's last W - 1 inputs."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        require_fields(cfg, "expand", "conv_kernel", mixer="gated_conv")
        D, E, W = cfg.d_model, cfg.expand * cfg.d_model, cfg.conv_kernel
        param_dtype, normal = jnp.dtype(cfg.param_dtype), nnx.initializers.normal
        self.dtype = jnp.dtype(cfg.dtype)
        zeros = nnx.initializers.zeros

        def param(init, shape, axes, **meta):
            return nnx.Param(logical_init(init, axes)(rngs.params(), shape, param_dtype), **meta)

        self.w_in = param(normal(cfg.init_std), (D, 2, E), ("embed", None, "mlp"))  # [D, (u, gate), E]
        self.b_in = param(zeros, (2, E), (None, "mlp"), no_decay=True)
        self.conv = conv_weight(rngs, W, (E,), ("mlp",), param_dtype)
        self.w_out = param(normal(cfg.out_init_std), (E, D), ("mlp", "embed"))
        self.b_out = param(zeros, (D,), ("embed",), no_decay=True)

    @classmethod
    def param_count(cls, cfg) -> int:
        D, E = cfg.d_model, cfg.expand * cfg.d_model
        return 2 * D * E + 2 * E + cfg.conv_kernel * E + E * D + D

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:
        D, E = cfg.d_model, cfg.expand * cfg.d_model
        return 2 * (3 * D * E) + 2 * cfg.conv_kernel * E

    def _gates(self, x_BTD):
        h = jnp.einsum("btd,dce->btce", x_BTD.astype(self.dtype), self.w_in[...].astype(self.dtype))
        h = h + self.b_in[...].astype(self.dtype)
        return h[:, :, 0], h[:, :, 1]

    def _out(self, u_conv, gate):
        y = jax.nn.silu(u_conv) * gate
        return jnp.einsum("bte,ed->btd", y, self.w_out[...].astype(self.dtype)) + self.b_out[...].astype(self.dtype)

    def __call__(self, x_BTD, ctx: LayerContext):
        u, gate = self._gates(x_BTD)
        return self._out(causal_conv(u, self.conv[...], segment_ids_BT=ctx.segment_ids_BT), gate)

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype):
        return jnp.zeros((batch, cfg.conv_kernel - 1, cfg.expand * cfg.d_model), dtype)

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        u, gate = self._gates(x_BTD)
        y = self._out(causal_conv(u, self.conv[...]), gate)  # causal: no real token sees the padding after it
        return y, state.at[i].set(history_at(u, ctx.lengths_B, self.conv.shape[0]).astype(state.dtype))

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        u, gate = self._gates(x_BTD)
        y = self._out(causal_conv(u, self.conv[...], history=state[i]), gate)
        return y, state.at[i].set(next_history(state[i], u, ctx.valid_BT))
