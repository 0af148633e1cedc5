"""`effax fit --root DIR [--out DIR] [--bootstrap N] [--baseline ARCH]`: scaling-law fits of a sweep root,
written as fit.json (authoritative), PNG plots and report.md (see docs/scaling.md).

`fit_all(runs)` runs every fit of scaling.py per architecture and returns what fit.json holds."""

from __future__ import annotations

import os

# The fits solve thousands of 5×5 problems; OpenBLAS's thread pool only adds overhead there (5× slower on a
# busy 2-core machine). Set before numpy is first imported, which on the `effax fit` path is just below.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from effax.eval.fits import scaling  # noqa: E402

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


def _ci(samples: dict, keys) -> dict:
    return {k: scaling.percentile_ci(samples[k]) for k in keys}


def fit_arch(runs: list[scaling.Run], *, n_boot: int, rng: np.random.Generator, budgets, tol: float = scaling.BUDGET_TOL) -> dict:
    """Approaches 2 and 3, their bootstrap CIs, the held-out check and the loss frontier for one architecture.
    A fit that the data cannot support is recorded as {"error": why} instead of failing the others."""
    N, D, C, L = scaling.arrays(runs)
    kap = scaling.kappa(runs)
    budgets = np.asarray(sorted(budgets if budgets is not None else {b for b, _ in scaling.group_budgets(runs, tol)}), float)
    out: dict = {"n_runs": len(runs), "kappa": kap, "budgets": budgets.tolist(), "_runs": runs}
    try:
        a2 = scaling.approach2(runs, tol)
        if n_boot:
            bs = scaling.bootstrap_approach2(runs, n_boot, rng, tol)
            a2["ci"] = _ci(bs, ("a", "b", "k_N", "k_D"))
            a2["ci"]["N_star"] = [scaling.percentile_ci(bs["k_N"] * c ** bs["a"]) for c in budgets]
            a2["ci"]["D_star"] = [scaling.percentile_ci(bs["k_D"] * c ** bs["b"]) for c in budgets]
            a2["bootstrap_failed"] = bs["failed"]
        a2["N_star_at"] = (a2["k_N"] * budgets ** a2["a"]).tolist()
        a2["D_star_at"] = (a2["k_D"] * budgets ** a2["b"]).tolist()
        out["approach2"] = a2
    except scaling.ScalingError as err:
        out["approach2"] = {"error": str(err)}
    try:
        law = scaling.approach3(N, D, L)
        n_opt, d_opt = law.optimal(budgets, kap)
        a3 = {**law.as_dict(), "a": law.beta / (law.alpha + law.beta), "N_opt": n_opt.tolist(), "D_opt": d_opt.tolist(),
              "tokens_per_param": (d_opt / n_opt).tolist(),
              "residuals_log": (np.log(law(N, D)) - np.log(L)).tolist(), "at_bound": scaling.at_bound(law)}
        if n_boot:
            bs = scaling.bootstrap_approach3(N, D, L, law, n_boot, rng)
            a3["ci"] = _ci(bs, ("E", "A", "B", "alpha", "beta"))
            laws = [scaling.Law(*v) for v in zip(bs["E"], bs["A"], bs["B"], bs["alpha"], bs["beta"])]
            opt = np.array([lw.optimal(budgets, kap) for lw in laws])  # (R, 2, budgets)
            a3["ci"]["N_opt"] = [scaling.percentile_ci(opt[:, 0, j]) for j in range(len(budgets))]
            a3["ci"]["D_opt"] = [scaling.percentile_ci(opt[:, 1, j]) for j in range(len(budgets))]
            a3["ci"]["tokens_per_param"] = [scaling.percentile_ci(opt[:, 1, j] / opt[:, 0, j]) for j in range(len(budgets))]
            a3["ci"]["a"] = scaling.percentile_ci(bs["beta"] / (bs["alpha"] + bs["beta"]))
        out["approach3"] = a3
    except scaling.ScalingError as err:
        out["approach3"] = {"error": str(err)}
    try:
        out["heldout"] = scaling.heldout(runs, tol)
    except scaling.ScalingError as err:
        out["heldout"] = {"error": str(err)}
    try:
        Cf, Lf, how = scaling.frontier_points(runs, tol)
        front = scaling.fit_frontier(Cf, Lf)
        out["frontier"] = {**dataclasses.asdict(front), "points": how, "C": Cf.tolist(), "L": Lf.tolist()}
        if n_boot and how == "isoflop_minima":
            out["_frontier_boot"] = scaling.bootstrap_frontier(runs, front, n_boot, rng, tol)
        out["_frontier"] = front
    except scaling.ScalingError as err:
        out["frontier"] = {"error": str(err)}
    return out


