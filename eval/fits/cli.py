"""`effax fit --root DIR [--out DIR] [--bootstrap N] [--baseline ARCH]`: scaling-law fits of a sweep root,
written as fit.json (authoritative), PNG plots and report.md (see docs/scaling.md). Options in, a summary
out; the fits and the files are fit.py's."""

from __future__ import annotations

import os

# The fits solve thousands of 5×5 problems; OpenBLAS's thread pool only adds overhead there (5× slower on a
# busy 2-core machine). Set before numpy is first imported, which on the `effax fit` path is just below.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402

from effax.eval.fits import fit, scaling  # noqa: E402

HELP = """\
Fit scaling laws to the finished runs below a sweep root (ROOT/<run_id>/config.json + metrics.jsonl).

Per run: N = non-embedding parameters, D = steps × batch × seq_len tokens, C = the model's own FLOPs per
token × D (ROOT/<run_id>/sweep.json may give arch, N, D, C, budget, finished instead), loss = the last
validation loss (or the newest eval/step_<N>.loss.json). Per architecture: Chinchilla approach 2 (IsoFLOP
parabolas → N*(C), D*(C) power laws; ≥2 budgets with ≥3 sizes each), approach 3 (L = E + A/N^α + B/D^β,
Huber on log-loss, L-BFGS; ≥5 runs), bootstrap CIs, a held-out check on the largest budget (≥3 budgets)
and the loss-vs-compute frontier; across architectures, the compute multiplier at equal loss.

examples:
  effax fit --root runs/sweep                                  # writes runs/sweep/fit/{fit.json,report.md,*.png}
  effax fit --root runs/sweep --baseline dense --bootstrap 2000 --budgets 1e21,5.76e23
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax fit", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the sweep root: one run workdir per subfolder")
    p.add_argument("--out", help="output folder (default: ROOT/fit)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000; 0: none)")
    p.add_argument("--baseline", metavar="ARCH", help="architecture the compute multipliers are relative to "
                                                      "(default: the one with the most finished runs)")
    p.add_argument("--target-loss", type=float, help="loss at which to compare compute (default: baseline's best)")
    p.add_argument("--budgets", metavar="C,C,...", help="FLOP budgets for N_opt / D_opt (default: the sweep's)")
    p.add_argument("--budget-tol", type=float, default=scaling.BUDGET_TOL,
                   help="without budget labels in sweep.json, runs within ±this share of a group's centre C form one "
                        "budget (a group spans up to ×(1+tol)²); default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join(args.root, "fit")
    try:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    except ValueError:
        print(f"effax fit: --budgets must be comma-separated numbers, got {args.budgets!r}", file=sys.stderr)
        return 2
    try:
        runs = scaling.load_runs(args.root)
        result = fit.fit_all(runs, bootstrap=args.bootstrap, baseline=args.baseline, budgets=budgets,
                             target_loss=args.target_loss, seed=args.seed, tol=args.budget_tol)
    except scaling.ScalingError as err:
        print(f"effax fit: {err}", file=sys.stderr)
        return 2
    for line in fit.errors(result):
        print(f"effax fit: not fitted: {line}", file=sys.stderr)
    for line in fit.warnings(result):
        print(f"effax fit: warning: {line}", file=sys.stderr)
    if not fit.fitted_any(result):
        print("effax fit: no fit was possible; see the reasons above", file=sys.stderr)
        return 2
    plots = fit.write(result, out)
    print(f"effax fit: {result['inputs']['finished']} runs, {len(result['archs'])} architecture(s) → "
          f"{out}/fit.json, report.md, {', '.join(plots)}")
    return 0
