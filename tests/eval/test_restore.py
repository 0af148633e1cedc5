"""Restore anywhere: a run trained on one mesh restores onto another with the same parameters and logits;
only parameters are read; broken, missing and "best" checkpoints are handled by name."""

import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from effax.eval import restore as restore_lib
from effax.train import checkpoint as ckpt_lib
from effax.train import config as config_lib
from effax.train import loop
from effax.train import mesh as mesh_lib
from effax.train.tokenizer import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments/quickstart.py") + ":smoke"
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the no-target oracle read
SHORT = ["train.steps=6", "checkpoint.every=3", "eval.every=3", "logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Trained on 8 devices with parameters split over fsdp=4 × tensor=2 (checkpoints at steps 3 and 6)."""
    workdir = tmp_path_factory.mktemp("sharded_run")
    cfg = config_lib.resolve(SMOKE, SHORT + ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    assert loop.train(cfg, str(workdir), quiet=True) == 0
    return str(workdir)


def one_device_mesh():
    return mesh_lib.make_mesh(config_lib.MeshConfig(data=1), devices=jax.devices()[:1])


def logits(ctx, tokens):
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
        return np.asarray(nnx.jit(lambda m, x: m(x)[0])(ctx.model, jnp.asarray(tokens)))


def tokens_for(ctx):
    return np.random.default_rng(0).integers(0, 256, (8, ctx.cfg.data.seq_len), dtype=np.int32)


def saved_params(workdir, step):
    """The parameters as orbax reads them back with no target at all (host numpy): the independent oracle."""
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree.leaves(tree["params"])


def assert_same_params(ctx, expected):
    got = jax.tree.leaves(nnx.state(ctx.model, nnx.Param))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), e)  # a restore is a copy: bit for bit


# Parameters restore bit for bit; logits differ only where a mesh splits a contraction (tensor=2 sums the
# attention output over heads in two parts): fp32 reordering, observed max |Δ| = 4.2e-7 on logits up to
# 1.45 (0.0 for data=8, fsdp=8, data=2×fsdp=4). 1e-5 leaves room; a misplaced shard is off by O(0.1–1).
LOGIT_ATOL = 1e-5


