"""The fits off the happy path: bad inputs refused naming the run and field, failed or partial bootstraps
shown, unidentified laws and non-IsoFLOP designs warned about, single-budget sweeps handled (each test
here failed on the code before it)."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from effax.eval.fits import cli as fit_cli  # noqa: E402
from effax.eval.fits import fit as fit_lib  # noqa: E402
from effax.eval.fits import report as report_lib  # noqa: E402
from effax.eval.fits import scaling  # noqa: E402

from test_scaling import TRUE, _smoke, _write_run, sweep  # noqa: E402  (tests/eval/fits is on sys.path)


def _with_non_convex_budget(runs):
    """Adds a 3-size budget whose losses bend the wrong way (a maximum, not a minimum)."""
    C = 3e21
    extra = [scaling.Run(f"nc{i}", "base", n, C / (6 * n), C, loss, True)
             for i, (n, loss) in enumerate([(1e9, 2.0), (3e9, 2.3), (9e9, 2.0)])]
    return runs + extra


def test_a_non_convex_budget_no_longer_fails_every_bootstrap_replicate():
    runs = _with_non_convex_budget(sweep(noise=0.01, budgets=np.logspace(18, 20, 3), per=5))
    fit = fit_lib.fit_all(runs, bootstrap=100)["archs"]["base"]["approach2"]
    assert any("not convex" in s for s in fit["skipped"])
    assert fit["bootstrap_failed"] < 100 and fit["ci"]["a"] is not None  # before: 100 of 100 failed, no interval


def test_failed_and_partial_replicates_are_counted_and_shown():
    # Two budgets, the second with its minimum near the largest size trained: replicates whose vertex leaves
    # the sizes there keep only one budget, too few for the power law.
    rng = np.random.default_rng(0)
    runs = []
    for C, sizes in ((1e19, np.logspace(-0.5, 0.5, 5)), (1e20, np.logspace(-0.9, 0.2, 5))):
        n_opt = TRUE.optimal(C)[0]
        for k, n in enumerate(n_opt * sizes):
            loss = TRUE(n, C / (6 * n)) * (1 + 0.005 * rng.standard_normal())
            runs.append(scaling.Run(f"r{C:.0e}-{k}", "base", n, C / (6 * n), C, loss, True, budget=C))
    result = fit_lib.fit_all(runs, bootstrap=200)
    a2 = result["archs"]["base"]["approach2"]
    assert 0 < a2["bootstrap_failed"] < 200  # 42 with this seed
    line = next(w for w in a2["warnings"] if "bootstrap replicates failed" in w)
    assert f"{a2['bootstrap_failed']} of 200" in line and "fewer than 2 budgets" in line
    assert f"| approach 2: warning | {line} |" in report_lib.report(result, [])
    assert any(line in w for w in fit_lib.warnings(result))  # printed on the terminal by effax fit


def test_a_single_budget_sweep_is_fitted_as_far_as_it_can_be(tmp_path, capsys):
    runs = sweep(budgets=[1e19], per=6)
    result = fit_lib.fit_all(runs, bootstrap=20)  # before: LinAlgError from the loss-frontier fallback
    fit = result["archs"]["base"]
    assert "distinct compute" in fit["frontier"]["error"]
    assert "≥2 compute budgets" in fit["approach2"]["error"]
    assert any("collinear" in w for w in fit["approach3"]["warnings"])  # one budget: α and β unidentified
    assert "collinear" in report_lib.report(result, [])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(L=[3.0, 2.9, float("nan"), 2.7, 2.6]), "L[2] = nan"),
    (dict(N=[-1e6, 2e6, 3e6, 4e6, 5e6]), "N[0] = -1000000.0"),
    (dict(D=[1e9, 2e9, 3e9, 4e9]), "one length"),
    (dict(L=[3.0, 2.9, 0.0, 2.7, 2.6]), "L[2] = 0.0"),
    (dict(weights=[0.0] * 5), "weights"),
    (dict(weights=[1.0, 1.0, -1.0, 1.0, 1.0]), "weights"),
])
def test_bad_arrays_are_refused_before_fitting(kwargs, needle):
    args = {"N": [1e6, 2e6, 3e6, 4e6, 5e6], "D": [1e9, 2e9, 3e9, 4e9, 5e9], "L": [3.0, 2.9, 2.8, 2.7, 2.6], **kwargs}
    with pytest.raises(scaling.ScalingError, match="approach 3") as e:
        scaling.approach3(**args)
    assert needle in str(e.value)


def test_a_run_with_a_zero_loss_or_negative_size_is_named():
    runs = sweep(budgets=[1e19, 1e20], per=4)
    for field, value in (("loss", 0.0), ("N", -5.0), ("D", float("inf"))):
        bad = runs[:5] + [dataclasses.replace(runs[5], **{field: value})] + runs[6:]
        with pytest.raises(scaling.ScalingError, match=f"run {runs[5].run_id}: {field} ="):
            fit_lib.fit_all(bad, bootstrap=0)


def test_a_negative_N_in_sweep_json_is_one_line_from_effax_fit(tmp_path, capsys):
    cfg = _smoke()
    _write_run(tmp_path, "good", cfg, [4.0, 3.5])
    _write_run(tmp_path, "bad", cfg, [4.0, 3.5], sweep_meta={"N": -3.0})
    assert fit_cli.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["effax fit: run bad: N = -3.0 is not a positive finite number"]
    (tmp_path / "bad" / "sweep.json").write_text(json.dumps({"D": "many"}))
    assert fit_cli.main(["--root", str(tmp_path)]) == 2
    assert "run bad: sweep.json field 'D' is 'many', not a number" in capsys.readouterr().err


def test_grouping_by_tolerance_and_overlapping_budgets_are_warned_about():
    runs = [dataclasses.replace(r, budget=None) for r in sweep(budgets=[1e19, 1e20, 1e21], per=4)]
    fit = fit_lib.fit_all(runs, bootstrap=0)["archs"]["base"]["approach2"]
    assert any("no budget labels" in w and "--budget-tol=0.1" in w for w in fit["warnings"])
    assert [g["runs"] for g in fit["budget_groups"]] == [4, 4, 4]
    labelled = sweep(budgets=[1e19, 1e20, 1e21], per=4)
    labelled = [dataclasses.replace(r, budget=r.C) for r in labelled]
    spill = dataclasses.replace(labelled[0], run_id="spill", C=2e20, budget=1e19)  # a 1e19 run costing 2e20
    warnings = scaling.isoflop_warnings(labelled + [spill])
    assert any("overlap" in w for w in warnings)


def test_a_bootstrap_interval_on_the_box_is_flagged():
    law = scaling.Law(E=1.8, A=400.0, B=2000.0, alpha=0.35, beta=0.37)
    N, D = np.array([1e6, 2e6, 4e6, 8e6, 1.6e7]), np.array([1e9, 3e9, 1e9, 5e9, 2e9])
    warns = scaling.identification_warnings(N, D, law, {"alpha": [0.3, 0.4], "beta": [0.05, 0.9]})
    assert warns == ["the bootstrap interval of beta [0.05, 0.9] reaches the bound [0.05, 2.0]: resamples of these "
                     "runs do not determine it"]


def test_bootstrap_approach3_uses_the_callers_huber_delta(monkeypatch):
    seen = []
    real = scaling._huber_lm
    monkeypatch.setattr(scaling, "_huber_lm", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    runs = sweep(budgets=[1e19, 1e20], per=4)
    N, D, _, L = scaling.arrays(runs)
    scaling.bootstrap_approach3(N, D, L, TRUE, 3, np.random.default_rng(0), delta=0.5)
    assert seen == [0.5]  # before: always HUBER_DELTA
