"""Sweeps: an experiment's `get_sweep()` → a list of fully resolved runs, each with a stable id.

`get_sweep(variant)` (or `get_sweep()`) in the experiment file returns one of

    [["model.d_model=64"], ["model.d_model=128", "train.seed=1"]]    a list of override lists
    {"model.d_model": [64, 128], "train.seed": [0, 1]}              a product (4 runs, keys in order)
    Scaling(budgets=[...], sizes=[{...}, ...], ...)                 an IsoFLOP block (or a list of blocks)

Every run is resolved and validated with `config.resolve` before anything launches, so an unknown key,
a bad value or a budget too small fails naming the run. A run's id is a hash of its resolved config
(`run_id`); `ROOT/<run_id>/` is an ordinary `effax train` workdir plus `sweep.json` (arch, N, D, C,
budget: what the scaling fits in eval/fits/scaling.py read).

Scaling blocks. For each size, FLOPs per token f come from the model's own `flops_per_token(seq_len)`
(attention and LM head included, not 6N); a budget C gives D = C / f tokens. Learning rate and batch
are explicit grids or the Step Law prediction (Li et al. 2025, N active non-embedding parameters, D tokens)

    η* = 1.79 · N^-0.713 · D^0.307        B* = 0.58 · D^0.571 tokens

times the block's factors (e.g. lr_factors=(0.5, 1, 2) for a grid around η*). The batch in sequences
is rounded to a multiple of the data-parallel size, steps = round(D / (batch · seq_len)), and the
run's D and C are recomputed from those rounded steps (the budget stays as the run's label).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import os
from typing import Any, Mapping, Sequence

from effax.train import config as config_lib
from effax.train import mesh as mesh_lib
from effax.train.config import Config, ConfigError

# Fields left out of the run id: they change neither the trained weights nor the figures (only names,
# logging, the device layout and checkpoint cadence), so editing them must not fork a sweep's runs.
# The mesh is out because a run resumes under any mesh (train/loop.py: check_resumable).
IDENTITY_EXCLUDED = ("name", "logging", "mesh", "checkpoint", "train.log_every", "train.sample_prompt",
                     "train.sample_tokens")
# Appended to every run's command line (not part of its identity): a progress bar is noise in train.log.
LOG_OVERRIDES = ("logging.progress=false",)


def step_law_lr(n_params: float, tokens: float) -> float:
    return 1.79 * n_params ** -0.713 * tokens ** 0.307


def step_law_batch_tokens(tokens: float) -> float:
    return 0.58 * tokens ** 0.571


@dataclasses.dataclass(frozen=True)
class Scaling:
    """An IsoFLOP block: every size at every budget (× lr × batch × seed)."""

    budgets: Sequence[float]  # training FLOPs per run, C
    sizes: Sequence[Mapping[str, Any]]  # overrides per model size, e.g. {"model.d_model": 64, "model.n_layers": 2}
    lr: str | Sequence[float] = "steplaw"  # "steplaw", "config" (optimizer.lr of the config, or of a size
    # that sets "optimizer.lr": a per-size rule), or explicit values
    lr_factors: Sequence[float] = (1.0,)  # multiply η* or the config's lr: (0.5, 1, 2) is a grid around it
    batch: str | Sequence[int] = "steplaw"  # "steplaw" or explicit global batches in sequences
    batch_factors: Sequence[float] = (1.0,)
    seeds: Sequence[int] = (0,)
    arch: str = ""  # the label fits group runs by (default: model.type)
    min_steps: int = 50  # (size, budget) pairs with fewer steps are skipped, with a note
    batch_multiple: int = 0  # 0: the config's batch split, mesh.data × mesh.fsdp × mesh.expert (a -1 axis counts 1)
    warmup_fraction: float | None = None  # if set, optimizer.warmup_steps = round(fraction × steps)
    extra: Sequence[str] = ()  # overrides for every run of the block, e.g. ("model.n_kv_heads=0",)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    run_id: str
    overrides: tuple[str, ...]  # the sweep's overrides for this run (after the CLI's --set ones)
    cfg: Config  # resolved, vocab_size filled in from the tokenizer
    arch: str
    N: int  # non-embedding parameters
    D: int  # training tokens: steps × batch × seq_len
    C: float  # training FLOPs: flops_per_token(seq_len) × D
    budget: float | None = None  # the scaling block's nominal C

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    def sweep_json(self, spec: str, base_overrides: Sequence[str]) -> dict:
        meta = {"run_id": self.run_id, "arch": self.arch, "N": self.N, "D": self.D, "C": self.C,
                "config": spec, "overrides": [*base_overrides, *self.overrides]}
        if self.budget is not None:
            meta["budget"] = self.budget
        return meta


def run_id(cfg: Config) -> str:
    """12 hex digits of sha256 over the resolved config (sorted JSON) minus IDENTITY_EXCLUDED."""
    data = config_lib.to_dict(cfg)
    for path in IDENTITY_EXCLUDED:
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# Expansion


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _round_sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")  # readable override strings, and ids that do not hang on the 17th digit


def _nonempty(name: str, values) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ConfigError(f"get_sweep(): {name} must be a non-empty list, got {values!r}")
    if not values:
        raise ConfigError(f"get_sweep(): {name} is an empty list; give at least one value")
    return list(values)


def load_sweep(spec: str):
    """The experiment's get_sweep(variant) (or get_sweep()) result."""
    module, variant = config_lib.load_experiment(spec)
    fn = getattr(module, "get_sweep", None)
    if fn is None:
        raise ConfigError(f"{spec.partition(':')[0]} defines no get_sweep(); see docs/sweeps.md")
    return fn(variant) if inspect.signature(fn).parameters else fn()


