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


# MoE++, expert-choice, MoGE and BigMac train in make test-slow (~16-20 s each); their layers are checked against a
# dense loop over experts in tests/layers/test_moe.py by default, and the loop's MoE path (figures, aux losses) is
# smoke-topk's.
@pytest.mark.parametrize("variant", ["smoke-topk"] + [pytest.param(v, marks=pytest.mark.slow) for v in
                                                      ("smoke-moepp", "smoke-expert-choice", "smoke-moge", "smoke-bigmac")])
def test_smoke_variant_learns_on_the_demo_corpus(tmp_path, monkeypatch, variant):
    """(smoke-auxfree: in the expert-parallel test below.)"""
    rows = _train(tmp_path, variant, one_device=True, monkeypatch=monkeypatch)
    assert len(rows) == 10
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    figures = {k: v for k, v in rows[-1].items() if k.startswith("moe/")}
    assert {"moe/load", "moe/maxvio", "moe/z_loss"} <= set(figures)
    assert all(math.isfinite(x) for v in figures.values() for x in np.ravel(v))


@pytest.mark.slow  # ~85 s: three training runs; expert parallelism per router is in tests/layers/test_moe_parallel.py
def test_aux_free_is_expert_parallel_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """One-device reference (6 steps, checkpoints at 3 and 6); mesh.expert=4 resumes from the reference's
    step 3 (its last checkpoint removed), mesh.expert=2 × fsdp=4 runs from scratch. The selection bias
    moves by ±u on integer load counts, which no mesh changes: after resuming it must equal the
    reference's bit for bit (a bias not restored would be off by multiples of u)."""
    from effax.eval.restore import restore

    steps = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=2"]
    reference = _train(tmp_path / "one", "smoke-auxfree", steps, one_device=True, monkeypatch=monkeypatch)
    losses = np.array([r["loss"] for r in reference])
    assert losses[-1] < losses[0] - 0.3

    shutil.copytree(tmp_path / "one", tmp_path / "expert4")
    shutil.rmtree(tmp_path / "expert4" / "checkpoints" / "6")
    runs = {"expert4": _train(tmp_path / "expert4", "smoke-auxfree", steps + ["mesh.expert=4"]),
            "expert2_fsdp4": _train(tmp_path / "expert2_fsdp4", "smoke-auxfree",
                                    steps + ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2"])}
    for rows in runs.values():
        assert [r["step"] for r in rows] == list(range(1, 7))
        # fp32; the mesh only reorders reductions (~1e-7 relative per op, a few steps): the 1e-5 bound
        np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-5, atol=0)
        np.testing.assert_allclose(rows[-1]["moe/load"], reference[-1]["moe/load"], rtol=1e-5, atol=1e-7)
    biases = {d: restore(str(tmp_path / d)).model.blocks[0].layers[0].mlp.bias[...] for d in ("one", *runs)}
    assert np.any(biases["one"])
    for d in runs:
        np.testing.assert_array_equal(biases[d], biases["one"])
