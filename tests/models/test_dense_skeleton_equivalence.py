"""The dense model on the shared decoder skeleton reproduces the pre-skeleton dense model bit for bit:
logits, gradients, and (slow) a 20-step training loss curve on the quickstart smoke config (fp32, CPU, one device).
The oracle is a frozen copy of the old model (tests/models/dense_legacy.py); both run here, in the same
process, so the comparison is exact and does not depend on the machine."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from effax.models import registry
from effax.train import config as config_lib
from effax.train import data as data_lib
from effax.train import loop
from effax.train import mesh as mesh_lib

import dense_legacy  # tests/models is on sys.path; importing it registers model.type=dense_legacy

SMOKE = pathlib.Path(__file__).resolve().parents[2] / "experiments/quickstart.py"


@pytest.fixture(scope="module")
def smoke():
    cfg = config_lib.resolve(f"{SMOKE}:smoke")
    return loop.resolve_vocab(cfg, data_lib.tokenizer_for(cfg.data))


def _legacy(model_cfg):
    fields = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(dense_legacy.LegacyDenseConfig)
              if f.name != "type" and hasattr(model_cfg, f.name)}
    return dense_legacy.LegacyDenseConfig(**fields)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_are_bit_identical(smoke, tie):
    cfg = dataclasses.replace(smoke.model, tie_embeddings=tie)
    tokens = jax.random.randint(jax.random.key(3), (4, smoke.data.seq_len), 0, cfg.vocab_size)
    segments = (jax.numpy.arange(smoke.data.seq_len) >= 40).astype(jax.numpy.int32)[None].repeat(4, 0)
    out = {}
    for name, model_cfg in (("new", cfg), ("old", _legacy(cfg))):
        model = registry.build(model_cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, segment_ids_BT=seg)[0])
        out[name] = np.asarray(fwd(state, tokens, segments))
    np.testing.assert_array_equal(out["new"], out["old"])


def test_gradients_are_bit_identical(smoke):
    """Every parameter's gradient of a fixed linear function of the logits, through the backward of each
    model (the cheap default; the 20-step training curve below, slow, adds AdamW and the data pipeline).
    The two models name their parameters differently, so the leaves are matched by shape and value: a
    gradient that differs in one bit matches none of the other model's."""
    tokens = jax.random.randint(jax.random.key(3), (2, smoke.data.seq_len), 0, smoke.model.vocab_size)
    probe = jax.random.normal(jax.random.key(4), (2, smoke.data.seq_len, smoke.model.vocab_size))
    grads = {}
    for name, model_cfg in (("new", smoke.model), ("old", _legacy(smoke.model))):
        graphdef, state = nnx.split(registry.build(model_cfg, rngs=nnx.Rngs(0)))
        loss = lambda s: jax.numpy.sum(nnx.merge(graphdef, s)(tokens)[0] * probe)
        leaves = [np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(state))]
        grads[name] = sorted(leaves, key=lambda g: (g.shape, float(np.abs(g).sum())))
    assert len(grads["new"]) == len(grads["old"])
    for new, old in zip(grads["new"], grads["old"]):
        np.testing.assert_array_equal(new, old)
    assert all(np.abs(g).sum() > 0 for g in grads["new"])  # every parameter is reached


@pytest.mark.slow  # ~22 s; test_gradients_are_bit_identical covers the backward by default
def test_training_loss_curve_is_bit_identical(smoke):
    curves = {}
    for name, model_cfg in (("new", smoke.model), ("old", _legacy(smoke.model))):
        cfg = dataclasses.replace(smoke, model=model_cfg, mesh=config_lib.MeshConfig(data=1))
        mesh = mesh_lib.make_mesh(cfg.mesh, devices=jax.devices()[:1])
        rules = mesh_lib.rules(cfg.mesh)
        trainer = loop.build_trainer(cfg, mesh, rules)
        batches = data_lib.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                          process_index=0, process_count=1)
        losses = []
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            state = trainer.init_state()
            for _ in range(cfg.train.steps):
                state, metrics = trainer.train_step(state, trainer.to_global(next(batches)))
                losses.append(float(metrics["loss"]))
        curves[name] = np.array(losses)
    assert len(curves["new"]) == 20
    np.testing.assert_array_equal(curves["new"], curves["old"])
    assert curves["new"][-1] < curves["new"][0] - 0.5  # it learns: the comparison is not between two constants