class _Resolver:
    """config.resolve with the vocabulary filled in (flops_per_token counts the LM head), one tokenizer
    per data config."""

    def __init__(self, spec: str, base_overrides: Sequence[str]):
        self.spec, self.base = spec, list(base_overrides)
        self._tokenizers = {}

    def __call__(self, overrides: Sequence[str], where: str) -> Config:
        from effax.train import data as data_lib
        from effax.train import loop

        try:
            cfg = config_lib.resolve(self.spec, self.base + list(overrides))
            if cfg.data not in self._tokenizers:
                self._tokenizers[cfg.data] = data_lib.tokenizer_for(cfg.data)
            return loop.resolve_vocab(cfg, self._tokenizers[cfg.data])
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{where} ({' '.join(overrides) or 'no overrides'}): {e}") from None


def _planned(resolve: _Resolver, overrides: list[str], where: str, arch: str = "", budget=None) -> PlannedRun:
    cfg = resolve(overrides, where)
    D = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    return PlannedRun(run_id=run_id(cfg), overrides=tuple(overrides), cfg=cfg, arch=arch or cfg.model.type,
                      N=cfg.model.param_count(non_embedding=True, active=True), D=D,
                      C=cfg.model.flops_per_token(cfg.data.seq_len) * D, budget=budget)


