"""Model registry: each family registers its config class and module under a `model.type` name.

A family file does

    @dataclasses.dataclass(frozen=True)
    class MoEConfig(DecoderConfig):       # models/decoder.py: the shared skeleton and its fields
        n_experts: int = 8
        ...
    @register("moe", MoEConfig)
    class MoE(Decoder): ...               # its own layers are registered by name in layers/

and the training loop builds whatever `model.type` names, with no central `match` to edit.

The module contract is written down below as `LanguageModel` and `Decoding` (typing.Protocol): every
family satisfies the first, and the second where it can decode (eval's generate / throughput suites
use only it). Families built on the decoder skeleton (models/decoder.py) get both from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Protocol

DTypeName = Literal["float32", "bfloat16"]


class LanguageModel(Protocol):
    """What the training loop and the eval suites call. Built as `Model(cfg, *, rngs: nnx.Rngs)`, every
    parameter carrying logical axis names; the config class implements `param_count()` and
    `flops_per_token(seq_len)`."""

    cfg: "ModelConfig"

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, train: bool = False,
                 rng=None, step=None) -> tuple[Any, dict]:
        """-> (fp32 logits [B, T, V], aux). aux = {"losses": {name: weighted scalar}, "metrics": {name:
        array}, "state": nnx.State}, each key present only when non-empty (dense: {}). The loop adds the
        losses to the training loss and logs both (names carry a family prefix, "moe/aux_loss"), and
        carries "state" (non-trainable variables updated by this call) to the next step.
        positions restart at 0 per packed document, with segment ids keeping documents apart; `train`
        and `rng` (a key) serve layers that behave differently in training (routing noise, dropout);
        `step` (the training step, an int32 scalar; None outside training) serves schedules inside the model."""
        ...


class Decoding(Protocol):
    """Cached decoding. The cache is opaque to callers (the model owns its layout: KV slots, ring
    buffers, recurrent state) and `max_len` bounds prompt + generated tokens."""

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Any:
        """An empty cache, in the compute dtype unless `dtype` says otherwise."""
        ...

    def prefill(self, tokens_BT, lengths_B, cache) -> tuple[Any, Any]:
        """Right-padded prompts (row b's prompt is tokens_BT[b, :lengths_B[b]], lengths >= 1) into a fresh
        cache -> (fp32 logits [B, V] at each row's last prompt token, the cache). Padding never becomes
        state a later token can see."""
        ...

    def decode_step(self, tokens_B, cache) -> tuple[Any, Any]:
        """Appends one token per row -> (fp32 next-token logits [B, V], the cache)."""
        ...


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what would be valid."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields every family shares (a decoder over a token vocabulary)."""

    type: str = "dense"
    vocab_size: int = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128, filled in by the trainer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head); fewer gives grouped-query attention
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 0  # 0: SwiGLU width 8/3 * d_model rounded up to a multiple of 64
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: DTypeName = "float32"  # compute dtype; bfloat16 gives bf16 compute with fp32 master weights
    param_dtype: DTypeName = "float32"
    remat: Literal["none", "full", "dots"] = "none"  # rematerialisation policy per layer
    # Layers per iteration of each scan group's loop (jax.lax.scan's unroll; >= the repeats: no loop).
    # 1 keeps compile time flat in depth; unrolling a few-layer model is faster on CPU (docs/benchmarks.md).
    scan_unroll: int = 1
    attention_impl: Literal["auto", "xla", "blockwise", "cudnn", "pallas"] = "auto"  # pallas: opt-in (docs/attention.md)

    # Derived sizes (a zero field means "default"; these give the value actually used).
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    def validate(self) -> None:
        """Checks the values a model needs; families extend this."""
        for key in ("d_model", "n_layers", "n_heads", "scan_unroll"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be positive (or 0 for the tokenizer's), got {self.vocab_size}")
        if not self.head_dim and self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]
            raise ConfigError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                f"choose n_heads from {divisors} or set model.head_dim"
            )
        if self.n_heads % self.kv_heads:
            divisors = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}; "
                f"valid values: {divisors} (or 0 for n_heads)"
            )
        if self.dim_per_head % 2:
            raise ConfigError(f"head dimension {self.dim_per_head} must be even for RoPE (model.head_dim)")

    def param_count(self, *, non_embedding: bool = False, active: bool = False) -> int:  # pragma: no cover - per family
        raise NotImplementedError(f"{type(self).__name__} must implement param_count()")

    def flops_per_token(self, seq_len: int) -> float:  # pragma: no cover - per family
        raise NotImplementedError(f"{type(self).__name__} must implement flops_per_token()")


_REGISTRY: dict[str, tuple[type[ModelConfig], type]] = {}


def register(name: str, config_cls: type[ModelConfig]) -> Callable[[type], type]:
    """Class decorator: makes `model.type=name` build this module with `config_cls`."""

    def wrap(model_cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][1].__qualname__ != model_cls.__qualname__:
            raise ValueError(f"model type {name!r} is registered twice")
        _REGISTRY[name] = (config_cls, model_cls)
        return model_cls

    return wrap


def _load_families() -> None:
    # Importing a family file registers it. New families add one line here.
    from effax.models import dense  # noqa: F401
    from effax.models import moe  # noqa: F401
    from effax.models import hybrid  # noqa: F401
    from effax.models import mor  # noqa: F401


def available() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def config_class(name: str) -> type[ModelConfig]:
    _load_families()
    if name not in _REGISTRY:
        raise ConfigError(f"model.type={name!r} is not a registered model; valid: {sorted(_REGISTRY)}")
    return _REGISTRY[name][0]


def build(cfg: ModelConfig, *, rngs):
    """Builds the module `cfg.type` names (call it under `nnx.eval_shape` for a shape-only model)."""
    _load_families()
    config_cls, model_cls = _REGISTRY[cfg.type] if cfg.type in _REGISTRY else (None, None)
    if model_cls is None:
        config_class(cfg.type)  # raises with the valid names
    if not isinstance(cfg, config_cls):
        raise ConfigError(f"model.type={cfg.type!r} needs a {config_cls.__name__}, got {type(cfg).__name__}")
    return model_cls(cfg, rngs=rngs)
