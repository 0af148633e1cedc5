"""`effax bench model`: training-step throughput of an experiment config, with variants side by side.

    effax bench model experiments/quickstart.py --vary model.attention_impl=xla,cudnn --set model.dtype=bfloat16

`effax bench attention` (train/bench_attention.py) times the attention impls and masks themselves;
`effax bench peer` (train/bench_peer.py) trains the same shape with PyTorch's Llama, alternating;
`effax bench kernels` (train/bench_kernels.py) times each Pallas kernel against its XLA reference;
`effax bench profile` (train/bench_profile.py) splits one training step's time by part, pass and kind.

Every variant runs the loop's own jitted train step (`loop.build_trainer`) on real batches from the
config's data, in this one process, so the ratios between rows are measured under the same conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

HELP = """\
Time the training step of CONFIG (and of each --vary value) and print a table: ms per step, tokens/s,
model TFLOP/s (from the model's own flops_per_token) and MFU where the device's peak is known, and the
ratio to the first row. Warm-up steps (compilation included) are not timed; the figure is the median
of --repeats timed blocks of --steps steps. With --interleave the blocks alternate between the variants.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax bench", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "attention", "peer", "kernels", "profile"],
                   help="model: the training step of an experiment config; attention: `effax bench attention --help`; "
                        "peer: against PyTorch's Llama, `effax bench peer --help`; kernels: the Pallas kernels "
                        "against their XLA references, `effax bench kernels --help`; profile: where a "
                        "training step's time goes, `effax bench profile --help`")
    p.add_argument("config", metavar="CONFIG[:VARIANT]")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[])
    p.add_argument("--vary", metavar="KEY=V1,V2,...", action="append", default=[],
                   help="one row per value (several --vary give their product); keys in one quoted --vary, "
                        "space-separated, vary together: --vary 'data.seq_len=512,2048 train.batch_size=4,1'")
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--interleave", action="store_true",
                   help="compile every variant first, then alternate their timed blocks (fairer ratios on a noisy "
                        "machine; holds every variant's state at once)")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    return p


def _setup(cfg, n_batches: int = 4):
    """(cfg with its vocabulary filled in, the loop's own trainer, mesh, rules, `n_batches` host batches)."""
    import jax

    from effax.train import data as data_lib
    from effax.train import loop
    from effax.train import mesh as mesh_lib

    cfg = loop.resolve_vocab(cfg, data_lib.tokenizer_for(cfg.data))
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_divisibility(cfg, mesh)
    rules = mesh_lib.rules(cfg.mesh)
    trainer = loop.build_trainer(cfg, mesh, rules)
    batches = data_lib.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                      process_index=jax.process_index(), process_count=jax.process_count())
    return cfg, trainer, mesh, rules, [next(batches) for _ in range(n_batches)]


@contextlib.contextmanager
def _in(mesh, rules):
    import jax
    from flax import nnx

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


@contextlib.contextmanager
def trainer_and_batches(cfg, n_batches: int = 4):
    """The loop's own trainer for `cfg` on the mesh its config asks for, and `n_batches` real batches on the
    devices; yields (cfg with its vocabulary filled in, trainer, batches) inside the mesh and logical-axis
    rules (bench model and bench profile time the same step)."""
    cfg, trainer, mesh, rules, batches = _setup(cfg, n_batches)
    with _in(mesh, rules):
        yield cfg, trainer, [trainer.to_global(b) for b in batches]


