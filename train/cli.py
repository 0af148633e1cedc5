"""`effax train CONFIG[:VARIANT] [--workdir DIR] [--set KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

HELP = """\
Train a model from an experiment file, or resume the run in --workdir.

CONFIG is a Python file defining get_config(variant); add :VARIANT to pick a variant, e.g.
experiments/quickstart.py:smoke. --set overrides any config key by its dotted path, parsed by the
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from effax.train import config as config_lib

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

    try:
        return loop.train(cfg, args.workdir or default_workdir(args.config), quiet=args.quiet)
    except config_lib.ConfigError as e:
        print(f"effax train: config error: {e}", file=sys.stderr)
        return 2
    except loop.TrainingDiverged as e:
        print(f"effax train: {e}", file=sys.stderr)
        return 3