def fit_all(runs: list[scaling.Run], *, bootstrap: int = 1000, baseline: str | None = None, budgets=None,
            target_loss: float | None = None, seed: int = 0, tol: float = scaling.BUDGET_TOL) -> dict:
    """Fits every architecture among the finished runs, and the compute multiplier of each against `baseline`
    (default: the architecture with the most finished runs) at `target_loss` (default: the baseline's best)."""
    done = [r for r in runs if r.finished]
    if not done:
        raise scaling.ScalingError(f"no finished runs with a validation loss among {len(runs)} run(s); a run is finished "
                           "when metrics.jsonl reaches train.steps (or sweep.json says so)")
    rng = np.random.default_rng(seed)
    by_arch: dict[str, list[scaling.Run]] = {}
    for r in done:
        by_arch.setdefault(r.arch, []).append(r)
    if baseline is None:
        baseline = max(sorted(by_arch), key=lambda a: len(by_arch[a]))
    elif baseline not in by_arch:
        raise scaling.ScalingError(f"--baseline {baseline!r} has no finished runs; architectures: {sorted(by_arch)}")
    archs = {a: fit_arch(rs, n_boot=bootstrap, rng=rng, budgets=budgets, tol=tol) for a, rs in sorted(by_arch.items())}
    result = {"inputs": {"runs": len(runs), "finished": len(done), "bootstrap": bootstrap, "budget_tol": tol,
                         "huber_delta": scaling.HUBER_DELTA, "seed": seed,
                         "per_arch": {a: {"runs": len(rs), "N": [min(r.N for r in rs), max(r.N for r in rs)],
                                          "C": [min(r.C for r in rs), max(r.C for r in rs)]} for a, rs in by_arch.items()},
                         "unfinished": sorted(r.run_id for r in runs if not r.finished)},
              "baseline": baseline, "archs": archs, "multiplier": {}}
    base = archs[baseline].get("_frontier")
    target = target_loss if target_loss is not None else min(r.loss for r in by_arch[baseline])
    for a, fit in archs.items():
        if a == baseline:
            continue
        if base is None or "_frontier" not in fit:
            result["multiplier"][a] = {"error": "needs a loss-vs-compute frontier fit for both architectures"}
            continue
        m = {"target_loss": target, "value": scaling.multiplier(base, fit["_frontier"], target)}
        bb, bo = archs[baseline].get("_frontier_boot"), fit.get("_frontier_boot")
        if bb and bo:
            k = min(len(bb), len(bo))  # independent resamples of the two sweeps, paired by index
            m["ci"] = scaling.percentile_ci([scaling.multiplier(bb[i], bo[i], target) for i in range(k)])
        result["multiplier"][a] = m
    return result


def to_json_ready(result: dict) -> dict:
    """Drops the in-memory objects (keys starting with "_") kept for the plots; nan/inf become null."""
    if isinstance(result, dict):
        return {k: to_json_ready(v) for k, v in result.items() if not str(k).startswith("_")}
    if isinstance(result, (list, tuple)):
        return [to_json_ready(v) for v in result]
    if isinstance(result, (float, np.floating, np.integer)):
        value = result.item() if isinstance(result, np.generic) else result
        return None if isinstance(value, float) and not np.isfinite(value) else value  # strict JSON: no Infinity
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax fit", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the sweep root: one run workdir per subfolder")
    p.add_argument("--out", help="output folder (default: ROOT/fit)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000; 0: none)")
    p.add_argument("--baseline", metavar="ARCH", help="architecture the compute multipliers are relative to "
                                                      "(default: the one with the most finished runs)")
    p.add_argument("--target-loss", type=float, help="loss at which to compare compute (default: baseline's best)")
    p.add_argument("--budgets", metavar="C,C,...", help="FLOP budgets for N_opt / D_opt (default: the sweep's)")
    p.add_argument("--budget-tol", type=float, default=0.10, help="runs within ±this share of C form one budget")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return p


