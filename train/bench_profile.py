"""`effax bench profile`: where the milliseconds of one training step go, by part of the model and pass.

    effax bench profile [experiments/quickstart.py] [--set KEY=VALUE ...] [--steps 5] [--out FILE.json]

It compiles the loop's own train step (`loop.build_trainer`), runs a few steps under `jax.profiler`, and
attributes every executed XLA op (a thunk of XLA's CPU runtime, a kernel on GPU) to

- a *part*: the effax file and function the op was traced from (the innermost effax frame of the op's
  stack in the compiled HLO's metadata, skipping the shared helpers of layers/linear.py and
  layers/sharding.py): `layers/mlp.py:__call__` is the feed-forward, `layers/attention.py:qkv` the
  attention's projections, and so on; ops traced in optax or `train/optimizer.py` are the optimizer update;
  ops with no effax frame (copies XLA inserted, for one) are `other`;
- a *pass*: forward, or backward when JAX's name stack says the op is the transpose of a JVP
  (`transpose(jvp(...))`), or update (the optimizer);
- a *kind*: matmul (dot / library matmul fusions), copy/transpose (layout changes XLA inserted), or
  other (elementwise fusions, reductions, gathers, ...).

It prints ms per step for each (part, pass) with the share of the total, then the same by kind, and the
step's wall time. The op times are summed over threads, so on a multi-threaded CPU runtime their total can
differ from the wall time (independent ops overlap; a parallel op counts once). Control-flow ops (the
layer scan's while loop, conditionals) only wrap other ops and are left out. XLA:CPU's own dots
(train.cpu_dots=xla, the default) run on Eigen's threads and are mostly missing from the op times (the
quickstart's ops then cover ~45% of the wall time, and the command says so when they cover under 80%);
`--set train.cpu_dots=ynnpack` profiles the YNNPACK build, whose dots are traced (~99%).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

DEFAULT = "experiments/quickstart.py"
EFFAX_DIRS = ("layers", "models", "train", "kernels", "eval")
CONTROL_FLOW = {"while", "conditional", "call"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax bench profile", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG[:VARIANT]", nargs="?", default=DEFAULT)
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[])
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--out", help="also write the table as JSON to this file")
    return p


# ---------------------------------------------------------------------------------------------------
# The compiled HLO: instruction name -> (opcode, op_name, source file)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")


def _instruction(line: str) -> tuple[str, str] | None:
    """'%name = SHAPE opcode(...)...' -> (name, opcode); SHAPE may be a tuple '(f32[2]{0}, s32[])' (multi-output
    fusions), which holds spaces, so it is skipped by balancing parentheses."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest, depth, i = m[2], 0, 0
    if rest.startswith("("):
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        rest = rest[i + 1:]
    else:
        rest = rest.split(None, 1)[1] if " " in rest else ""
    op = _OPCODE.match(rest)
    return (m[1], op[1]) if op else None
_FILE_NAME = re.compile(r'^(\d+)\s+"(.*)"$')
_FILE_LOC = re.compile(r"^(\d+)\s+\{file_name_id=(\d+)\s+function_name_id=(\d+)")
_FRAME = re.compile(r"^(\d+)\s+\{file_location_id=(\d+)(?:\s+parent_frame_id=(\d+))?")


HELPERS = {"layers/linear.py", "layers/sharding.py"}  # called by every part: the op belongs to their caller


def _part(path: str, function: str) -> str | None:
    """('.../layers/mlp.py', '__call__') -> 'layers/mlp.py:__call__' (effax's own files, helpers skipped);
    'optimizer' for optax and train/optimizer.py; None for other code."""
    parts = path.replace("\\", "/").split("/")
    if "optax" in parts:
        return "optimizer"
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] in EFFAX_DIRS and parts[i].endswith(".py"):
            name = f"{parts[i - 1]}/{parts[i]}"
            if name in HELPERS:
                return None
            return "optimizer" if name == "train/optimizer.py" else f"{name}:{function}"
    return None


def parse_hlo(text: str) -> dict[str, tuple[str, str, str]]:
    """{instruction name: (opcode, JAX op_name, part)} for every instruction of the compiled module."""
    files, functions, locs, frames = {}, {}, {}, {}
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = stripped
            continue
        if not stripped:  # a blank line ends a table
            section = None
        if section == "FileNames" and (m := _FILE_NAME.match(stripped)):
            files[m[1]] = m[2]
        elif section == "FunctionNames" and (m := _FILE_NAME.match(stripped)):
            functions[m[1]] = m[2]
        elif section == "FileLocations" and (m := _FILE_LOC.match(stripped)):
            locs[m[1]] = (m[2], m[3])
        elif section == "StackFrames" and (m := _FRAME.match(stripped)):
            # The printed parent id is the parent's id + 1 (1: no parent), as this XLA writes the table.
            parent = int(m[3] or 1) - 1
            frames[m[1]] = (m[2], str(parent) if parent else None)

    def part_of(frame_id: str | None) -> str | None:
        seen = set()
        while frame_id and frame_id not in seen:  # innermost frame first, then its callers
            seen.add(frame_id)
            loc, parent = frames.get(frame_id, (None, None))
            file_id, function_id = locs.get(loc, ("", ""))
            part = _part(files.get(file_id, ""), functions.get(function_id, "?"))
            if part:
                return part
            frame_id = parent
        return None

    ops = {}
    for line in text.splitlines():
        parsed = _instruction(line)
        if not parsed:
            continue
        name, opcode = parsed
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        ops[name] = (opcode, op_name[1] if op_name else "", part_of(frame[1] if frame else None) or "other")
    return ops