def _expand_scaling(block: Scaling, resolve: _Resolver, label: str, notes: list[str]) -> list[PlannedRun]:
    budgets = _nonempty(f"{label}.budgets", block.budgets)
    sizes = _nonempty(f"{label}.sizes", block.sizes)
    seeds = _nonempty(f"{label}.seeds", block.seeds)
    lr_factors = _nonempty(f"{label}.lr_factors", block.lr_factors)
    batch_factors = _nonempty(f"{label}.batch_factors", block.batch_factors)
    if block.lr not in ("steplaw", "config"):
        _nonempty(f"{label}.lr (\"steplaw\", \"config\" or a list)", block.lr)
    if block.batch != "steplaw":
        _nonempty(f"{label}.batch (\"steplaw\" or a list)", block.batch)
    if any(not c > 0 for c in budgets):
        raise ConfigError(f"get_sweep(): {label}.budgets must be positive FLOP counts, got {budgets}")
    runs, per_budget = [], {c: 0 for c in budgets}
    for i, size in enumerate(sizes):
        if not isinstance(size, Mapping) or not size:
            raise ConfigError(f"get_sweep(): {label}.sizes[{i}] must be a non-empty dict of overrides, got {size!r}")
        size_ovr = [*block.extra, *(f"{k}={_fmt(v)}" for k, v in size.items())]
        if "optimizer.lr" in size and block.lr != "config":
            raise ConfigError(f"get_sweep(): {label}.sizes[{i}] sets optimizer.lr, which {label}.lr={block.lr!r} "
                              f"would override; use lr=\"config\" for a learning rate per size")
        cfg = resolve(size_ovr, f"{label}.sizes[{i}]")  # unknown keys fail here, named
        seq = cfg.data.seq_len
        fpt = cfg.model.flops_per_token(seq)
        n = cfg.model.param_count(non_embedding=True, active=True)
        multiple = block.batch_multiple or mesh_lib.batch_ways(cfg.mesh)
        for C in budgets:
            tokens = C / fpt
            if block.batch == "steplaw":
                b0 = step_law_batch_tokens(tokens) / seq
                batches = [max(multiple, multiple * round(b0 * f / multiple)) for f in batch_factors]
            else:
                batches = [int(b) for b in block.batch]
                for b in batches:
                    if b <= 0 or b % multiple:
                        raise ConfigError(f"get_sweep(): {label}.batch value {b} must be a positive multiple "
                                          f"of the data-parallel size {multiple}")
            if block.lr == "steplaw":
                lrs = [_round_sig(step_law_lr(n, tokens) * f) for f in lr_factors]
            elif block.lr == "config":
                lrs = [_round_sig(cfg.optimizer.lr * f) for f in lr_factors]
            else:
                lrs = [float(x) for x in block.lr]
            for batch in dict.fromkeys(batches):  # factors may round to the same batch
                steps = round(tokens / (batch * seq))
                if steps < block.min_steps:
                    notes.append(f"skipped {label}.sizes[{i}] {dict(size)} at C={C:.3g}, batch {batch}: "
                                 f"{steps} steps < min_steps={block.min_steps}")
                    continue
                per_budget[C] += 1
                for lr, seed in itertools.product(lrs, seeds):
                    ovr = [*(o for o in size_ovr if not o.startswith("optimizer.lr=")),  # set once, just below
                           f"train.steps={steps}", f"train.batch_size={batch}", f"optimizer.lr={lr!r}",
                           f"train.seed={seed}"]
                    if block.warmup_fraction is not None:
                        ovr.append(f"optimizer.warmup_steps={round(block.warmup_fraction * steps)}")
                    runs.append(_planned(resolve, ovr, f"{label}.sizes[{i}] at C={C:.3g}", block.arch, C))
    for C, count in per_budget.items():
        if count == 0:
            raise ConfigError(f"get_sweep(): {label} budget C={C:.3g} gives fewer than min_steps={block.min_steps} "
                              f"steps for every size; raise the budget or lower min_steps")
    return runs


def expand(spec: str, base_overrides: Sequence[str] = ()) -> tuple[list[PlannedRun], list[str]]:
    """The sweep of `spec` as resolved runs (validated, ids unique) and notes (skipped points)."""
    sweep = load_sweep(spec)
    resolve = _Resolver(spec, base_overrides)
    notes: list[str] = []
    if isinstance(sweep, Scaling):
        sweep = [sweep]
    if isinstance(sweep, Mapping):
        keys = list(sweep)
        if not keys:
            raise ConfigError("get_sweep() returned an empty dict; map keys to lists of values")
        grids = [_nonempty(f"the grid of {k!r}", sweep[k]) for k in keys]
        runs = [_planned(resolve, [f"{k}={_fmt(v)}" for k, v in zip(keys, combo)], f"run {j}")
                for j, combo in enumerate(itertools.product(*grids))]
    elif isinstance(sweep, (list, tuple)):
        items = _nonempty("the returned list", sweep)
        if all(isinstance(s, Scaling) for s in items):
            runs = [r for j, s in enumerate(items) for r in _expand_scaling(s, resolve, f"scaling[{j}]", notes)]
        elif all(isinstance(s, (list, tuple)) and all(isinstance(o, str) for o in s) for s in items):
            runs = [_planned(resolve, list(s), f"run {j}") for j, s in enumerate(items)]
        else:
            raise ConfigError("get_sweep() must return a list of override lists, a list of Scaling blocks, "
                              "a dict of value lists, or a Scaling block")
    else:
        raise ConfigError(f"get_sweep() returned a {type(sweep).__name__}; expected a list of override lists, "
                          "a dict of value lists, or a Scaling block")
    seen: dict[str, int] = {}
    for j, r in enumerate(runs):
        if r.run_id in seen:
            raise ConfigError(f"runs {seen[r.run_id]} ({' '.join(runs[seen[r.run_id]].overrides)}) and {j} "
                              f"({' '.join(r.overrides)}) resolve to the same config (run id {r.run_id})")
        seen[r.run_id] = j
    return runs, notes


