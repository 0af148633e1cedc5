"""experiments/mor/mor.py through the training loop on the demo corpus: the smoke variants learn (one test per
variant, in-process, on one of the 8 fake devices). Between them they cover each router (none, expert choice, token
choice) and each KV strategy (recursion-wise, sharing), the auxiliary causal router and the aux-loss-free
bias (a Buffer the train step carries)."""

import functools
import math

import jax
import numpy as np
import pytest

from effax.train import config as config_lib
from effax.train import loop
from effax.train import mesh as mesh_lib
from effax.train import metrics as metrics_lib

SPEC = "experiments/mor/mor.py"
QUIET = ["logging.tensorboard=false", "logging.progress=false", "mesh.data=1"]


@pytest.mark.parametrize("variant", ["smoke-recursive", "smoke-ec", "smoke-tc-kvshare"])
def test_smoke_variants_learn_on_the_demo_corpus(tmp_path, monkeypatch, repo, variant):
    monkeypatch.chdir(repo)
    monkeypatch.setattr(mesh_lib, "make_mesh", functools.partial(mesh_lib.make_mesh, devices=jax.devices()[:1]))
    cfg = config_lib.resolve(f"{SPEC}:{variant}", QUIET)
    assert loop.train(cfg, str(tmp_path / variant), quiet=True) == 0
    rows = metrics_lib.read(str(tmp_path / variant), "train")
    assert len(rows) == cfg.train.steps
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, variant
    figures = {k: v for k, v in rows[-1].items() if k.startswith("mor/")}
    assert all(math.isfinite(x) for v in figures.values() for x in np.ravel(v)), variant
    if variant != "smoke-recursive":
        assert len(figures["mor/depth_frac"]) == cfg.model.n_recursions + 1
        assert abs(sum(figures["mor/depth_frac"]) - 1) < 1e-5
    if variant == "smoke-tc-kvshare":  # the aux-loss-free bias moved (by multiples of u) and was carried
        assert np.abs(figures["mor/router_bias"]).max() >= cfg.model.bias_update_rate
    if variant == "smoke-ec":
        assert {"mor/router_bce", "mor/aux_router_bce", "mor/score_mean_layer1"} <= set(figures)
