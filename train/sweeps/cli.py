"""`effax sweep CONFIG[:VARIANT] --root DIR [...]` and `effax sweep status --root DIR`: options in, tables
out. What to launch, skip or resume, and each run's status, is decided in runner.py."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

HELP = """\
Launch, resume and inspect a sweep of training runs.

CONFIG is an experiment file whose get_sweep() returns a list of override lists, a dict of value lists
(their product) or Scaling blocks (IsoFLOP budgets × model sizes, Step Law lr and batch); see
docs/sweeps.md. Every run is resolved and validated first; a bad key or a too-small budget fails before
anything starts, naming the run.

Each run trains in ROOT/<run_id>/ (an ordinary `effax train` workdir plus sweep.json and train.log);
run_id is a hash of the run's resolved config. ROOT/sweep.sqlite indexes the runs (status, attempts,
losses); it is a cache of those files (`status --rebuild` recreates it). Re-running the same command
skips finished runs and resumes the others from their checkpoints. Ctrl-C stops the running children
(each saves a checkpoint) and marks them interrupted.

  effax sweep experiments/scaling/dense.py:smoke --root runs/smoke --dry-run   # the table, nothing runs
  effax sweep experiments/scaling/dense.py --root runs/dense --concurrency 2
  effax sweep status --root runs/dense

Exit status: 0 every run finished; 1 some run failed or timed out; 2 a bad sweep or option;
130/143 interrupted (relaunch to resume).
"""

STATUS_HELP = """\
Show the runs of a sweep root: status, attempts, step/total and the last losses, read fresh from each
run's metrics.jsonl. --rebuild recreates ROOT/sweep.sqlite from the run folders.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax sweep", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG[:VARIANT]", help="experiment file with get_sweep(), or `status`")
    p.add_argument("--root", required=True, help="sweep folder: one workdir per run, plus sweep.sqlite")
    p.add_argument("--backend", choices=["local", "slurm"], default="local", help="where runs execute (default: local)")
    p.add_argument("--dry-run", action="store_true", help="print the table of runs (with time estimates) and exit")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="overrides for every run, applied before the sweep's own")
    p.add_argument("--concurrency", type=int, default=1, help="local: runs at once (default 1)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="per attempt (default: none)")
    p.add_argument("--retries", type=int, default=0, help="extra attempts after a failure or timeout (default 0)")
    p.add_argument("--env", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="local: environment for the children, e.g. XLA_FLAGS=... JAX_PLATFORMS=cpu (default: inherit)")
    p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run (multi-host training; default 1)")
    p.add_argument("--tasks-per-node", type=int, default=1, help="slurm: processes per node (default 1)")
    p.add_argument("--slurm", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="slurm: SlurmBackend options, e.g. partition=gpu gres=gpu:8 max_parallel=16")
    p.add_argument("--tokens-per-s", type=float, default=None,
                   help="--dry-run: throughput per run for the time estimate (default: a CPU heuristic)")
    return p


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _num(x, fmt=".4f") -> str:
    return "-" if x is None else format(x, fmt)


def status_table(runs: list[dict]) -> str:
    lists = [set(json.loads(r["overrides"] or "[]")) for r in runs]
    common = set.intersection(*lists) if len(lists) > 1 else set()  # show what tells runs apart
    rows = [["run", "arch", "status", "attempts", "step/total", "train loss", "val loss", "val bpb", "overrides"]]
    for r in runs:
        steps = f"{r['step'] if r['step'] is not None else 0}/{r['total_steps'] or '?'}"
        ovr = [o for o in json.loads(r["overrides"] or "[]") if o not in common]
        rows.append([r["run_id"], r["arch"] or "", r["status"], str(r["attempts"]), steps, _num(r["train_loss"]),
                     _num(r["val_loss"]), _num(r["val_bpb"]), " ".join(ovr)])
    counts = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return _table(rows) + "\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" ({len(runs)} runs)"


# ---------------------------------------------------------------------------------------------------
# effax sweep status


def status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="effax sweep status", description=STATUS_HELP)
    p.add_argument("--root", required=True)
    p.add_argument("--rebuild", action="store_true", help="recreate sweep.sqlite from the run folders")
    args = p.parse_args(argv)
    from effax.train.sweeps import runner

    if not os.path.isdir(args.root):
        print(f"effax sweep status: {args.root} is not a directory", file=sys.stderr)
        return 2
    store, rebuilt = runner.open_store(args.root, rebuild=args.rebuild)
    if rebuilt is not None:
        print(f"rebuilt {store.path} from {rebuilt} run folders")
    runs, launcher_alive = runner.current_runs(store)
    meta = store.meta()
    if meta.get("config"):
        print(f"sweep {meta['config']} {' '.join(meta.get('overrides', []))}".rstrip()
              + (" (launcher running)" if launcher_alive else ""))
    print(status_table(runs))
    return 0


