"""`effax train CONFIG[:VARIANT] [--workdir DIR] [--set KEY=VALUE ...]` and `effax train CONFIG --variants`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

HELP = """\
Train a model from an experiment file, or resume the run in --workdir.

CONFIG is a Python file defining get_config(variant); add :VARIANT to pick a variant, e.g.
experiments/quickstart.py:smoke; `effax train CONFIG --variants` lists the file's variants, one line
each (its VARIANTS table), and exits. --set overrides any config key by its dotted path, parsed by the
field's type; unknown keys and bad values fail before anything compiles, naming the valid choices.
Public keys: model.type model.d_model model.n_layers model.n_heads data.source data.seq_len
train.batch_size train.steps train.seed optimizer.lr mesh.data mesh.fsdp mesh.tensor mesh.expert
checkpoint.every eval.every (all keys: --print-config).

The workdir receives config.json, metrics.jsonl (one JSON line per logged step), tb/ (TensorBoard)
and checkpoints/. Re-running the same command resumes from the latest good checkpoint; SIGTERM or
Ctrl-C saves a checkpoint and exits (status 143 / 130).

Multi-host: start the same command once per process with --coordinator HOST:PORT (process 0's
address) --num-processes N --process-id I; under Slurm (`srun` with several tasks) nothing is needed,
the processes find each other from Slurm's environment. Each process reads only its rows of every
batch; process 0 writes config.json and metrics; checkpoints are written by all together.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax train", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG[:VARIANT]", help="experiment file, e.g. experiments/quickstart.py:smoke")
    p.add_argument("--workdir", default=None, help="run folder (default: runs/<experiment>[-<variant>])")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="config overrides, e.g. --set train.steps=200 model.d_model=256")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--variants", action="store_true", help="list the experiment's variants, one line each, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary lines")
    g = p.add_argument_group("multi-host (all three together; automatic inside a many-task Slurm step)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None, help="address of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's index, 0 … N-1")
    return p


def default_workdir(spec: str) -> str:
    path, _, variant = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", name + (f"-{variant}" if variant else ""))


def experiment_variants(spec: str) -> dict[str | None, str]:
    """The experiment file's VARIANTS table: {variant (None: the default): a one-line description}."""
    from effax.train.config import ConfigError, load_experiment

    module, _ = load_experiment(spec)
    path = spec.partition(":")[0]
    table = getattr(module, "VARIANTS", None)
    if table is None:
        raise ConfigError(f"{path} has no VARIANTS table (a module-level dict of variant → one-line description); "
                          "its get_config(variant) says which variants it accepts")
    one_line = lambda k, v: (k is None or isinstance(k, str)) and isinstance(v, str) and "\n" not in v  # noqa: E731
    if not (isinstance(table, dict) and table and all(one_line(k, v) for k, v in table.items())):
        raise ConfigError(f"{path}: VARIANTS must be a non-empty dict of variant name (None: the default) → "
                          f"one-line description, got {table!r}")
    return table


def variants_listing(spec: str) -> str:
    """One line per variant: the CONFIG to pass to `effax train`, then its description."""
    path = spec.partition(":")[0]
    table = experiment_variants(spec)
    names = [path + (f":{v}" if v else "") for v in table]
    width = max(map(len, names))
    return "\n".join(f"{name:<{width}}  {desc}" for name, desc in zip(names, table.values()))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from effax.train import config as config_lib

    if args.variants:
        try:
            print(variants_listing(args.config))
        except config_lib.ConfigError as e:
            print(f"effax train: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = config_lib.resolve(args.config, args.overrides)
    except config_lib.ConfigError as e:
        print(f"effax train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    from effax.train import distributed

    try:  # before anything queries a device (the loop does, from its first line)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedError as e:
        print(f"effax train: {e}", file=sys.stderr)
        return 2
    from effax.train import loop
    from effax.train.tokenizer import DataError

    try:
        return loop.train(cfg, args.workdir or default_workdir(args.config), quiet=args.quiet)
    except config_lib.ConfigError as e:
        print(f"effax train: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # a bad corpus file: one line naming the file and the problem, no traceback
        print(f"effax train: data error: {e}", file=sys.stderr)
        return 2
    except loop.TrainingDiverged as e:
        print(f"effax train: {e}", file=sys.stderr)
        return 3
