"""Scaling-law fits over a sweep root: Chinchilla approaches 2 and 3, bootstrap CIs, a held-out check and
the compute multiplier between architectures. fit.py runs them per architecture; plots.py and report.py
draw the result; cli.py is `effax fit`.

Conventions. N = active non-embedding parameters (docs/scaling.md), D = training tokens, C = training
FLOPs from the model's own `flops_per_token(seq_len)` (not 6N), L = final validation loss (nats/token).
Fits work in natural logs.

    runs = [r for r in load_runs("runs/sweep") if r.finished]   # one Run per workdir below the root
    law = approach3(*arrays(runs)[:2], arrays(runs)[3])         # L(N, D) = E + A/N^α + B/D^β
    fit2 = approach2(runs)                                       # N* = k_N C^a, D* = k_D C^b
    # fit.py's fit_all(runs) runs everything per architecture, with CIs (what fit.json holds)

Approach 2 (IsoFLOP): runs are grouped by compute budget, a parabola of L over log N is fitted per budget,
its vertex gives N*(C); D*(C) = C / f(N*), with f the budget's FLOPs per token interpolated log-log over its
runs (so D* is consistent with how the runs themselves convert tokens to FLOPs). Then N* = k_N C^a and
D* = k_D C^b by least squares in log space.

Approach 3: L(N, D) = E + A/N^α + B/D^β, fitted as log L = LSE(a − α log N, b − β log D, e) with a Huber
loss (δ = 1e-3, Chinchilla's) by L-BFGS-B from the best of Chinchilla's grid of starts, with α, β in
EXPONENT_BOUNDS (the report flags a fit that ends on a bound). Compute-optimal allocation under C = κ N D, with κ the arch's
median C/(N D) over its runs (6 for a pure 6N count; larger with attention and the LM head):
N_opt = G (C/κ)^(β/(α+β)), G = (αA / (βB))^(1/(α+β)), D_opt = C / (κ N_opt).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import numpy as np
from scipy import optimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3
# Without budget labels, runs are grouped by C: a group spans at most a factor (1 + tol)² from its cheapest
# run, i.e. ±tol around its geometric centre (+21% above the cheapest at 0.10). See group_budgets.
BUDGET_TOL = 0.10
# |corr(log N, log D)| above this and approach 3 cannot separate α from β: the variance of each exponent
# is inflated by 1 / (1 − r²) ≥ 100 (standard errors ≥ 10×) over an uncorrelated design. One budget
# (log D = const − log N) or one tokens-per-parameter ratio (log D = const + log N) gives |r| = 1.
COLLINEAR_CORR = 0.995
# Chinchilla's grid of starts (Hoffmann et al. 2022, App. D.2): 4500 points. The objective is evaluated on all
# of them at once (cheap, vectorised); L-BFGS then runs only from the best few, which all landed in the same
# basin on our test laws (checked over 20 noisy seeds), at a fraction of the cost of 4500 runs.
GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5), "e": np.arange(-1, 1.01, 0.5),
        "a": np.arange(0, 25.1, 5), "b": np.arange(0, 25.1, 5)}
N_STARTS = 4
# α and β are kept in Chinchilla's grid range (plus a floor that keeps each term from merging into E). With few
# runs per shape an unbounded fit can run an exponent off to infinity, where A/N^α is a step and the allocation
# N_opt ∝ C^(β/(α+β)) is meaningless: the first CPU mini-sweep did that (α = 3315 on 9 runs). A fit that
# ends on a bound is reported as such (`at_bound`), not hidden.
EXPONENT_BOUNDS = (0.05, 2.0)
# The same box on theta = (a, b, e, α, β) for L-BFGS-B and the LM refits: only the exponents are bounded.
_THETA_LO = np.array([-np.inf] * 3 + [EXPONENT_BOUNDS[0]] * 2)
_THETA_HI = np.array([np.inf] * 3 + [EXPONENT_BOUNDS[1]] * 2)


class ScalingError(ValueError):
    """Not enough data for a fit, or bad data; the message says what is needed or which run is bad."""


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: str
    arch: str
    N: float  # non-embedding parameters
    D: float  # training tokens
    C: float  # training FLOPs
    loss: float  # final validation loss (nan if none was logged)
    finished: bool
    budget: float | None = None  # the sweep's budget label, if it wrote one


# ---------------------------------------------------------------------------------------------------
# Loading a sweep root


def _eval_loss(workdir: str) -> tuple[int, float] | None:
    """The newest eval/step_<N>.loss.json written by `effax eval`, as (step, loss)."""
    best = None
    for path in glob.glob(os.path.join(workdir, "eval", "step_*.loss.json")):
        m = re.fullmatch(r"step_(\d+)\.loss\.json", os.path.basename(path))
        if not m:
            continue
        try:
            with open(path) as f:
                loss = float(json.load(f)["figures"]["loss"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), loss)
    return best


def load_run(workdir: str) -> Run:
    from effax.train import config as config_lib
    from effax.train import metrics as metrics_lib

    run_id = os.path.basename(os.path.normpath(workdir))
    try:
        cfg = config_lib.from_json(os.path.join(workdir, "config.json"))
        meta = {}
        if os.path.exists(os.path.join(workdir, "sweep.json")):
            with open(os.path.join(workdir, "sweep.json")) as f:
                meta = json.load(f)
        rows = metrics_lib.read(workdir)
    except (ValueError, TypeError, KeyError) as e:  # unreadable JSON, an unknown model type, a corrupt line
        raise ScalingError(f"run {run_id}: cannot read its files: {e}") from None
    for key in ("N", "D", "C", "budget"):
        if meta.get(key) is not None and not isinstance(meta[key], (int, float)):
            raise ScalingError(f"run {run_id}: sweep.json field {key!r} is {meta[key]!r}, not a number")
    last_step = max((r.get("step", 0) for r in rows), default=0)
    val = [r for r in rows if r.get("split") == "val" and "loss" in r]
    loss, loss_step = (float(val[-1]["loss"]), val[-1]["step"]) if val else (float("nan"), -1)
    evaluated = _eval_loss(workdir)
    if evaluated and evaluated[0] >= loss_step:  # the eval job's figure is on more data than the in-loop one
        loss_step, loss = evaluated
    steps, seq_len = cfg.train.steps, cfg.data.seq_len
    D = float(meta.get("D", steps * cfg.train.batch_size * seq_len))
    N = float(meta.get("N", cfg.model.param_count(non_embedding=True, active=True)))
    C = float(meta.get("C", cfg.model.flops_per_token(seq_len) * D))
    finished = bool(meta.get("finished", max(last_step, loss_step) >= steps)) and np.isfinite(loss)
    arch = str(meta.get("arch") or cfg.name or cfg.model.type)
    budget = meta.get("budget")
    return Run(run_id, arch, N, D, C, loss, finished, None if budget is None else float(budget))


def load_runs(root: str) -> list[Run]:
    """One Run per `ROOT/<run_id>/config.json` (unfinished ones too; `finished` tells them apart)."""
    if not os.path.isdir(root):
        raise ScalingError(f"sweep root {root!r} is not a directory")
    dirs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "config.json")))
    return [load_run(d) for d in dirs]


def arrays(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array([getattr(r, k) for r in runs], dtype=float) for k in ("N", "D", "C", "loss"))


def check_runs(runs: list[Run]) -> None:
    """Every figure a fit uses must be a positive finite number: raises ScalingError naming the run and
    field otherwise (a loss of 0 or a negative N is a broken file, not data)."""
    for r in runs:
        for key in ("N", "D", "C", "loss"):
            v = getattr(r, key)
            if not (isinstance(v, (int, float, np.floating)) and np.isfinite(v) and v > 0):
                raise ScalingError(f"run {r.run_id}: {key} = {float(v)} is not a positive finite number")
        if r.budget is not None and not (np.isfinite(r.budget) and r.budget > 0):
            raise ScalingError(f"run {r.run_id}: budget = {r.budget!r} is not a positive finite number")


def check_arrays(where: str, weights=None, **named) -> list[np.ndarray]:
    """The API's arrays (N=..., D=..., L=...): one dimension, equal lengths, positive and finite; weights
    (optional) finite, ≥ 0 and not all 0. Raises ScalingError naming the array and index."""
    arrs = [np.asarray(v, float) for v in named.values()]
    lengths = {k: a.shape for k, a in zip(named, arrs)}
    if any(a.ndim != 1 for a in arrs) or len({a.shape for a in arrs}) != 1:
        raise ScalingError(f"{where}: {', '.join(named)} must be 1-D arrays of one length; got shapes {lengths}")
    for k, a in zip(named, arrs):
        bad = np.flatnonzero(~(np.isfinite(a) & (a > 0)))
        if len(bad):
            raise ScalingError(f"{where}: {k}[{bad[0]}] = {float(a[bad[0]])} is not a positive finite number")
    if weights is not None:
        w = np.asarray(weights, float)
        if w.shape != arrs[0].shape or not np.all(np.isfinite(w) & (w >= 0)) or not w.sum() > 0:
            raise ScalingError(f"{where}: weights must be finite, ≥ 0, not all 0, one per run; got {w!r}")
        arrs.append(w)
    return arrs


# ---------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas


def group_budgets(runs: list[Run], tol: float = BUDGET_TOL) -> list[tuple[float, list[int]]]:
    """[(budget C, indices into runs)], by the sweep's label if every run has one, else by C: sorted by C,
    a run joins the current group while its C is within (1 + tol)² of the group's cheapest run (±tol
    around the group's geometric centre, which is the budget reported)."""
    if runs and all(r.budget is not None for r in runs):
        labels = sorted({r.budget for r in runs})
        return [(b, [i for i, r in enumerate(runs) if r.budget == b]) for b in labels]
    order = sorted(range(len(runs)), key=lambda i: runs[i].C)
    groups: list[list[int]] = []
    for i in order:
        if groups and runs[i].C <= runs[groups[-1][0]].C * (1 + tol) ** 2:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [(float(np.exp(np.mean([np.log(runs[i].C) for i in g]))), g) for g in groups]


