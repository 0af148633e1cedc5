"""report.md, the readable view of a fit (fit.json is authoritative): inputs, a table per architecture,
held-out errors, compute multipliers and the plots."""

from __future__ import annotations

from effax.eval.fits import scaling


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
             "N: active non-embedding parameters; C: training FLOPs from each model's own FLOPs per token. "
             "Warnings say where a number is not to be trusted (docs/scaling.md, \"When a fit is not trustworthy\").", ""]
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
            lines += [f"| approach 3: warning | {w} |" for w in a3.get("warnings", [])]
        if "error" in a2:
            lines.append(f"| approach 2 | not fitted: {a2['error']} |")
        else:
            ci = a2.get("ci", {})
            lines += [f"| approach 2: N* ∝ C^a, a | {_fmt(a2['a'], ci.get('a'))} |",
                      f"| approach 2: D* ∝ C^b, b | {_fmt(a2['b'], ci.get('b'))} |"]
            lines += [f"| approach 2: warning | {w} |" for w in a2.get("warnings", [])]
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
                                           f"L(C) = {f['E']:.4g} + {f['k']:.4g}·C^−{f['gamma']:.4g} (on {f['points']})")]
        lines += [f"Loss frontier warning: {w}" for w in f.get("warnings", [])] + [""]
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