# ---------------------------------------------------------------------------------------------------
# effax sweep CONFIG


def _parse_kv(items: list[str], option: str) -> dict:
    bad = [kv for kv in items if "=" not in kv]
    if bad:
        raise ValueError(f"{option} takes KEY=VALUE, got {bad}")
    return dict(kv.split("=", 1) for kv in items)


def _literal(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _backend(args):
    env = _parse_kv(args.env, "--env")
    if args.backend == "local":
        from effax.train.sweeps.local import LocalBackend

        return LocalBackend(concurrency=args.concurrency, env=env)
    try:
        from effax.train.sweeps.slurm import SlurmBackend
    except ImportError as e:
        raise ValueError(f"the Slurm backend is unavailable ({e}); use --backend local") from None
    options = {k: _literal(v) for k, v in _parse_kv(args.slurm, "--slurm").items()}
    try:
        return SlurmBackend(**({"env": env} if env else {}), **options)
    except TypeError as e:
        raise ValueError(f"--slurm: {e}") from None


class _Progress:
    """tqdm over runs: a run counts once it reaches an end state (a retry puts it back in flight)."""

    def __init__(self, total: int, already_done: int):
        from tqdm import tqdm

        self.state = {}
        self.bar = tqdm(total=total, initial=already_done, unit="run", dynamic_ncols=True)
        self.done0 = already_done

    def __call__(self, run_id: str, status: str, attempt: int) -> None:
        if status not in ("running", "finished"):
            self.bar.write(f"run {run_id}: {status} (attempt {attempt}); see its train.log")
        self.state[run_id] = status
        self.bar.n = self.done0 + sum(s not in ("running", "pending") for s in self.state.values())
        running = sum(s == "running" for s in self.state.values())
        self.bar.set_postfix(running=running, refresh=False)
        self.bar.refresh()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    if min(args.concurrency, args.nodes, args.tasks_per_node) < 1 or args.retries < 0 or (args.timeout or 1) <= 0:
        print("effax sweep: --concurrency, --nodes and --tasks-per-node must be >= 1, --retries >= 0, --timeout > 0",
              file=sys.stderr)
        return 2
    from effax.train.config import ConfigError
    from effax.train.sweeps import spec

    try:
        plan, notes = spec.expand(args.config, args.overrides)
    except ConfigError as e:
        print(f"effax sweep: config error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    if args.dry_run:
        print(spec.dry_run_table(plan, concurrency=args.concurrency, tokens_per_s=args.tokens_per_s))
        return 0
    try:
        backend = _backend(args)
    except ValueError as e:
        print(f"effax sweep: {e}", file=sys.stderr)
        return 2
    return launch(args, plan, backend)


def launch(args, plan, backend) -> int:
    from effax.train.sweeps import runner

    try:
        sweep = runner.Launch(args.root, args.config, args.overrides, plan, backend.name, nodes=args.nodes,
                              tasks_per_node=args.tasks_per_node, timeout_s=args.timeout, retries=args.retries)
    except runner.SweepBusy as e:
        print(f"effax sweep: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, sweep, backend)
    finally:
        sweep.close()


def _run(args, sweep, backend) -> int:
    print(f"{len(sweep.todo) + sweep.done} runs in {sweep.root}: {sweep.done} finished, launching {len(sweep.todo)} "
          f"on {backend.name}" + (f" (concurrency {args.concurrency})" if backend.name == "local" else ""))
    if not sweep.todo:
        print(status_table(sweep.store.runs()))
        return 0

    stopped_by = {"exit": 130}

    def on_sigterm(signum, frame):
        stopped_by["exit"] = 143
        raise KeyboardInterrupt  # same clean stop as Ctrl-C: children save and are marked interrupted

    old = signal.signal(signal.SIGTERM, on_sigterm)
    progress = _Progress(len(sweep.todo) + sweep.done, sweep.done)
    try:
        results = sweep.run(backend, on_update=progress)
    except KeyboardInterrupt:
        progress.bar.close()
        print(f"\ninterrupted; running runs saved a checkpoint. Re-run the same command to resume.\n"
              f"{status_table(sweep.store.runs())}", file=sys.stderr)
        return stopped_by["exit"]
    finally:
        signal.signal(signal.SIGTERM, old)
    progress.bar.close()
    print(status_table(sweep.store.runs()))
    bad = [r for r in results if r.status != "finished"]
    if bad:
        print(f"{len(bad)} run(s) did not finish: " + ", ".join(f"{r.run_id} ({r.status}, {r.log_path})" for r in bad),
              file=sys.stderr)
    return 1 if bad else 0
