"""Schedules, weight-decay mask, the loss, and checkpoint retention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effax.models.dense import Dense, DenseConfig

from effax.train import checkpoint as ckpt_lib
from effax.train import config as config_lib
from effax.train import loop
from effax.train import optimizer as optimizer_lib


def lr_at(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_cosine_schedule_shape():
    cfg = config_lib.OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    sched = optimizer_lib.schedule(cfg, 110)
    np.testing.assert_allclose(lr_at(sched, [0, 5, 10]), [0.0, 0.5, 1.0], atol=1e-6)  # linear warmup
    # halfway through the decay the cosine is at the midpoint between peak and floor
    np.testing.assert_allclose(float(sched(60)), 0.1 + 0.9 * 0.5, atol=1e-6)
    np.testing.assert_allclose(float(sched(110)), 0.1, atol=1e-6)


def test_wsd_schedule_shape():
    cfg = config_lib.OptimizerConfig(lr=2.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    sched = optimizer_lib.schedule(cfg, 100)  # warmup 10, stable 70, decay 20
    np.testing.assert_allclose(lr_at(sched, [5, 10, 50, 80]), [1.0, 2.0, 2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(lr_at(sched, [90, 100]), [1.0, 0.0], atol=1e-6)


def test_weight_decay_follows_the_no_decay_tag_not_the_name():
    class Layer(nnx.Module):
        def __init__(self):
            self.scale = nnx.Param(jnp.ones((4,)), no_decay=True)  # a norm gain
            self.bias = nnx.Param(jnp.ones((4,)))  # named like a bias, but not tagged: decays
            self.A_log = nnx.Param(jnp.ones((2,)), no_decay=True)  # an SSM parameter with no telling name

    params = nnx.state(Layer(), nnx.Param)
    assert nnx.to_pure_dict(optimizer_lib._decay_mask(params)) == {"scale": False, "bias": True, "A_log": False}
    # The decoder's norm scales carry the tag, also when stacked over layers by the scan ([layers, d]).
    model = Dense(DenseConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, d_ff=16), rngs=nnx.Rngs(0))
    mask = nnx.to_pure_dict(optimizer_lib._decay_mask(nnx.state(model, nnx.Param)))
    layer = mask["blocks"][0]["layers"][0]
    assert (layer["mixer_norm"]["scale"], layer["mlp_norm"]["scale"], mask["final_norm"]["scale"]) == (False,) * 3
    assert (layer["mixer"]["q"], layer["mlp"]["down"], mask["embed"]) == (True,) * 3
    # And AdamW really leaves them alone: zero gradients, one step, only the decayed ones move.
    tx, _ = optimizer_lib.build(config_lib.OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0), 10)
    p = nnx.state(Layer(), nnx.Param)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    moved = nnx.to_pure_dict(jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates))
    assert moved == {"scale": False, "bias": True, "A_log": False}


def test_cross_entropy_and_z_loss_against_a_hand_computation():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    targets = jnp.array([[0, 2]])
    mask = jnp.array([[1.0, 0.0]])  # the second position does not count
    ce, zl = loop.cross_entropy(logits, targets, mask, z_loss=1e-2)
    lse = math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    np.testing.assert_allclose(float(ce), lse - 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(zl), 1e-2 * lse**2, rtol=1e-6)


def test_checkpoint_retention_keeps_last_n_and_every_k(tmp_path):
    cfg = config_lib.CheckpointConfig(every=1, keep_last=2, keep_every=4, async_save=True)
    ckpts = ckpt_lib.Checkpoints(str(tmp_path), cfg)
    state = {"w": jnp.arange(3.0), "step": jnp.int32(0)}
    for step in range(1, 11):
        ckpts.save(step, {**state, "step": jnp.int32(step)}, {"next_batch": step}, {"step": step})
    ckpts.wait()
    assert ckpts.steps() == [4, 8, 9, 10]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step, restored, data_state, record = ckpts.restore_latest(abstract)
    assert (step, int(restored["step"]), data_state, record) == (10, 10, {"next_batch": 10}, {"step": 10})
    ckpts.close()


def test_restore_latest_falls_back_past_a_corrupt_step(tmp_path):
    ckpts = ckpt_lib.Checkpoints(str(tmp_path), config_lib.CheckpointConfig(keep_last=5, async_save=False))
    state = {"w": jnp.arange(3.0)}
    for step in (1, 2):
        ckpts.save(step, {"w": state["w"] * step}, {}, {"step": step})
    ckpts.wait()
    for f in (tmp_path / "2" / "state").rglob("*"):  # damage every file of the newest step
        if f.is_file():
            f.write_bytes(b"garbage")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step, restored, _, _ = ckpt_lib.Checkpoints(str(tmp_path), read_only=True).restore_latest(abstract)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])
