"""experiments/moe/moe.py through the training loop on the demo corpus: every smoke variant learns; the
aux-loss-free run gives the one-device loss curve under expert parallelism (mesh.expert=4, and
mesh.expert=2 × mesh.fsdp=4) and resumes bit for bit, selection bias included. In-process runs; the
one-device reference runs on the first of the 8 fake devices."""

import functools
import math
import shutil

import jax
import numpy as np
import pytest

from effax.train import config as config_lib
from effax.train import loop
from effax.train import mesh as mesh_lib
from effax.train import metrics as metrics_lib

SPEC = "experiments/moe/moe.py"
QUIET = ["logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(autouse=True)
def _cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


def _train(workdir, variant, overrides=(), one_device=False, monkeypatch=None) -> list[dict]:
    cfg = config_lib.resolve(f"{SPEC}:{variant}", QUIET + list(overrides) + (["mesh.data=1"] if one_device else []))
    if one_device:
        monkeypatch.setattr(mesh_lib, "make_mesh", functools.partial(mesh_lib.make_mesh, devices=jax.devices()[:1]))
    try:
        assert loop.train(cfg, str(workdir), quiet=True) == 0
    finally:
        if one_device:
            monkeypatch.undo()
    return metrics_lib.read(str(workdir), "train")


@pytest.mark.parametrize("variant", ["smoke-topk", "smoke-expert-choice", "smoke-moge", "smoke-moepp", "smoke-bigmac"])
def test_smoke_variant_learns_on_the_demo_corpus(tmp_path, monkeypatch, variant):
    """(smoke-auxfree: in the expert-parallel test below.)"""
    rows = _train(tmp_path, variant, one_device=True, monkeypatch=monkeypatch)
    assert len(rows) == 10
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    figures = {k: v for k, v in rows[-1].items() if k.startswith("moe/")}
    assert {"moe/load", "moe/maxvio", "moe/z_loss"} <= set(figures)
    assert all(math.isfinite(x) for v in figures.values() for x in np.ravel(v))


def test_aux_free_is_expert_parallel_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    from effax.eval.restore import restore

    steps = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=2"]
    reference = _train(tmp_path / "one", "smoke-auxfree", steps, one_device=True, monkeypatch=monkeypatch)
    losses = np.array([r["loss"] for r in reference])
    assert losses[-1] < losses[0] - 0.3

    # resume: drop the last checkpoint, rerun from step 3 on the same (one-device) mesh
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    resumed = _train(tmp_path / "resumed", "smoke-auxfree", steps, one_device=True, monkeypatch=monkeypatch)
    assert [r["loss"] for r in resumed] == list(losses)
    biases = [restore(str(tmp_path / d)).model.blocks[0].layers[0].mlp.bias[...] for d in ("one", "resumed")]
    assert np.any(biases[0]) and np.array_equal(biases[0], biases[1])  # moved, and bit for bit

    for mesh in (["mesh.expert=4"], ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2"]):
        workdir = tmp_path / "_".join(mesh)
        rows = _train(workdir, "smoke-auxfree", steps[:1] + mesh)
        # fp32; the mesh only reorders reductions (~1e-7 relative per op, a few steps): the 1e-5 bound
        np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-5, atol=0)
        np.testing.assert_allclose(rows[-1]["moe/load"], reference[-1]["moe/load"], rtol=1e-5, atol=1e-7)
