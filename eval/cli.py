"""`effax eval --workdir DIR [--step N|latest|best] [--suite loss,bpb,...] [--out FILE.json]`."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

HELP = """\
Evaluate checkpoints of a run (or of every run below --root) on this machine's devices.

The run's config.json rebuilds the model for the mesh given by --mesh (default: all devices on the data
axis, whatever mesh it trained on); only the parameters are read, not the optimizer state. --step picks
the checkpoint: latest (the newest that restores; a broken one is skipped with a warning), best (lowest
val loss in metrics.jsonl) or a step number.

Each (checkpoint, suite) result goes to DIR/eval/step_<N>.<suite>.json (loss/bpb on --data X:
step_<N>.<suite>@X.json), its scalar figures to TensorBoard (DIR/tb, tags eval/<suite>/<figure>, at the
checkpoint's step), and a table to the terminal; --out FILE.json collects all results in one file.

--watch polls for new finished checkpoints and evaluates each one whose results are not on disk yet,
until Ctrl-C, --watch-timeout seconds without a new checkpoint, or --until-step N is reached.

examples:
  effax eval --workdir runs/quickstart                          # loss and bpb of the latest checkpoint
  effax eval --workdir runs/quickstart --suite bpb --data kjv   # out of domain: the King James Bible
  effax eval --workdir runs/quickstart --step best --mesh data=1,fsdp=2 --out results.json
  effax eval --root runs/sweep --watch --suite loss,bpb         # every run below runs/sweep, as they train
"""


def build_parser() -> argparse.ArgumentParser:
    from effax.eval import suites

    p = argparse.ArgumentParser(prog="effax eval", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="the run folder (holds config.json and checkpoints/)")
    where.add_argument("--root", help="evaluate every run folder below ROOT that has a config.json (a sweep)")
    p.add_argument("--step", default=None, help="latest (default), best, or a step number")
    p.add_argument("--suite", default="loss,bpb", help=f"comma-separated suites from {', '.join(suites.SUITES)} "
                                                        "(default: loss,bpb)")
    p.add_argument("--out", metavar="FILE.json", help="also write every result into this one JSON file")
    p.add_argument("--mesh", metavar="AXIS=N,...", help="mesh to restore onto, e.g. data=2,fsdp=4 (axes data, fsdp, "
                                                        "tensor, expert; default: all devices on data)")
    w = p.add_argument_group("watch mode")
    w.add_argument("--watch", action="store_true", help="keep polling for new checkpoints")
    w.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="seconds between polls (default 30)")
    w.add_argument("--watch-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop after this long without a new checkpoint")
    w.add_argument("--until-step", type=int, default=None, metavar="N",
                   help="stop once every run has a checkpoint at step >= N evaluated")
    suites.add_arguments(p)
    return p


def parse_mesh(text: str | None):
    if not text:
        return None
    from effax.train.config import MeshConfig
    from effax.train.mesh import AXES

    sizes = {}
    for part in text.split(","):
        axis, eq, value = part.partition("=")
        if axis.strip() not in AXES or not eq:
            raise ValueError(f"--mesh {text!r}: {part!r} is not AXIS=N with AXIS one of {', '.join(AXES)}")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size {value!r} of {axis} is not an integer") from None
    if "data" not in sizes:
        sizes["data"] = -1 if -1 not in sizes.values() else 1
    return MeshConfig(**sizes)


# ---------------------------------------------------------------------------------------------------
# One checkpoint: run the suites, file the results


def result_key(suite: str, opts) -> str:
    """File and TensorBoard name of a suite's result: loss/bpb on another corpus or split carry its name."""
    from effax.eval.suites import DATA_SUITES

    if suite not in DATA_SUITES:
        return suite
    data, split = getattr(opts, "data", None), getattr(opts, "split", None)
    tag = None
    if data:
        tag = data if data in ("kjv", "sotu") else os.path.splitext(os.path.basename(os.path.normpath(data)))[0]
        tag += f".{split}" if split and split != "all" else ""
    elif split and split != "val":
        tag = split
    return f"{suite}@{tag}" if tag else suite


def result_path(workdir: str, step: int, key: str) -> str:
    return os.path.join(workdir, "eval", f"step_{step}.{key}.json")


def evaluate(ctx, names: list[str], opts, *, lead: bool = True) -> list[dict]:
    """Runs each suite on a restored checkpoint; writes its JSON and TensorBoard scalars (process 0)."""
    from effax.eval import suites

    records, scalars = [], {}
    for name in names:
        start = time.perf_counter()
        figures = suites.get(name)(ctx, opts)
        key = result_key(name, opts)
        record = {"suite": name, "key": key, "step": ctx.step, "workdir": ctx.workdir,
                  "data": getattr(opts, "data", None) if name in suites.DATA_SUITES else None,
                  "figures": figures, "seconds": round(time.perf_counter() - start, 3),
                  "mesh": dict(ctx.mesh.shape), "timestamp": datetime.datetime.now().astimezone().isoformat()}
        if lead:
            _write_json(result_path(ctx.workdir, ctx.step, key), record)
        scalars.update({f"eval/{key}/{k}": v for k, v in _scalars(figures).items()})
        records.append(record)
    if lead and scalars:
        _write_tensorboard(ctx.workdir, ctx.step, scalars)
    return records


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"  # whole or absent: the watcher takes an existing file as done
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _scalars(figures: dict) -> dict:
    return {k: float(v) for k, v in figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


_writers: dict = {}  # one event file per run and eval process (beside the run's own; TensorBoard merges them)


def _write_tensorboard(workdir: str, step: int, scalars: dict) -> None:
    if workdir not in _writers:
        from tensorboard.summary import Writer  # the event-file writer without TensorFlow

        _writers[workdir] = Writer(os.path.join(workdir, "tb"))
    for tag, v in scalars.items():
        _writers[workdir].add_scalar(tag, v, step)
    _writers[workdir].flush()


def _close_writers() -> None:
    while _writers:
        _writers.popitem()[1].close()


def format_table(records: list[dict]) -> str:
    """One row per figure: run, step, suite, figure, value (strings and lists shortened)."""
    def show(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (list, tuple)):
            return f"[{len(v)} items]"
        text = str(v).replace("\n", " ")
        return text if len(text) <= 80 else text[:77] + "..."

    rows, last = [], None
    for r in records:
        for i, (k, v) in enumerate(r["figures"].items()):
            head = (os.path.basename(r["workdir"]), str(r["step"]), r["key"]) if i == 0 else ("", "", "")
            if i == 0 and last == head[:2]:
                head = ("", "", r["key"])
            rows.append((*head, k, show(v)))
        last = (os.path.basename(r["workdir"]), str(r["step"]))
    header = ("run", "step", "suite", "figure", "value")
    widths = [max(len(x[c]) for x in [header, *rows]) for c in range(5)]
    fmt = "  ".join(f"{{:{'>' if c == 1 else '<'}{w}}}" for c, w in enumerate(widths))
    return "\n".join(fmt.format(*x).rstrip() for x in [header, *rows])


# ---------------------------------------------------------------------------------------------------
# The command


def find_runs(root: str) -> list[str]:
    """Run folders (with a config.json) below `root`, sorted; checkpoint and eval folders are not searched."""
    runs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "eval", "tb"))
        if "config.json" in files:
            runs.append(os.path.abspath(folder))
    return runs


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        from effax.eval import suites

        names = suites.parse(args.suite)
        mesh = parse_mesh(args.mesh)
        if args.watch and args.step is not None:
            raise ValueError("--step picks one checkpoint; --watch evaluates every new one (drop one of them)")
        if not args.watch and (args.watch_timeout is not None or args.until_step is not None):
            raise ValueError("--watch-timeout and --until-step only apply with --watch")
    except ValueError as e:
        print(f"effax eval: {e}", file=sys.stderr)
        return 2

    import jax

    from effax.eval import restore as restore_lib
    from effax.train.config import ConfigError
    from effax.train.tokenizer import DataError

    lead = jax.process_index() == 0
    collected: list[dict] = []

    def finish(records: list[dict]) -> None:
        collected.extend(records)
        if lead:
            print(format_table(records), flush=True)
            if args.out:
                _write_json(args.out, {"results": collected})

    try:
        if args.watch:
            from effax.eval import watch

            def evaluate_step(workdir: str, step: int) -> None:
                ctx = restore_lib.restore(workdir, step, mesh)
                todo = [n for n in names if not os.path.exists(result_path(workdir, step, result_key(n, args)))]
                finish(evaluate(ctx, todo, args, lead=lead))

            def is_done(workdir: str, step: int) -> bool:
                return all(os.path.exists(result_path(workdir, step, result_key(n, args))) for n in names)

            runs = (lambda: find_runs(args.root)) if args.root else (lambda: [os.path.abspath(args.workdir)])
            print(f"effax eval: watching {args.root or args.workdir} for new checkpoints every {args.poll:g} s "
                  f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
            return watch.watch(runs, restore_lib.checkpoint_steps, is_done, evaluate_step, poll=args.poll,
                               timeout=args.watch_timeout, until_step=args.until_step)
        if args.workdir:
            finish(evaluate(restore_lib.restore(args.workdir, args.step or "latest", mesh), names, args, lead=lead))
            return 0
        workdirs, failed = find_runs(args.root), 0
        if not workdirs:
            raise restore_lib.RestoreError(f"no run folder (with a config.json) below {args.root!r}")
        for workdir in workdirs:  # a sweep: one run without checkpoints yet does not stop the others
            try:
                finish(evaluate(restore_lib.restore(workdir, args.step or "latest", mesh), names, args, lead=lead))
            except restore_lib.RestoreError as e:
                print(f"effax eval: {e}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    except (restore_lib.RestoreError, ConfigError, DataError) as e:
        print(f"effax eval: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("effax eval: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_writers()
