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


# make test-slow trains smoke-tc-capacity (token choice with a capacity and its warm-up through the loop's step) and
# smoke-recursive (no router: the shared block the routed variants also run; tests/models/test_mor.py checks it
# against a vanilla model with copied weights).
@pytest.mark.parametrize("variant", ["smoke-ec", "smoke-tc-kvshare",
                                     *(pytest.param(v, marks=pytest.mark.slow) for v in ("smoke-recursive", "smoke-tc-capacity"))])
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



def test_the_train_step_hands_its_step_to_the_model(monkeypatch):
    """The capacity warm-up reads the step from ctx.step: the loop must pass state["step"] into the model call.
    A spy in place of MoR.__call__ records it (traced by eval_shape: nothing compiles)."""
    from flax import nnx

    from effax.models.mor import MoR
    from effax.train import optimizer as optimizer_lib

    seen = []

    def spy(self, tokens_BT, *, step=None, **kwargs):
        seen.append(step)
        return jax.numpy.zeros((*tokens_BT.shape, self.cfg.vocab_size)) + self.embed[...].sum() + step, {}

    monkeypatch.setattr(MoR, "__call__", spy)
    cfg = config_lib.resolve(f"{SPEC}:smoke-ec", [*QUIET, "model.vocab_size=256"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoR(cfg.model, rngs=nnx.Rngs(0))))
    params, other = nnx.split_state(abstract, nnx.Param, ...)
    tx, schedule = optimizer_lib.build(cfg.optimizer, cfg.train.steps)
    state = {"params": params, "other": other, "opt": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), np.int32), "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), np.float32 if k == "loss_mask" else np.int32)
             for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask", "target_bytes")}
    jax.eval_shape(loop.make_train_step(graphdef, tx, schedule, cfg), state, batch)
    assert seen and all(s is not None and s.shape == () and s.dtype == np.int32 for s in seen)
