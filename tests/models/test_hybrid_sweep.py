"""experiments/hybrid/hybrid.py's comparison sweep: every architecture at the same parameter targets and budgets."""

import dataclasses

import pytest

from effax.train.sweeps import spec as sweep
from experiments.hybrid import hybrid


# Within 5% of each target; Mamba2 within 12%: it has no MLP width to tune, only d_model on a grid of 8 (the
# sweep's fits use each run's own N, so the targets only need to place the runs, not to equal each other).
@pytest.mark.parametrize("arch", hybrid.ARCHS)
def test_matched_sizes_hit_the_targets(arch):
    tolerance = 0.12 if arch == "mamba2" else 0.05
    for target in hybrid.SWEEP_N:
        size = hybrid.matched_size(arch, target)
        fields = {k.removeprefix("model."): v for k, v in size.items() if k.startswith("model.")}
        cfg = dataclasses.replace(hybrid.model(arch, fields.pop("d_model")), **fields)
        got = cfg.param_count(non_embedding=True)
        assert abs(got / target - 1) <= tolerance, (arch, target, got, size)


def test_the_sweep_holds_every_architecture_at_every_budget():
    runs, _ = sweep.expand("experiments/hybrid/hybrid.py")
    assert len(runs) == len(hybrid.ARCHS) * len(hybrid.SWEEP_N) * len(hybrid.SWEEP_BUDGETS)
    for arch in hybrid.ARCHS:  # every architecture at every budget, with its own pattern
        mine = [r for r in runs if r.arch == arch]
        assert {r.budget for r in mine} == set(hybrid.SWEEP_BUDGETS), arch
        assert {r.cfg.model.pattern for r in mine} == {hybrid.model(arch, 64).pattern}, arch