class _Timed:
    """One variant's train step, compiled and warmed up, timed a block of steps at a time."""

    def __init__(self, cfg, warmup: int):
        import jax

        self.cfg, self.trainer, mesh, rules, batches = _setup(cfg)
        self.context = lambda: _in(mesh, rules)
        self.times, self.metrics = [], None  # --warmup 0: nothing to wait for before the first block
        with self.context():
            self.batches = [self.trainer.to_global(b) for b in batches]
            self.state = self.trainer.init_state()
            for i in range(warmup):
                self.state, self.metrics = self.trainer.train_step(self.state, self.batches[i % 4])
            jax.block_until_ready(self.metrics)

    def block(self, steps: int) -> None:
        import jax

        with self.context():
            start = time.perf_counter()
            for i in range(steps):
                self.state, self.metrics = self.trainer.train_step(self.state, self.batches[i % 4])
            jax.block_until_ready(self.metrics)
            self.times.append((time.perf_counter() - start) / steps)

    def row(self) -> dict:
        import jax

        from effax.train import metrics as metrics_lib

        cfg, step_s = self.cfg, sorted(self.times)[len(self.times) // 2]
        tokens = cfg.train.batch_size * cfg.data.seq_len
        flops = tokens * cfg.model.flops_per_token(cfg.data.seq_len) / step_s
        peak = metrics_lib.peak_flops()
        return {"ms_per_step": 1e3 * step_s, "tokens_per_s": tokens / step_s, "model_tflops": flops / 1e12,
                "mfu": flops / (peak * jax.device_count()) if peak else None, "loss": float(self.metrics["loss"]),
                "params_m": cfg.model.param_count() / 1e6}


def time_config(cfg, *, steps: int, repeats: int, warmup: int) -> dict:
    timed = _Timed(cfg, warmup)
    for _ in range(repeats):
        timed.block(steps)
    return timed.row()


def time_interleaved(configs, *, steps: int, repeats: int, warmup: int) -> list[dict]:
    """Every variant compiled and warmed up first (all their states held at once), then the timed blocks
    alternate between the variants, so that load on a shared machine spreads over every row."""
    timed = [_Timed(cfg, warmup) for cfg in configs]
    for _ in range(repeats):
        for t in timed:
            t.block(steps)
    return [t.row() for t in timed]


def vary_axis(item: str) -> list[list[str]]:
    """One --vary: 'KEY=V1,V2' gives [[KEY=V1], [KEY=V2]]; 'K1=A,B K2=C,D' (keys that vary together) gives
    [[K1=A, K2=C], [K1=B, K2=D]]."""
    groups = []
    for part in item.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"--vary {item!r} must look like KEY=V1,V2 (or 'K1=A,B K2=C,D' to vary keys together)")
        groups.append([f"{key}={v}" for v in values.split(",")])
    if not groups:
        raise ValueError("--vary '' must look like KEY=V1,V2")
    if len({len(g) for g in groups}) > 1:
        raise ValueError(f"--vary {item!r}: keys that vary together need as many values each")
    return [list(row) for row in zip(*groups)]


def main(argv: list[str]) -> int:
    import itertools

    if argv[:1] == ["attention"]:
        from effax.train import bench_attention

        return bench_attention.main(argv[1:])
    if argv[:1] == ["peer"]:
        from effax.train import bench_peer

        return bench_peer.main(argv[1:])
    if argv[:1] == ["profile"]:
        from effax.train import bench_profile

        return bench_profile.main(argv[1:])
    if argv[:1] == ["kernels"]:
        from effax.train import bench_kernels

        return bench_kernels.main(argv[1:])
    args = build_parser().parse_args(argv)
    from effax.train import config as config_lib

    try:
        axes = [vary_axis(item) for item in args.vary]
    except ValueError as e:
        print(f"effax bench: {e}", file=sys.stderr)
        return 2
    variants = [[s for group in v for s in group] for v in itertools.product(*axes)] or [[]]
    try:
        configs = [config_lib.resolve(args.config, args.overrides + v) for v in variants]
    except config_lib.ConfigError as e:
        print(f"effax bench: config error: {e}", file=sys.stderr)
        return 2
    import jax

    print(f"{args.config} {' '.join(args.overrides)} on {jax.device_count()} × {jax.devices()[0].device_kind}")
    rows = []
    header = f"{'variant':<40} {'params':>8} {'ms/step':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'ratio':>7}"
    print(header)
    timing = dict(steps=args.steps, repeats=args.repeats, warmup=args.warmup)
    # Interleaved: every row is timed before any is printed; otherwise each row as soon as it is measured.
    measured = iter(time_interleaved(configs, **timing)) if args.interleave else (time_config(c, **timing) for c in configs)
    for variant, figures in zip(variants, measured):
        row = {"variant": " ".join(variant) or "(as configured)", **figures}
        row["ratio"] = rows[0]["ms_per_step"] / row["ms_per_step"] if rows else 1.0
        rows.append(row)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        print(f"{row['variant']:<40} {row['params_m']:>7.1f}M {row['ms_per_step']:>9.1f} {row['tokens_per_s']:>11.0f} "
              f"{row['model_tflops']:>9.3f} {mfu:>7} {row['ratio']:>6.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "device": jax.devices()[0].device_kind,
                       "devices": jax.device_count(), "rows": rows}, f, indent=2)
    return 0