def _fmt(v, ci=None) -> str:
    if v is None:
        return "—"
    text = f"{v:.4g}"
    return text + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def report(result: dict, plots: list[str]) -> str:
    """report.md: inputs, one table per architecture, held-out errors, multipliers, the plots."""
    inp = result["inputs"]
    lines = ["# Scaling-law fit", "",
             f"{inp['finished']} finished runs of {inp['runs']} ({len(inp['unfinished'])} unfinished, not used); "
             f"{inp['bootstrap']} bootstrap resamples, 95% percentile intervals in brackets. "
             "N: non-embedding parameters; C: training FLOPs from each model's own FLOPs per token.", ""]
    for arch, fit in result["archs"].items():
        lines += [f"## {arch}", "", f"{fit['n_runs']} runs; κ = C/(N·D) = {fit['kappa']:.3g} "
                  "(used for the approach-3 allocation, C = κ N D).", "", "| quantity | value [95% CI] |", "|---|---|"]
        a3, a2 = fit["approach3"], fit["approach2"]
        if "error" in a3:
            lines.append(f"| approach 3 | not fitted: {a3['error']} |")
        else:
            ci = a3.get("ci", {})
            for k in ("E", "A", "B", "alpha", "beta", "a"):
                lines.append(f"| approach 3: {k} | {_fmt(a3[k], ci.get(k))} |")
            if a3.get("at_bound"):  # the data did not pin the exponent down: the allocation follows the bound
                lines.append(f"| approach 3: warning | {' and '.join(a3['at_bound'])} ended on its bound "
                             f"{list(scaling.EXPONENT_BOUNDS)}: the runs do not determine it |")
        if "error" in a2:
            lines.append(f"| approach 2 | not fitted: {a2['error']} |")
        else:
            ci = a2.get("ci", {})
            lines += [f"| approach 2: N* ∝ C^a, a | {_fmt(a2['a'], ci.get('a'))} |",
                      f"| approach 2: D* ∝ C^b, b | {_fmt(a2['b'], ci.get('b'))} |"]
            outside = [c for c, inside in zip(a2["budgets"], a2["vertex_inside_sampled_sizes"]) if not inside]
            if outside:  # an extrapolated vertex: the sweep did not bracket the optimum there
                lines.append(f"| approach 2: warning | IsoFLOP minimum outside the sizes trained at C = "
                             f"{', '.join(f'{c:.3g}' for c in outside)}: add sizes on that side |")
        lines += ["", "| budget C | N* (approach 2) | D* (approach 2) | N_opt (approach 3) | D_opt (approach 3) | D/N (approach 3) |",
                  "|---|---|---|---|---|---|"]
        for j, c in enumerate(fit["budgets"]):
            cells = []
            for part, keys in ((a2, ("N_star_at", "D_star_at")), (a3, ("N_opt", "D_opt", "tokens_per_param"))):
                for k in keys:
                    name = k.replace("_at", "")
                    cells.append("—" if "error" in part else _fmt(part[k][j], (part.get("ci", {}).get(name) or [None] * (j + 1))[j]))
            lines.append(f"| {c:.3g} | " + " | ".join(cells) + " |")
        h = fit["heldout"]
        lines.append("")
        if "error" in h:
            lines.append(f"Held-out check: not run: {h['error']}")
        else:
            lines.append(f"Held-out check (fit without C = {h['held_out_budget']:.3g}, {h['n_held_out']} runs): approach 3 "
                         f"mean |relative error| of the loss {100 * h['approach3']['mean_abs_rel_error']:.2f}%, "
                         f"max {100 * h['approach3']['max_abs_rel_error']:.2f}%"
                         + (f"; approach 2 N* off by {100 * h['approach2']['rel_error_N_star']:+.1f}%"
                            if "rel_error_N_star" in h.get("approach2", {}) else "") + ".")
        f = fit["frontier"]
        lines += ["", "Loss frontier: " + (f"not fitted: {f['error']}" if "error" in f else
                                           f"L(C) = {f['E']:.4g} + {f['k']:.4g}·C^−{f['gamma']:.4g} (on {f['points']})"), ""]
    if result["multiplier"]:
        lines += ["## Compute multiplier", "", f"C_{result['baseline']} / C_arch needed for equal loss (> 1: the "
                  "architecture needs less compute than the baseline).", "", "| architecture | target loss | multiplier [95% CI] |",
                  "|---|---|---|"]
        for arch, m in result["multiplier"].items():
            lines.append(f"| {arch} | " + (f"— | {m['error']} |" if "error" in m else
                                           f"{m['target_loss']:.4g} | {_fmt(m['value'], m.get('ci'))} |"))
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    lines += ["", "Caveat: B and β (the data term) are weakly identified by approach 3 on IsoFLOP designs; "
              "trust α, E and the approach-2 exponents more, and read allocations far beyond the sweep with the CIs.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from effax.eval.fits import plots as scaling_plots

    out = args.out or os.path.join(args.root, "fit")
    try:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    except ValueError:
        print(f"effax fit: --budgets must be comma-separated numbers, got {args.budgets!r}", file=sys.stderr)
        return 2
    try:
        runs = scaling.load_runs(args.root)
        result = fit_all(runs, bootstrap=args.bootstrap, baseline=args.baseline, budgets=budgets,
                                 target_loss=args.target_loss, seed=args.seed, tol=args.budget_tol)
    except scaling.ScalingError as err:
        print(f"effax fit: {err}", file=sys.stderr)
        return 2
    failed = [f"{arch}: {name}: {fit[name]['error']}" for arch, fit in result["archs"].items()
              for name in ("approach2", "approach3") if "error" in fit[name]]
    for line in failed:
        print(f"effax fit: warning: {line}", file=sys.stderr)
    if len(failed) == 2 * len(result["archs"]):
        print("effax fit: no fit was possible; see the reasons above", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(to_json_ready(result), f, indent=2)
        f.write("\n")
    plots = scaling_plots.write_all(result, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(result, plots))
    print(f"effax fit: {result['inputs']['finished']} runs, {len(result['archs'])} architecture(s) → "
          f"{out}/fit.json, report.md, {', '.join(plots)}")
    return 0
