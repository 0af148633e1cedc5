"""The layer interface of the decoder skeleton: mixers and feed-forwards, registered by name.

A decoder block is `x + mixer(norm(x))` then `x + ffn(norm(x))`; `model.pattern` chooses the mixer
(and optionally the feed-forward) of each layer by these names. Adding a mixer is one file:

    @register_mixer("running_sum")
    class RunningSum(Layer):
        def __init__(self, cfg, *, rngs): ...                    # cfg: the model config (or override from_config)
        def __call__(self, x_BTD, ctx: LayerContext): ...        # training / full forward -> y_BTD
        @classmethod
        def param_count(cls, cfg): ...                           # exact, checked against the built layer
        @classmethod
        def flops_per_token(cls, cfg, seq_len): ...              # forward FLOPs per token
        # decoding (only for layers with state):
        @classmethod
        def init_state(cls, cfg, batch, max_len, dtype): ...     # one layer's decode state, or None
        def prefill(self, x_BTD, ctx, state, i): ...             # -> (y_BTD, state)
        def decode(self, x_BTD, ctx, state, i): ...              # -> (y_BTD, state)

Decode state. A feed-forward may have decode state too (same interface; Hydra's chunk-level MoE keeps its
chunk's routing). The skeleton stacks each layer's state over the repeats of its scan group, so every
array in `state` has a leading [R] axis and `i` is this layer's index in it: read `state.k[i]`, write
`state.k.at[i, rows, slots].set(...)` so that a decode step writes only its new slots (a per-layer
slice copied in and out of the scan would move the whole cache at every step).

Reporting. `ctx.aux_loss(name, value)` adds a weighted scalar to the training loss; `ctx.diagnostic(name,
value)` is logged, never added. Names carry the family prefix (`moe/aux_loss`), and `reduce` says how the
per-layer values combine: "sum", "mean", "max", or "per_layer" (one figure per layer: `moe/load_layer3`).
A diagnostic may be a vector (per-expert load); it is logged as a list and a TensorBoard histogram.

State outside the gradient: a layer's non-trainable variables (`Buffer`) change in the forward pass
(`self.bias[...] = new` when `ctx.train`), are carried by the train step, checkpointed and restored,
and never receive gradients or weight decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

REDUCTIONS = ("sum", "mean", "max", "per_layer")


class Buffer(nnx.Variable):
    """Non-trainable layer state updated during training (routing biases, running statistics)."""


@dataclasses.dataclass(frozen=True)
class Report:
    """One figure a layer reported: `kind` is "loss" (added to the loss) or "metric" (logged)."""

    kind: str
    reduce: str


@dataclasses.dataclass
class LayerContext:
    """What a layer sees besides its input, for one call (built per layer by the skeleton).

    positions_BT:   absolute positions (restarting at 0 per packed document in training).
    segment_ids_BT: packed-document ids (training only), or None.
    valid_BT:       decoding only: which tokens are real (prompt padding and, for Mixture-of-Recursions,
                    tokens that skip this layer are False); a layer must not let an invalid token reach
                    its state. None in the full forward pass.
    lengths_B:      prefill only: tokens in each row's prompt (the next token's position).
    train:          the training forward pass (routing noise, dropout, buffer updates) vs evaluation.
    rng:            a key for this layer and step (None when the caller gave none).
    layer:          the absolute layer index (a traced int inside the layer scan).
    step:           the training step (an int32 scalar, traced) in the training forward pass, for schedules
                    inside the model (Mixture-of-Recursions' capacity warm-up); None elsewhere.
    carry:          values handed from layer to layer along the depth (MoE++'s router logits for its gating
                    residual): a layer reads `ctx.carry[name]` and may assign a new value of the same shape;
                    the skeleton threads them through the scans, starting from the layers' `init_carry`.
    shared:         decoding only: state shared by several layers, kept once in the cache (YOCO's single KV
                    cache, written by one layer and read by the cross-decoder's layers): `ctx.shared[name]`, as
                    declared by the layers' `init_shared`; a layer may assign a new value of the same shape.
    """

    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None = None
    valid_BT: jax.Array | None = None
    lengths_B: jax.Array | None = None
    train: bool = False
    rng: jax.Array | None = None
    layer: Any = 0
    step: jax.Array | None = None
    values: dict = dataclasses.field(default_factory=dict)
    reports: dict = dataclasses.field(default_factory=dict)
    carry: dict = dataclasses.field(default_factory=dict)
    shared: dict = dataclasses.field(default_factory=dict)

    def aux_loss(self, name: str, value: jax.Array, *, reduce: str = "sum") -> None:
        """A weighted scalar loss term (already multiplied by its coefficient)."""
        self._report(name, value, Report("loss", reduce))

    def diagnostic(self, name: str, value: jax.Array, *, reduce: str = "mean") -> None:
        """A figure to log (a scalar, or a vector such as per-expert load)."""
        self._report(name, value, Report("metric", reduce))

    def _report(self, name: str, value, report: Report) -> None:
        if "/" not in name or name.startswith("/") or name.endswith("/"):
            raise ValueError(f"reported figure {name!r} needs a family prefix, e.g. 'moe/{name.strip('/')}'")
        if report.reduce not in REDUCTIONS:
            raise ValueError(f"reported figure {name!r}: reduce={report.reduce!r} is not one of {REDUCTIONS}")
        if name in self.values:
            raise ValueError(f"figure {name!r} is reported twice by one layer")
        if report.kind == "loss" and jax.numpy.ndim(value) != 0:
            raise ValueError(f"aux loss {name!r} must be a scalar, got shape {jax.numpy.shape(value)}")
        self.values[name] = jax.numpy.asarray(value, jax.numpy.float32)
        self.reports[name] = report


class Layer(nnx.Module):
    """Defaults for the interface above: built from the model config, stateless, every parameter active."""

    @classmethod
    def from_config(cls, cfg, *, rngs: nnx.Rngs) -> "Layer":
        """How the skeleton builds the layer; override to keep an explicit constructor (see SwiGLU)."""
        return cls(cfg, rngs=rngs)

    @classmethod
    def param_count(cls, cfg) -> int:  # pragma: no cover - per layer
        raise NotImplementedError(f"{cls.__name__} must implement param_count(cfg)")

    @classmethod
    def active_param_count(cls, cfg) -> int:
        """Parameters used per token (an MoE layer's active experts); all of them by default."""
        return cls.param_count(cfg)

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int) -> float:  # pragma: no cover - per layer
        raise NotImplementedError(f"{cls.__name__} must implement flops_per_token(cfg, seq_len)")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raises ValueError naming the `model.*` key of a bad value this layer reads (the config's
        validate() reports it as a ConfigError before anything is built)."""

    @classmethod
    def init_state(cls, cfg, batch: int, max_len: int, dtype) -> Any:
        return None

    @classmethod
    def init_carry(cls, cfg, batch: int, seq_len: int) -> dict:
        """The depth-wise values (`ctx.carry`) this layer reads, as they enter the first layer: {name: array}."""
        return {}

    @classmethod
    def init_shared(cls, cfg, batch: int, max_len: int, dtype) -> dict:
        """Decode state this layer shares with others (`ctx.shared`), kept once in the cache: {name: state}."""
        return {}

    @classmethod
    def constrain_state(cls, state_R):
        """Sharding constraints on the state stacked over a scan group (leading axis "layers")."""
        return state_R

    def prefill(self, x_BTD, ctx: LayerContext, state, i):
        return self(x_BTD, ctx), state

    def decode(self, x_BTD, ctx: LayerContext, state, i):
        return self(x_BTD, ctx), state


MIXERS: dict[str, type[Layer]] = {}
FFNS: dict[str, type[Layer]] = {}


def _register(table: dict, kind: str, name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in table and table[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is registered twice ({table[name].__qualname__}, {cls.__qualname__})")
        if "+" in name or "," in name:
            raise ValueError(f"{kind} name {name!r} may not contain '+' or ',' (they separate model.pattern entries)")
        table[name] = cls
        return cls

    return wrap


def register_mixer(name: str) -> Callable[[type], type]:
    """Class decorator: `model.pattern` entries may name this mixer."""
    return _register(MIXERS, "mixer", name)


def register_ffn(name: str) -> Callable[[type], type]:
    """Class decorator: `model.ffn` and `mixer+ffn` pattern entries may name this feed-forward."""
    return _register(FFNS, "feed-forward", name)


def _load_layers() -> None:
    # Importing a layer file registers its layers. New layer files add one line here.
    from effax.layers import attention, mlp  # noqa: F401
    from effax.layers import nsa, sparse_attention  # noqa: F401  (sparse attention: docs/attention.md)
    from effax.layers import moe  # noqa: F401  (Mixture-of-Experts feed-forward "moe": docs/moe.md)
    from effax.layers import conv, delta_rule, linear_attention, ssm  # noqa: F401  (hybrid mixers: docs/hybrid.md)
    from effax.layers import chunk_moe, pkm, yoco  # noqa: F401  (SambaY / YOCO / Hydra layers: docs/hybrid.md)


def mixer(name: str) -> type[Layer]:
    _load_layers()
    if name not in MIXERS:
        raise KeyError(name)
    return MIXERS[name]


def ffn(name: str) -> type[Layer]:
    _load_layers()
    if name not in FFNS:
        raise KeyError(name)
    return FFNS[name]


def available() -> tuple[list[str], list[str]]:
    """(mixer names, feed-forward names)."""
    _load_layers()
    return sorted(MIXERS), sorted(FFNS)
