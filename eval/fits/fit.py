"""Everything `effax fit` computes from a sweep's runs, per architecture, and the files it writes.

    result = fit_all(scaling.load_runs("runs/sweep"))   # what fit.json holds (plus objects for the plots)
    plots = write(result, "runs/sweep/fit")             # fit.json, the PNGs (plots.py), report.md (report.py)
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from effax.eval.fits import plots as plots_lib
from effax.eval.fits import report as report_lib
from effax.eval.fits import scaling


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
            a2["bootstrap_partial"] = bs["partial"]  # replicates fitted on fewer budgets than the main fit
            if bs["failed"]:
                a2["warnings"].append(_failed_replicates(bs["failed"], n_boot, bs["why"]))
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
        a3["warnings"] = scaling.identification_warnings(N, D, law)
        if n_boot:
            bs = scaling.bootstrap_approach3(N, D, L, law, n_boot, rng)
            a3["ci"] = _ci(bs, ("E", "A", "B", "alpha", "beta"))
            laws = [scaling.Law(*v) for v in zip(bs["E"], bs["A"], bs["B"], bs["alpha"], bs["beta"])]
            opt = np.array([lw.optimal(budgets, kap) for lw in laws])  # (R, 2, budgets)
            a3["ci"]["N_opt"] = [scaling.percentile_ci(opt[:, 0, j]) for j in range(len(budgets))]
            a3["ci"]["D_opt"] = [scaling.percentile_ci(opt[:, 1, j]) for j in range(len(budgets))]
            a3["ci"]["tokens_per_param"] = [scaling.percentile_ci(opt[:, 1, j] / opt[:, 0, j]) for j in range(len(budgets))]
            a3["ci"]["a"] = scaling.percentile_ci(bs["beta"] / (bs["alpha"] + bs["beta"]))
            a3["warnings"] = scaling.identification_warnings(N, D, law, a3["ci"])
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
        out["frontier"]["warnings"] = []
        if n_boot and how == "isoflop_minima":
            out["_frontier_boot"], failed = scaling.bootstrap_frontier(runs, front, n_boot, rng, tol)
            out["frontier"]["bootstrap_failed"] = failed
            if failed:
                out["frontier"]["warnings"].append(_failed_replicates(
                    failed, n_boot, "fewer than 3 budgets with an IsoFLOP minimum inside the sampled sizes"))
        out["_frontier"] = front
    except scaling.ScalingError as err:
        out["frontier"] = {"error": str(err)}
    return out


def _failed_replicates(failed: int, n: int, why: str) -> str:
    if failed == n:
        return f"all {n} bootstrap replicates failed ({why}): no interval"
    return f"{failed} of {n} bootstrap replicates failed ({why}); the interval uses the other {n - failed}"


def fit_all(runs: list[scaling.Run], *, bootstrap: int = 1000, baseline: str | None = None, budgets=None,
            target_loss: float | None = None, seed: int = 0, tol: float = scaling.BUDGET_TOL) -> dict:
    """Fits every architecture among the finished runs, and the compute multiplier of each against `baseline`
    (default: the architecture with the most finished runs) at `target_loss` (default: the baseline's best)."""
    done = [r for r in runs if r.finished]
    scaling.check_runs(done)  # bad figures stop here, naming the run, before any fitting
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


def errors(result: dict) -> list[str]:
    """One line per fit the data could not support: "ARCH: approachK: why"."""
    return [f"{arch}: {name}: {fit[name]['error']}" for arch, fit in result["archs"].items()
            for name in ("approach2", "approach3") if "error" in fit[name]]


def warnings(result: dict) -> list[str]:
    """One line per reason a fit that was made may not be trustworthy: "ARCH: part: why"."""
    return [f"{arch}: {name}: {w}" for arch, fit in result["archs"].items()
            for name in ("approach2", "approach3", "frontier") for w in fit[name].get("warnings", [])]


def fitted_any(result: dict) -> bool:
    """Whether approach 2 or 3 succeeded for some architecture (else there is nothing to write)."""
    return len(errors(result)) < 2 * len(result["archs"])


def write(result: dict, out: str) -> list[str]:
    """Writes fit.json, the plots and report.md into `out`; returns the plots' file names."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(to_json_ready(result), f, indent=2)
        f.write("\n")
    plots = plots_lib.write_all(result, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_lib.report(result, plots))
    return plots