def _vertices(x: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares parabolas y ≈ c0 + c1 x + c2 x² for every row of Y (R, n) at once (x centred by the
    caller): coefficients (R, 3) and the vertices (x*, y*), nan where a parabola is not convex."""
    c = Y @ np.linalg.pinv(np.stack([np.ones_like(x), x, x * x], 1)).T
    with np.errstate(invalid="ignore", divide="ignore"):
        xs = np.where(c[:, 2] > 0, -c[:, 1] / (2 * c[:, 2]), np.nan)
    return c, xs, c[:, 0] + c[:, 1] * xs + c[:, 2] * xs * xs


def isoflop_minima(runs: list[Run], losses: np.ndarray | None = None, tol: float = BUDGET_TOL) -> dict:
    """Per budget with ≥3 distinct sizes and a convex parabola through the observed losses: the IsoFLOP
    vertex. `losses` (R, len(runs)) gives R refits at once, over the same budgets as the observed fit (a
    replicate's vertex outside the sizes trained is nan: that replicate has no minimum for that budget)."""
    N, D, C, L = arrays(runs)
    Y = L[None] if losses is None else losses
    out = {"C": [], "N": [], "D": [], "L": [], "coef": [], "x0": [], "inside": [], "skipped": []}
    for budget, idx in group_budgets(runs, tol):
        if len(np.unique(N[idx])) < 3:
            out["skipped"].append(f"C={budget:.3g}: {len(np.unique(N[idx]))} model size(s), a parabola needs ≥3")
            continue
        x = np.log(N[idx])
        x0 = x.mean()
        if not np.isfinite(_vertices(x - x0, L[idx][None])[1][0]):
            out["skipped"].append(f"C={budget:.3g}: the IsoFLOP parabola is not convex (no minimum)")
            continue
        c, xs, ys = _vertices(x - x0, Y[:, idx])
        if losses is not None:  # a replicate's vertex outside the sizes trained is no supported minimum: drop it
            xs, ys = (np.where((xs + x0 >= x.min()) & (xs + x0 <= x.max()), v, np.nan) for v in (xs, ys))
        # FLOPs per token at N*: log f is close to linear in log N within a budget (6N plus attention terms)
        slope, icpt = np.polyfit(x, np.log(C[idx] / D[idx]), 1)
        with np.errstate(over="ignore"):
            out["N"].append(np.exp(xs + x0))
            out["D"].append(budget / np.exp(icpt + slope * (xs + x0)))
        out["C"].append(budget)
        out["L"].append(ys)
        out["inside"].append(bool(x.min() <= xs[0] + x0 <= x.max()) if losses is None else None)
        out["coef"].append(c[0] if losses is None else None)  # of the parabola in (log N − x0)
        out["x0"].append(x0)
    return out


def residual_replicates(runs: list[Run], n: int, rng: np.random.Generator, tol: float = BUDGET_TOL) -> np.ndarray:
    """(n, len(runs)) bootstrap losses: each budget's parabola fit plus its residuals resampled. The design
    (which sizes were trained) stays fixed; resampling whole runs instead leaves some replicates with 3
    clustered sizes whose vertex lands far outside the data, which made the CIs several times too wide."""
    N, _, _, L = arrays(runs)
    Y = np.repeat(L[None], n, 0)
    for _, idx in group_budgets(runs, tol):
        if len(np.unique(N[idx])) < 4:
            continue  # no residual degrees of freedom: left as observed
        x = np.log(N[idx]) - np.log(N[idx]).mean()
        fit = _vertices(x, L[idx][None])[0][0] @ np.stack([np.ones_like(x), x, x * x])
        res = (L[idx] - fit) * np.sqrt(len(idx) / (len(idx) - 3))  # undo the deflation of fitted residuals
        Y[:, idx] = fit + res[rng.integers(0, len(idx), (n, len(idx)))]
    return Y


def _loglog_lines(x: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares lines log Y = log k + a log x for each row of Y (R, m), each over its own finite
    positive entries (a bootstrap replicate may lack a budget's minimum); rows with < 2 of them give nan."""
    M = np.isfinite(Y) & (Y > 0)
    n = M.sum(1)
    lx = np.broadcast_to(np.log(x), Y.shape)
    lY = np.log(np.where(M, Y, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.where(M, lx, 0).sum(1) / n
        ym = np.where(M, lY, 0).sum(1) / n
        dx = np.where(M, lx - xm[:, None], 0)
        a = (dx * np.where(M, lY - ym[:, None], 0)).sum(1) / (dx * dx).sum(1)
    a = np.where(n >= 2, a, np.nan)
    return np.exp(ym - a * xm), a


def isoflop_warnings(runs: list[Run], tol: float = BUDGET_TOL) -> list[str]:
    """Why the runs may not form IsoFLOP groups: budgets made up by the tolerance, budgets that overlap,
    budgets with too few sizes. Approach 2 and the frontier read them as if each group shared one C."""
    groups = group_budgets(runs, tol)
    C = np.array([r.C for r in runs])
    N = np.array([r.N for r in runs])
    out = []
    if runs and not all(r.budget is not None for r in runs):
        spread = max(C[idx].max() / C[idx].min() - 1 for _, idx in groups)
        out.append(f"the runs carry no budget labels (sweep.json): they were grouped into {len(groups)} budgets by C "
                   f"with --budget-tol={tol} (a group spans up to ×{(1 + tol) ** 2:.3g}; the widest here spans "
                   f"+{100 * spread:.0f}%); on compute spread continuously the answer moves with the tolerance")
    ranges = [(C[idx].min(), C[idx].max(), b) for b, idx in groups]
    for (lo1, hi1, b1), (lo2, hi2, b2) in zip(ranges, ranges[1:]):
        if lo2 <= hi1:
            out.append(f"budgets C={b1:.3g} and C={b2:.3g} overlap (their runs' C ranges meet at {lo2:.3g})")
    few = [f"{b:.3g}" for b, idx in groups if len(np.unique(N[idx])) < 3]
    if few:
        out.append(f"budget(s) C={', '.join(few)} have fewer than 3 model sizes: no IsoFLOP parabola there")
    return out


def approach2(runs: list[Run], tol: float = BUDGET_TOL) -> dict:
    """IsoFLOP minima per budget and the power laws N* = k_N C^a, D* = k_D C^b."""
    check_runs(runs)
    m = isoflop_minima(runs, tol=tol)
    if len(m["C"]) < 2:
        raise ScalingError(f"approach 2 needs ≥2 compute budgets with ≥3 model sizes each and a convex IsoFLOP "
                           f"curve; got {len(m['C'])} usable ({'; '.join(m['skipped']) or 'no runs'})")
    C = np.array(m["C"])
    Ns, Ds, Ls = (np.array([v[0] for v in m[k]]) for k in ("N", "D", "L"))
    kN, a = _loglog_lines(C, Ns[None])
    kD, b = _loglog_lines(C, Ds[None])
    groups = [{"C": b, "runs": len(idx), "C_range": [min(runs[i].C for i in idx), max(runs[i].C for i in idx)],
               "sizes": len({runs[i].N for i in idx})} for b, idx in group_budgets(runs, tol)]
    warnings = isoflop_warnings(runs, tol)
    warnings += [f"IsoFLOP minimum outside the sizes trained at C={c:.3g}: add sizes on that side"
                 for c, inside in zip(C, m["inside"]) if not inside]
    return {"budgets": C.tolist(), "N_star": Ns.tolist(), "D_star": Ds.tolist(), "L_star": Ls.tolist(),
            "vertex_inside_sampled_sizes": m["inside"], "budget_groups": groups, "warnings": warnings,
            "parabolas": [{"coef": c.tolist(), "log_N_centre": x0} for c, x0 in zip(m["coef"], m["x0"])],
            "a": float(a[0]), "k_N": float(kN[0]), "b": float(b[0]), "k_D": float(kD[0]), "skipped": m["skipped"]}


def bootstrap_approach2(runs: list[Run], n: int, rng: np.random.Generator, tol: float = BUDGET_TOL) -> dict:
    """Residual bootstrap of the IsoFLOP parabolas, then the power laws; all replicates at once. A replicate
    whose vertex leaves the sampled sizes at some budget is fitted on its other budgets; it fails only when
    fewer than 2 remain (`failed`, with `why`)."""
    m = isoflop_minima(runs, residual_replicates(runs, n, rng, tol), tol)
    C, Ns, Ds = np.array(m["C"]), np.stack(m["N"], 1), np.stack(m["D"], 1)
    kN, a = _loglog_lines(C, Ns)
    kD, b = _loglog_lines(C, Ds)
    ok = np.isfinite(a) & np.isfinite(b)
    partial = int((ok & ~np.all(np.isfinite(Ns), axis=1)).sum())
    return {"a": a[ok], "k_N": kN[ok], "b": b[ok], "k_D": kD[ok], "failed": int((~ok).sum()), "partial": partial,
            "why": "fewer than 2 budgets with an IsoFLOP minimum inside the sampled sizes" if (~ok).any() else ""}


# ---------------------------------------------------------------------------------------------------
# Approach 3: the parametric loss


@dataclasses.dataclass(frozen=True)
class Law:
    """L(N, D) = E + A/N^α + B/D^β."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def optimal(self, C, kappa: float = 6.0):
        """Compute-optimal (N_opt, D_opt) at budget C when C = κ N D."""
        al, be = self.alpha, self.beta
        G = (al * self.A / (be * self.B)) ** (1 / (al + be))
        n = G * np.power(np.asarray(C, float) / kappa, be / (al + be))
        return n, np.asarray(C, float) / (kappa * n)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _huber_objective(theta, x, y, logL, w, delta):
    """Σ w_i Huber_δ(LSE(a − α x_i, b − β y_i, e) − log L_i) and its gradient; theta = (a, b, e, α, β).
    Written out by hand (no stack / scipy logsumexp): L-BFGS calls it ~100 times per fit, bootstrap 1000 fits."""
    a, b, e, al, be = theta
    t1, t2 = a - al * x, b - be * y
    m = np.maximum(np.maximum(t1, t2), e)
    s1, s2, s3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    total = s1 + s2 + s3
    r = m + np.log(total) - logL
    rc = np.clip(r, -delta, delta)
    f = rc * (r - 0.5 * rc)  # Huber: r²/2 inside ±δ, δ(|r| − δ/2) outside
    psi = w * rc / total  # dHuber/dr times the softmax normaliser
    g1, g2 = psi @ s1, psi @ s2
    grad = np.array([g1, g2, psi @ s3, -(psi * s1) @ x, -(psi * s2) @ y])
    # scaled by 1/δ² so the objective is O(n) and L-BFGS's tolerances (absolute below 1) stay meaningful
    return float(w @ f) / delta**2, grad / delta**2


def _grid_starts(x, y, logL, w, k: int, delta: float) -> np.ndarray:
    g = np.stack(np.meshgrid(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"], indexing="ij"), -1)
    g = g.reshape(-1, 5)
    T = np.stack([g[:, :1] - g[:, 3:4] * x, g[:, 1:2] - g[:, 4:5] * y, np.broadcast_to(g[:, 2:3], (len(g), len(x)))])
    r = np.abs(logsumexp(T, axis=0) - logL)
    f = np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)) @ w
    return g[np.argsort(f)[:k]]


def _lbfgs(theta0, x, y, logL, w, delta):
    res = optimize.minimize(_huber_objective, np.clip(theta0, _THETA_LO, _THETA_HI), args=(x, y, logL, w, delta),
                            jac=True, method="L-BFGS-B", bounds=optimize.Bounds(_THETA_LO, _THETA_HI),
                            options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-9})
    return res.x, res.fun


def approach3(N, D, L, *, weights=None, starts=None, delta: float = HUBER_DELTA) -> Law:
    """Huber fit of L = E + A/N^α + B/D^β in log space, by L-BFGS-B from the best grid starts (or `starts`)."""
    N, D, L, *w = check_arrays("approach 3", weights, N=N, D=D, L=L)
    if len(L) < 5:
        raise ScalingError(f"approach 3 needs ≥5 finished runs (5 parameters: E, A, B, α, β); got {len(L)}")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ScalingError("approach 3 needs runs at ≥2 model sizes and ≥2 token counts")
    x, y, logL = np.log(N), np.log(D), np.log(L)
    w = w[0] if w else np.ones_like(x)
    starts = _grid_starts(x, y, logL, w, N_STARTS, delta) if starts is None else np.atleast_2d(starts)
    # The starts are first moved jointly by the vectorised LM below (numpy only), so each L-BFGS-B run needs a
    # few iterations instead of ~100: scipy's L-BFGS-B calls BLAS on 5-vectors, which costs ~3 ms an
    # iteration when OpenBLAS threads contend on a busy machine.
    starts = _huber_lm(starts, x, y, logL, np.broadcast_to(w, (len(starts), len(w))), delta, iters=50)
    best = min((_lbfgs(s, x, y, logL, w, delta) for s in starts), key=lambda t: t[1])[0]
    a, b, e, al, be = best
    return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(al), beta=float(be))


def _on_bound(value: float, rtol: float = 1e-6) -> bool:
    return any(abs(value - b) <= rtol * max(1.0, abs(b)) for b in EXPONENT_BOUNDS)


def at_bound(law: Law, rtol: float = 1e-6) -> list[str]:
    """The exponents a fit left on EXPONENT_BOUNDS: the data did not pin them down."""
    return [name for name in ("alpha", "beta") if _on_bound(getattr(law, name), rtol)]


def identification_warnings(N, D, law: Law | None = None, ci: dict | None = None) -> list[str]:
    """Why approach 3's exponents may be unidentified: a design whose log N and log D are (nearly)
    collinear, an exponent on its bound, a bootstrap interval that reaches a bound."""
    x, y = np.log(np.asarray(N, float)), np.log(np.asarray(D, float))
    out = []
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        r = 1.0
    else:
        r = float(abs(np.corrcoef(x, y)[0, 1]))
    if r >= COLLINEAR_CORR:
        out.append(f"log N and log D are collinear (|corr| = {r:.4f} ≥ {COLLINEAR_CORR}): one budget or one "
                   f"tokens-per-parameter ratio cannot separate α from β; add runs at other budgets or sizes")
    if law is not None:
        out += [f"{k} ended on its bound {list(EXPONENT_BOUNDS)}: the runs do not determine it" for k in at_bound(law)]
    for k, interval in (ci or {}).items():
        if k in ("alpha", "beta") and interval and any(_on_bound(v) for v in interval):
            out.append(f"the bootstrap interval of {k} {[round(v, 4) for v in interval]} reaches the bound "
                       f"{list(EXPONENT_BOUNDS)}: resamples of these runs do not determine it")
    return out


def _theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def _huber_lm(theta, x, y, logL, W, delta, iters: int = 200):
    """The same Huber fit for R weightings at once (theta (R, 5), W (R, n)): Levenberg–Marquardt on the
    half-quadratic (IRLS) majoriser of the Huber loss, a step kept only where it lowers the Huber objective.
    Vectorised over R, so 1000 bootstrap refits cost about as much as a few L-BFGS fits."""
    X = np.stack([np.ones_like(x), np.zeros_like(x), np.zeros_like(x), -x, np.zeros_like(x)], 1)  # ∂t1/∂θ
    Y = np.stack([np.zeros_like(y), np.ones_like(y), np.zeros_like(y), np.zeros_like(y), -y], 1)  # ∂t2/∂θ
    Z = np.zeros((len(x), 5))
    Z[:, 2] = 1  # ∂t3/∂θ

    def resid(th):
        T = np.stack([th[:, :1] - th[:, 3:4] * x, th[:, 1:2] - th[:, 4:5] * y, np.repeat(th[:, 2:3], len(x), 1)])
        m = T.max(0)
        P = np.exp(T - m)
        tot = P.sum(0)
        r = m + np.log(tot) - logL
        rc = np.clip(r, -delta, delta)
        return r, P / tot, (W * rc * (r - 0.5 * rc)).sum(1)

    theta = np.clip(np.array(theta, float), _THETA_LO, _THETA_HI)
    lam = np.full(len(theta), 1e-3)
    r, P, f = resid(theta)
    for _ in range(iters):
        J = P[0][..., None] * X + P[1][..., None] * Y + P[2][..., None] * Z  # (R, n, 5)
        u = W * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        H = np.einsum("rni,rn,rnj->rij", J, u, J)
        g = np.einsum("rni,rn->ri", J, u * r)
        Hd = H + lam[:, None, None] * (np.eye(5) * np.diagonal(H, axis1=1, axis2=2)[:, None, :] + 1e-12 * np.eye(5))
        # pinv, not solve: a resample can leave a direction unidentified (e.g. every drawn run at one N),
        # and its Hessian is then singular; the minimal-norm step leaves that direction where it was.
        step = -(np.linalg.pinv(Hd) @ g[..., None])[..., 0]
        new = np.clip(theta + step, _THETA_LO, _THETA_HI)  # a projected step: the exponents stay in bounds
        step = new - theta
        r2, P2, f2 = resid(new)
        ok = f2 <= f
        theta[ok], r[ok], P[:, ok], f[ok] = new[ok], r2[ok], P2[:, ok], f2[ok]
        lam = np.where(ok, lam / 3, lam * 4)
        if np.all(np.abs(step).max(1) < 1e-9) or np.all(lam > 1e12):
            break
    return theta


def bootstrap_approach3(N, D, L, law: Law, n: int, rng: np.random.Generator,
                        delta: float = HUBER_DELTA) -> dict[str, np.ndarray]:
    """Refits on n resamples of the runs (as integer weights), each started from the full-data fit: the
    resampled optimum sits near it. `delta`: the Huber δ of that fit. Returns arrays of E, A, B, alpha, beta."""
    N, D, L = check_arrays("approach 3 bootstrap", N=N, D=D, L=L)
    x, y, logL = np.log(N), np.log(D), np.log(L)
    counts = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=n).astype(float)
    th = _huber_lm(np.repeat(_theta(law)[None], n, 0), x, y, logL, counts, delta)
    return {"E": np.exp(th[:, 2]), "A": np.exp(th[:, 0]), "B": np.exp(th[:, 1]), "alpha": th[:, 3], "beta": th[:, 4]}


def kappa(runs: list[Run]) -> float:
    """FLOPs per parameter per token, C / (N D): 6 for the 6N rule; the median over runs is robust to outliers."""
    N, D, C, _ = arrays(runs)
    return float(np.median(C / (N * D)))


# ---------------------------------------------------------------------------------------------------
# Held-out check, loss frontier and compute multiplier


def heldout(runs: list[Run], tol: float = BUDGET_TOL) -> dict:
    """Fits without the largest budget and predicts it: approach 3 on its runs' losses, approach 2 on N*."""
    groups = group_budgets(runs, tol)
    if len(groups) < 3:
        raise ScalingError(f"the held-out check needs ≥3 compute budgets (fit on ≥2, predict the largest); got {len(groups)}")
    top, top_idx = groups[-1]
    train = [r for i, r in enumerate(runs) if i not in set(top_idx)]
    test = [runs[i] for i in top_idx]
    out = {"held_out_budget": top, "n_fit": len(train), "n_held_out": len(test)}
    law = approach3(*arrays(train)[:2], arrays(train)[3])
    N, D, _, L = arrays(test)
    rel = law(N, D) / L - 1
    out["approach3"] = {"law": law.as_dict(), "mean_abs_rel_error": float(np.mean(np.abs(rel))),
                        "max_abs_rel_error": float(np.max(np.abs(rel)))}
    try:
        fit = approach2(train, tol)
        seen = isoflop_minima(test, tol=tol)
        if seen["C"]:
            n_pred = fit["k_N"] * top ** fit["a"]
            out["approach2"] = {"N_star_predicted": n_pred, "N_star_observed": float(seen["N"][0][0]),
                                "rel_error_N_star": float(n_pred / seen["N"][0][0] - 1)}
    except ScalingError as err:
        out["approach2"] = {"error": str(err)}
    return out


@dataclasses.dataclass(frozen=True)
class Frontier:
    """L(C) = E + k C^−γ: the compute-optimal loss (for the Chinchilla form this is exact, γ = αβ/(α+β))."""

    E: float
    k: float
    gamma: float

    def __call__(self, C):
        return self.E + self.k * np.power(np.asarray(C, float), -self.gamma)

    def compute_for(self, L):
        """The compute at which the frontier reaches loss L (inf where L ≤ E)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.asarray(L, float) - self.E
            return np.where(gap > 0, (self.k / np.where(gap > 0, gap, 1)) ** (1 / self.gamma), np.inf)


def frontier_points(runs: list[Run], tol: float = BUDGET_TOL) -> tuple[np.ndarray, np.ndarray, str]:
    """The IsoFLOP minima where ≥3 budgets have them, else the Pareto front (runs beating every cheaper one)."""
    m = isoflop_minima(runs, tol=tol)
    if len(m["C"]) >= 3:
        return np.array(m["C"]), np.array([v[0] for v in m["L"]]), "isoflop_minima"
    _, _, C, L = arrays(runs)
    order = np.argsort(C)
    keep = L[order] < np.minimum.accumulate(np.concatenate([[np.inf], L[order][:-1]]))
    return C[order][keep], L[order][keep], "pareto_front"


def fit_frontier(C, L, start: Frontier | None = None) -> Frontier:
    """Least squares on log L over (E, log k, γ), from several E starts below the best loss (or from `start`)."""
    C, L = check_arrays("the loss frontier", C=C, L=L)
    if len(np.unique(C)) < 3:  # points sharing one C (a single budget) leave log k and γ undetermined
        raise ScalingError(f"the loss-vs-compute frontier needs ≥3 points at distinct compute (IsoFLOP minima or "
                           f"Pareto-front runs); got {len(np.unique(C))} distinct C among {len(C)} points")
    lc = np.log(C) - np.log(C).mean()  # centred so log k and γ are not strongly correlated

    def resid(p):
        return np.log(p[0] + np.exp(p[1] - p[2] * lc)) - np.log(L)

    starts = []
    for frac in (0.0, 0.5, 0.8, 0.95) if start is None else ():
        e0 = frac * L.min()
        g0 = max(-np.polyfit(lc, np.log(np.maximum(L - e0, 1e-12)), 1)[0], 1e-3)
        starts.append([e0, np.log(np.mean(L - e0) + 1e-12), g0])
    if start is not None:
        starts.append([min(start.E, 0.999 * L.min()), np.log(start.k) - start.gamma * np.log(C).mean(), start.gamma])
    best = None
    for p0 in starts:
        res = optimize.least_squares(resid, p0, bounds=([0, -np.inf, 1e-4], [L.min() * (1 - 1e-9), np.inf, 5]))
        if best is None or res.cost < best.cost:
            best = res
    E, logk, g = best.x
    return Frontier(E=float(E), k=float(np.exp(logk + g * np.log(C).mean())), gamma=float(g))


def multiplier(base: Frontier, other: Frontier, target: float) -> float:
    """C_base / C_other at equal loss `target`: >1 means `other` needs less compute (inf: base cannot reach it)."""
    return float(base.compute_for(target) / other.compute_for(target))


def bootstrap_frontier(runs: list[Run], front: Frontier, n: int, rng: np.random.Generator,
                       tol: float = BUDGET_TOL) -> tuple[list[Frontier], int]:
    """Frontier refits on residual-bootstrap replicates of the IsoFLOP minima, each started from the full
    fit and each on the budgets where that replicate has a minimum: (the fits, how many replicates had
    fewer than 3 such budgets and were dropped)."""
    m = isoflop_minima(runs, residual_replicates(runs, n, rng, tol), tol)
    C, Ls = np.array(m["C"]), np.stack(m["L"], 1)
    fits = []
    for row in Ls:
        keep = np.isfinite(row) & (row > 0)
        if keep.sum() >= 3:
            fits.append(fit_frontier(C[keep], row[keep], start=front))
    return fits, len(Ls) - len(fits)


def percentile_ci(samples, level: float = 0.95) -> list[float] | None:
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        return None
    return np.percentile(s, [50 * (1 - level), 50 * (1 + level)]).tolist()