def classify(name: str, opcode: str, op_name: str, part: str) -> tuple[str, str, str]:
    """(part, pass, kind) of one executed op."""
    if part == "optimizer":
        pass_ = "update"
    elif "transpose(" in op_name:
        pass_ = "backward"
    else:
        pass_ = "forward"
    if opcode in ("dot", "convolution") or "ynn" in name or "xnn" in name or "gemm" in name or "dot" in name:
        kind = "matmul"
    elif opcode in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        kind = "copy/transpose"
    else:
        kind = "other"
    return part, pass_, kind


# ---------------------------------------------------------------------------------------------------


def op_times(trace_dir: str, ops: dict) -> dict[str, float]:
    """Total seconds per executed HLO instruction name, from the profiler's perfetto trace."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
    with gzip.open(paths[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops and ops[e["name"]][0] not in CONTROL_FLOW:
            totals[e["name"]] += e.get("dur", 0) * 1e-6  # perfetto durations are microseconds
    return totals


def profile(cfg, *, steps: int, warmup: int) -> dict:
    import jax

    from effax.train import loop
    from effax.train.bench import trainer_and_batches

    with trainer_and_batches(cfg) as (cfg, trainer, device_batches):
        state = trainer.init_state()
        compiled = loop.compiled_step(trainer.train_step, state, device_batches[0])  # the executable the loop runs
        ops = parse_hlo(compiled.as_text())
        for i in range(warmup):
            state, metrics = trainer.train_step(state, device_batches[i % 4])
        jax.block_until_ready(metrics)
        with tempfile.TemporaryDirectory() as trace_dir:
            start = time.perf_counter()
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for i in range(steps):
                    state, metrics = trainer.train_step(state, device_batches[i % 4])
                jax.block_until_ready(metrics)
            wall_s = (time.perf_counter() - start) / steps
            totals = op_times(trace_dir, ops)
    if not totals:
        raise RuntimeError("the trace holds no op of the compiled train step (is the profiler supported on "
                           f"{jax.default_backend()}?)")
    by_part, by_kind = collections.Counter(), collections.Counter()
    for name, seconds in totals.items():
        part, pass_, kind = classify(name, *ops[name])
        by_part[(part, pass_)] += seconds / steps
        by_kind[(kind, pass_)] += seconds / steps
    return {"wall_ms": 1e3 * wall_s, "op_ms": 1e3 * sum(totals.values()) / steps,
            "by_part": [{"part": p, "pass": s, "ms": 1e3 * t} for (p, s), t in by_part.most_common()],
            "by_kind": [{"kind": k, "pass": s, "ms": 1e3 * t} for (k, s), t in by_kind.most_common()]}


def format_table(result: dict) -> str:
    total = result["op_ms"]
    lines = [f"step wall time {result['wall_ms']:.1f} ms; op time summed over threads {total:.1f} ms", "",
             f"{'part':44s} {'pass':9s} {'ms/step':>9s} {'share':>7s}"]
    lines += [f"{r['part']:44s} {r['pass']:9s} {r['ms']:9.1f} {100 * r['ms'] / total:6.1f}%" for r in result["by_part"]]
    lines += ["", f"{'kind':44s} {'pass':9s} {'ms/step':>9s} {'share':>7s}"]
    lines += [f"{r['kind']:44s} {r['pass']:9s} {r['ms']:9.1f} {100 * r['ms'] / total:6.1f}%" for r in result["by_kind"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from effax.train import config as config_lib

    try:
        cfg = config_lib.resolve(args.config, args.overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    result = profile(cfg, steps=args.steps, warmup=args.warmup)
    result.update(config=args.config, overrides=args.overrides, backend=jax.default_backend(),
                  jax=jax.__version__, steps=args.steps)
    print(f"{args.config} {' '.join(args.overrides)}: {args.steps} steps on {jax.default_backend()} (jax {jax.__version__})")
    print(format_table(result))
    if result["op_ms"] < 0.8 * result["wall_ms"]:
        print(f"\nnote: the ops cover only {result['op_ms'] / result['wall_ms']:.0%} of the wall time. On CPU, XLA's own dots "
              "(train.cpu_dots=xla, the default) run on Eigen's threads outside the traced op times; "
              "--set train.cpu_dots=ynnpack profiles the YNNPACK build, whose dots are traced.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