# ---------------------------------------------------------------------------------------------------
# Launch arguments, sweep.json, the dry-run table


def train_argv(spec: str, base_overrides: Sequence[str], run: PlannedRun, workdir: str) -> tuple[str, ...]:
    """Arguments after `effax train`. The experiment path is made absolute so any cwd works."""
    path, sep, variant = spec.partition(":")
    return (os.path.abspath(path) + sep + variant, "--workdir", workdir,
            "--set", *base_overrides, *run.overrides, *LOG_OVERRIDES)


def write_sweep_json(workdir: str, meta: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "sweep.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(workdir, "sweep.json"))


# Time estimate without a measurement, calibrated on tiny dense models run two at a time on this
# project's 2-core CPU machine (docs/sweeps.md): a step costs a fixed and a per-layer overhead (dispatch,
# data, metrics; it dominates for tiny models) plus its FLOPs at HEURISTIC_FLOPS_PER_S, and every run pays
# a start-up (imports, compilation, the final eval and checkpoint). Only an estimate; on other hardware
# pass --tokens-per-s.
HEURISTIC_FLOPS_PER_S = 3e10
HEURISTIC_STEP_OVERHEAD_S = (0.008, 0.006)  # (per step, per step and layer)
HEURISTIC_RUN_OVERHEAD_S = 25.0


def estimate_seconds(run: PlannedRun, tokens_per_s: float | None = None) -> float:
    tokens_per_step = run.cfg.train.batch_size * run.cfg.data.seq_len
    if tokens_per_s:
        step_s = tokens_per_step / tokens_per_s
    else:
        fixed, per_layer = HEURISTIC_STEP_OVERHEAD_S
        flops = tokens_per_step * run.cfg.model.flops_per_token(run.cfg.data.seq_len)
        step_s = fixed + per_layer * run.cfg.model.n_layers + flops / HEURISTIC_FLOPS_PER_S
    return HEURISTIC_RUN_OVERHEAD_S + run.steps * step_s


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"


def varying_overrides(runs: Sequence[PlannedRun]) -> list[list[str]]:
    """Each run's overrides minus those every run shares (the table shows what tells runs apart)."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    return [[o for o in r.overrides if o not in common] for r in runs]


def dry_run_table(runs: Sequence[PlannedRun], *, concurrency: int = 1, tokens_per_s: float | None = None) -> str:
    head = ["#", "run_id", "arch", "N", "D", "C", "lr", "batch", "steps", "est.", "overrides"]
    rows = []
    total = 0.0
    for j, (r, ovr) in enumerate(zip(runs, varying_overrides(runs))):
        est = estimate_seconds(r, tokens_per_s)
        total += est
        rows.append([str(j), r.run_id, r.arch, _si(r.N), _si(r.D), f"{r.C:.3g}", f"{r.cfg.optimizer.lr:.4g}",
                     str(r.cfg.train.batch_size), str(r.steps), _duration(est), " ".join(ovr)])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    basis = (f"at {tokens_per_s:.0f} tokens/s per run" if tokens_per_s else
             "from a CPU heuristic (2-core machine); pass --tokens-per-s with a measured figure")
    lines.append(f"{len(runs)} runs, total C = {sum(r.C for r in runs):.3g} FLOPs, {_si(sum(r.D for r in runs))} tokens; "
                 f"estimated ≈ {_duration(total / max(concurrency, 1))} at concurrency {concurrency} "
                 f"(an estimate, {basis}).")
    return "\n".join(lines)