def test_restore_onto_other_meshes(sharded_run):
    expected = saved_params(sharded_run, 6)
    one = restore_lib.restore(sharded_run, "latest", one_device_mesh())
    assert one.step == 6 and dict(one.mesh.shape)["data"] == 1 and one.mesh.devices.size == 1
    assert_same_params(one, expected)
    data8 = restore_lib.restore(sharded_run)  # default: all 8 devices on the data axis
    assert dict(data8.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert_same_params(data8, expected)
    trained_mesh = restore_lib.restore(sharded_run, 6, config_lib.MeshConfig(data=1, fsdp=4, tensor=2))
    assert not trained_mesh.model.embed[...].sharding.is_fully_replicated  # really restored into shards
    tokens = tokens_for(one)
    ref = logits(one, tokens)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(logits(data8, tokens), ref, rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(logits(trained_mesh, tokens), ref, rtol=0, atol=LOGIT_ATOL)


def test_one_device_checkpoint_restores_onto_eight(tmp_path):
    """A state saved from a 1-device mesh (as the loop saves it; fresh init, no need to train) restores
    split 8 ways over fsdp."""
    cfg = loop.resolve_vocab(config_lib.resolve(SMOKE, SHORT + ["mesh.data=1"]), load_tokenizer("byte"))
    mesh = one_device_mesh()
    rules = mesh_lib.rules(cfg.mesh)
    trainer = loop.build_trainer(cfg, mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = trainer.init_state()
    assert state["params"]["embed"][...].sharding.mesh.devices.size == 1
    config_lib.to_json(cfg, str(tmp_path / "config.json"))
    ckpts = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"), cfg.checkpoint)
    ckpts.save(7, state, {}, {"step": 7})
    ckpts.close()
    expected = saved_params(str(tmp_path), 7)
    one = restore_lib.restore(str(tmp_path), "latest", one_device_mesh())
    fsdp8 = restore_lib.restore(str(tmp_path), "latest", config_lib.MeshConfig(data=1, fsdp=8))
    assert fsdp8.step == 7 and fsdp8.mesh.devices.size == 8
    assert_same_params(fsdp8, expected)
    assert not fsdp8.model.embed[...].sharding.is_fully_replicated
    tokens = tokens_for(one)
    np.testing.assert_allclose(logits(fsdp8, tokens), logits(one, tokens), rtol=0, atol=LOGIT_ATOL)


def test_only_parameters_are_read(sharded_run, monkeypatch):
    """Every array orbax deserialises is a parameter: the optimizer moments stay on disk."""
    read = []
    original = ocp.type_handlers.ArrayHandler.deserialize

    async def spy(self, infos, args=None):
        read.extend(info.name for info in infos)
        return await original(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
    ctx = restore_lib.restore(sharded_run, 6)
    n_params = len(jax.tree.leaves(nnx.state(ctx.model, nnx.Param)))
    assert len(read) == n_params and all(name.startswith("params.") for name in read), read
    # the same spy sees the optimizer when the whole state is read (so it would notice)
    read.clear()
    ocp.PyTreeCheckpointer().restore(os.path.join(sharded_run, "checkpoints", "6", "state"))
    assert any(name.startswith("opt.") for name in read)


def corrupt(workdir, step):
    """Truncates every data file of the step's state (what a disk-full or interrupted copy leaves)."""
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    for folder, _, files in os.walk(state):
        for f in files:
            if "d" in folder.split(os.sep):
                open(os.path.join(folder, f), "wb").close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reader after a failed read
def test_broken_missing_and_best_steps(sharded_run, tmp_path, caplog):
    run = str(tmp_path / "run")
    shutil.copytree(sharded_run, run)
    # a save killed before orbax renamed it into place is not a checkpoint
    shutil.copytree(os.path.join(run, "checkpoints", "6"), os.path.join(run, "checkpoints", "9.orbax-checkpoint-tmp-1"))
    assert restore_lib.checkpoint_steps(run) == [3, 6]
    corrupt(run, 6)
    with caplog.at_level(logging.WARNING, logger="effax"):
        ctx = restore_lib.restore(run, "latest")
    assert ctx.step == 3
    assert any("step 6" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert_same_params(ctx, saved_params(sharded_run, 3))
    with pytest.raises(restore_lib.RestoreError, match="checkpoint step 6 of .* cannot be restored"):
        restore_lib.restore(run, 6)
    with pytest.raises(restore_lib.RestoreError, match=r"no checkpoint at step 4; available steps: \[3, 6\]"):
        restore_lib.restore(run, 4)
    with pytest.raises(restore_lib.RestoreError, match="no config.json"):
        restore_lib.restore(str(tmp_path))
    with pytest.raises(restore_lib.RestoreError, match="does not exist"):
        restore_lib.restore(str(tmp_path / "nowhere"))

    # best: the lowest val loss among the checkpoints (step 3 made best by hand; 5 has no checkpoint)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"step": 3, "split": "val", "loss": 2.0}\n{"step": 5, "split": "val", "loss": 1.0}\n'
                '{"step": 6, "split": "val", "loss": 2.5}\n')
    assert restore_lib.best_step(run, restore_lib.checkpoint_steps(run)) == 3
    assert restore_lib.restore(run, "best").step == 3
    assert restore_lib.best_step(sharded_run, [3, 6]) == 6  # the real run learns: its last val loss is lowest
    corrupt(run, 3)
    with pytest.raises(restore_lib.RestoreError, match=r"no checkpoint of .* can be restored \(tried steps \[6, 3\]\)"):
        restore_lib.restore(run, "latest")
