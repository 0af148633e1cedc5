"""PNG views of a scaling fit (fit.json is authoritative): loss vs compute with the fitted frontiers, IsoFLOP
curves with their minima, N*(C) and D*(C) with CI bands, and approach-3 residuals. Agg backend: no display."""

from __future__ import annotations

import os

import numpy as np

from effax.eval.fits import scaling


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _law(fit: dict) -> scaling.Law | None:
    a3 = fit.get("approach3", {})
    return None if "error" in a3 else scaling.Law(a3["E"], a3["A"], a3["B"], a3["alpha"], a3["beta"])


def loss_vs_compute(result: dict, runs: dict[str, list[scaling.Run]], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    for color, (arch, fit) in zip(plt.cm.tab10.colors, result["archs"].items()):
        _, _, C, L = scaling.arrays(runs[arch])
        ax.scatter(C, L, s=12, alpha=0.6, color=color, label=f"{arch} runs")
        grid = np.geomspace(C.min() / 2, C.max() * 4, 200)
        if "_frontier" in fit:
            f = fit["_frontier"]
            ax.plot(grid, f(grid), color=color, label=f"{arch}: {f.E:.3g} + {f.k:.3g}·C^-{f.gamma:.3f}")
        law = _law(fit)
        if law is not None:
            ax.plot(grid, law(*law.optimal(grid, fit["kappa"])), color=color, ls="--", lw=1,
                    label=f"{arch}: approach 3 at N_opt(C)")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="final validation loss", title="Loss vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def isoflops(result: dict, runs: dict[str, list[scaling.Run]], path: str) -> None:
    plt = _plt()
    archs = list(result["archs"])
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        a2 = result["archs"][arch].get("approach2", {})
        N, _, _, L = scaling.arrays(runs[arch])
        groups = scaling.group_budgets(runs[arch], result["inputs"]["budget_tol"])
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
        for color, (budget, idx) in zip(colors, groups):
            ax.scatter(N[idx], L[idx], s=12, color=color)
        for j, budget in enumerate(a2.get("budgets", [])):
            color = colors[[i for i, (b, _) in enumerate(groups) if b == budget][0]]
            par, idx = a2["parabolas"][j], groups[[b for b, _ in groups].index(budget)][1]
            x = np.linspace(np.log(N[idx]).min(), np.log(N[idx]).max(), 100) - par["log_N_centre"]
            ax.plot(np.exp(x + par["log_N_centre"]), np.polyval(par["coef"][::-1], x), color=color, lw=1,
                    label=f"C={budget:.2g}")
            ax.scatter([a2["N_star"][j]], [a2["L_star"][j]], marker="*", s=90, color=color, edgecolor="k", zorder=3)
        ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final validation loss",
               title=f"IsoFLOP curves: {arch}" + (" (no approach-2 fit)" if "error" in a2 else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def allocation(result: dict, path: str) -> None:
    """N*(C) and D*(C): approach-2 minima and power law (CI band from its bootstrap), approach-3 curve (band)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, (arch, fit) in zip(plt.cm.tab10.colors, result["archs"].items()):
        budgets = np.array(fit["budgets"])
        a2, a3 = fit.get("approach2", {}), fit.get("approach3", {})
        for ax, key2, key3 in ((axes[0], "N_star", "N_opt"), (axes[1], "D_star", "D_opt")):
            if "error" not in a2:
                ax.scatter(a2["budgets"], a2[key2], color=color, s=20, label=f"{arch}: IsoFLOP minima")
                ax.plot(budgets, a2[key2 + "_at"], color=color, label=f"{arch}: approach 2")
                band = a2.get("ci", {}).get(key2)
                if band and all(band):
                    ax.fill_between(budgets, *np.array(band).T, color=color, alpha=0.15)
            if "error" not in a3:
                ax.plot(budgets, a3[key3], color=color, ls="--", label=f"{arch}: approach 3")
                band = a3.get("ci", {}).get(key3)
                if band and all(band):
                    ax.fill_between(budgets, *np.array(band).T, color=color, alpha=0.08, hatch="//")
            ax.set(xscale="log", yscale="log", xlabel="training FLOPs C")
    axes[0].set(ylabel="compute-optimal parameters N*", title="N*(C) (bands: 95% bootstrap)")
    axes[1].set(ylabel="compute-optimal tokens D*", title="D*(C) (bands: 95% bootstrap)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def residuals(result: dict, runs: dict[str, list[scaling.Run]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for color, (arch, fit) in zip(plt.cm.tab10.colors, result["archs"].items()):
        if "error" in fit.get("approach3", {}):
            continue
        N, _, C, _ = scaling.arrays(runs[arch])
        r = 100 * np.expm1(np.array(fit["approach3"]["residuals_log"]))
        axes[0].scatter(C, r, s=12, color=color, label=arch)
        axes[1].scatter(N, r, s=12, color=color, label=arch)
    for ax, xlabel in zip(axes, ("training FLOPs C", "non-embedding parameters N")):
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=xlabel, ylabel="approach 3: predicted / observed − 1 (%)")
        ax.legend(fontsize=7)
    fig.suptitle("Approach-3 residuals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(result: dict, out_dir: str) -> list[str]:
    """Writes the four PNGs of a `fit.fit_all` result into out_dir; returns their file names."""
    runs = {arch: fit["_runs"] for arch, fit in result["archs"].items()}
    names = ["loss_vs_compute.png", "isoflops.png", "allocation.png", "residuals.png"]
    loss_vs_compute(result, runs, os.path.join(out_dir, names[0]))
    isoflops(result, runs, os.path.join(out_dir, names[1]))
    allocation(result, os.path.join(out_dir, names[2]))
    residuals(result, runs, os.path.join(out_dir, names[3]))
    return names
