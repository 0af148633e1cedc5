"""The decoder skeleton with mixers that exist only here (toy_layers.py): layer patterns and scan groups,
counts summed per layer, cached decoding of a recurrent mixer and of the ring-buffer window, reports and
non-trainable state through the training loop, and one trace per distinct super-block."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import toy_layers  # tests/models is on sys.path; importing it registers the toy mixers
from effax.models import registry
from effax.models.decoder import LayerSpec, ScanGroup, scan_groups
from effax.models.dense import Dense, DenseConfig

TINY = DenseConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.2)


def test_scan_groups_cut_the_pattern_into_repeated_super_blocks():
    a, b, c = (LayerSpec(m, "swiglu") for m in "abc")
    assert scan_groups((a,) * 4) == (ScanGroup(0, (a,), 4),)
    assert scan_groups((a, a, b, c) * 3) == (ScanGroup(0, (a, a, b, c), 3),)
    assert scan_groups((a, b) * 2 + (a,)) == (ScanGroup(0, (a, b), 2), ScanGroup(4, (a,), 1))
    assert scan_groups((b,) + (a,) * 5) == (ScanGroup(0, (b,), 1), ScanGroup(1, (a,), 5))
    cfg = dataclasses.replace(TINY, n_layers=5, pattern=("swa", "attn+none"))
    assert [s.mixer + "+" + s.ffn for s in cfg.layer_specs] == ["swa+swiglu", "attn+none"] * 2 + ["swa+swiglu"]


@pytest.mark.parametrize("pattern, n_layers, tie", [
    (("attn",), 3, True),
    (("swa", "attn+none", "running_sum"), 5, False),  # a tail group, a layer without feed-forward, untied head
    (("reporter", "counter+none"), 4, True),  # a parameter outside the mixer's matmuls, buffers (not parameters)
])
def test_param_count_matches_the_built_model(pattern, n_layers, tie):
    cfg = dataclasses.replace(TINY, pattern=pattern, n_layers=n_layers, tie_embeddings=tie)
    model = nnx.eval_shape(lambda: Dense(cfg, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.param_count()
    assert cfg.param_count(active=True) == cfg.param_count()  # nothing sparse here


def test_flops_are_the_sum_of_the_layers_own_counts():
    D, V, T, W = TINY.d_model, TINY.vocab_size, 100, 16
    cfg = dataclasses.replace(TINY, pattern=("swa", "running_sum+none"), sliding_window=W, tie_embeddings=False)
    attn = 2 * D * TINY.dim_per_head * (2 * 4 + 2 * 2) + 4 * W * 4 * TINY.dim_per_head  # keys: the window, not T
    swiglu, running_sum = 2 * 3 * D * 64, 2 * 2 * D * D
    assert cfg.flops_per_token(T) == 3 * (2 * (attn + swiglu) + 2 * running_sum + 2 * D * V)


def test_unknown_layer_names_fail_naming_the_entry():
    with pytest.raises(registry.ConfigError, match="unknown mixer 'mamba9'.*registered mixers"):
        dataclasses.replace(TINY, pattern=("attn", "mamba9")).validate()
    with pytest.raises(registry.ConfigError, match="unknown feed-forward 'moe9'"):
        dataclasses.replace(TINY, pattern=("attn+moe9",)).validate()
    with pytest.raises(registry.ConfigError, match="sliding_window"):
        dataclasses.replace(TINY, pattern=("swa",), sliding_window=0).validate()


# --- cached decoding --------------------------------------------------------------------------------

LENGTHS = (3, 11, 17)  # right-padded prompts of different lengths in one batch; 17 > the window below


@functools.cache
def _decoding_model(pattern):
    cfg = dataclasses.replace(TINY, pattern=pattern, sliding_window=5)
    return Dense(cfg, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("pattern", [("running_sum", "attn"), ("swa", "running_sum+none")])
def test_cached_decoding_equals_the_full_forward(pattern):
    """Teacher-forced: prefill prompts right-padded with tokens that would change a leaky state, decode
    a fixed continuation, compare every step's logits with the full forward on the real tokens. Catches
    padding entering a recurrent state, a ring-buffer slot off by one, a window one key too wide.
    Tolerance 5e-5 (fp32): same math in a different order (the running sum's recurrence vs one add)."""
    model = _decoding_model(pattern)
    graphdef, state = nnx.split(model)
    n_steps, T, V = 8, max(LENGTHS), TINY.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, n).tolist() for n in LENGTHS]
    cont = rng.integers(0, V, (len(LENGTHS), n_steps))
    tokens_BT = rng.integers(0, V, (len(LENGTHS), T)).astype(np.int32)  # padding: random tokens, not zeros
    for b, p in enumerate(prompts):
        tokens_BT[b, : len(p)] = p
    cache = model.init_cache(len(LENGTHS), T + n_steps)
    logits_BV, cache = jax.jit(lambda s, t, n, c: nnx.merge(graphdef, s).prefill(t, n, c))(
        state, jnp.asarray(tokens_BT), jnp.asarray(LENGTHS), cache)
    decode = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c))
    steps = [np.asarray(logits_BV)]
    for i in range(n_steps):
        logits_BV, cache = decode(state, jnp.asarray(cont[:, i]), cache)
        steps.append(np.asarray(logits_BV))
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    for b, p in enumerate(prompts):
        full = np.asarray(forward(state, jnp.asarray([p + cont[b].tolist()], jnp.int32)))[0]
        for i, got in enumerate(steps):
            np.testing.assert_allclose(got[b], full[len(p) - 1 + i], atol=5e-5, rtol=5e-5, err_msg=f"row {b} step {i}")


def test_sliding_window_cache_is_a_ring_of_window_slots():
    model = _decoding_model(("swa", "running_sum+none"))
    cache = model.init_cache(2, 1000)
    kv = cache.layers[0][0]  # the swa layer's state, stacked over its 2 repeats
    assert kv.ring and kv.k.shape == (2, 2, 5, TINY.kv_heads, TINY.dim_per_head)  # [R, B, window, K, P], not 1000
    assert cache.layers[0][1].shape == (2, 2, TINY.d_model)  # the running sum: fixed size


# --- reports and buffers through the training loop -----------------------------------------------------

def _toy_config(pattern, n_layers, **train):
    from effax.train import config as config_lib

    return config_lib.Config(
        model=dataclasses.replace(TINY, pattern=pattern, n_layers=n_layers, vocab_size=0, d_model=32),
        data=config_lib.DataConfig(seq_len=32),
        train=config_lib.TrainConfig(**{"steps": 3, "batch_size": 8, "log_every": 1, **train}),
        optimizer=config_lib.OptimizerConfig(lr=1e-2, warmup_steps=0),
        mesh=config_lib.MeshConfig(data=-1),  # the 8 fake devices: reports and buffers under a sharded batch
        checkpoint=config_lib.CheckpointConfig(every=0, async_save=False),
        eval=config_lib.EvalConfig(every=0, batches=1),
        logging=config_lib.LoggingConfig(tensorboard=True, progress=False),
    )


@pytest.fixture(scope="module")
def reporter_run(tmp_path_factory):
    """3 steps of a 3-layer model whose reporter layers sit at layers 0 and 2 (the pattern's tail group)."""
    from effax.train import loop

    workdir = tmp_path_factory.mktemp("reporter")
    cfg = _toy_config(("reporter", "attn"), 3)
    assert loop.train(cfg, str(workdir), quiet=True) == 0
    return workdir


def test_reports_reach_metrics_jsonl_reduced_as_declared(reporter_run):
    from effax.train import metrics as metrics_lib

    rows = metrics_lib.read(str(reporter_run), "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]
    # Layers 0 and 2 report; layer 1 is attention. Probe starts at ones(3): each layer's aux loss is 3c.
    np.testing.assert_allclose(first["toy/aux"], 2 * 3 * toy_layers.AUX_COEF, rtol=1e-6)
    assert (first["toy/layer_layer0"], first["toy/layer_layer2"]) == (0.0, 2.0)
    assert "toy/layer_layer1" not in first and "toy/layer" not in first
    assert (first["toy/mean_layer"], first["toy/max_layer"], first["toy/sum_layer"]) == (1.0, 2.0, 2.0)
    assert first["toy/load"] == [1.0, 2.0, 10.0]  # a vector, averaged over the reporting layers


def test_vector_diagnostics_are_tensorboard_histograms(reporter_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reporter_run / "tb"), size_guidance={"histograms": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert "train/toy/load" in tags["tensors"] and "train/toy/aux" in tags["tensors"]
    kinds = {t: events.SummaryMetadata(t).plugin_data.plugin_name for t in ("train/toy/load", "train/toy/aux")}
    assert kinds == {"train/toy/load": "histograms", "train/toy/aux": "scalars"}


def test_aux_losses_are_added_to_the_training_loss(reporter_run):
    """The probe is used only by the aux loss and is not decayed: it moves only if the loss is added."""
    from effax.eval.restore import restore

    probe = restore(str(reporter_run)).model.blocks[0].layers[0].mixer.probe[...]  # [repeats=1, 3]
    assert np.all(np.asarray(probe) < 1.0 - 1e-3), probe


def test_a_reported_name_may_not_collide_with_the_loops_keys():
    from effax.train import loop

    with pytest.raises(ValueError, match="family prefix"):
        toy_ctx().diagnostic("loss", 1.0)
    with pytest.raises(ValueError, match="collide"):
        loop.model_figures({"metrics": {"grad_norm": 1.0}})


def toy_ctx():
    from effax.layers.mixer import LayerContext

    return LayerContext(positions_BT=jnp.zeros((1, 1), jnp.int32))


# --- one trace per distinct super-block ---------------------------------------------------------------

def test_a_periodic_pattern_is_traced_once_whatever_the_depth():
    pattern = ("trace_a", "trace_b", "trace_a", "trace_c")
    counts = []
    for n_layers in (4, 12):
        toy_layers.TRACES.clear()
        model = nnx.eval_shape(lambda: Dense(dataclasses.replace(TINY, pattern=pattern, n_layers=n_layers), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, jnp.zeros((2, 8), jnp.int32))
        counts.append(dict(toy_layers.TRACES))
    assert counts[0] == counts[1] == {"trace_a": 2, "trace_b": 1, "trace_c": 1}  # once per place in the super-block


def test_unrolled_scan_computes_the_same_logits_and_gradients():
    """model.scan_unroll only changes how the layer loop is compiled (several layers per loop iteration, or
    none). fp32: XLA may fuse across the unrolled layers and reorder a sum, ~1e-7 relative; 1e-5 would
    still catch a layer skipped or applied twice (an O(1) change at init_std 0.2)."""
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, TINY.vocab_size)
    results = []
    for unroll in (1, 2):  # 2 layers in one scan group: a loop of 2, then none
        cfg = dataclasses.replace(TINY, n_layers=2, scan_unroll=unroll)
        graphdef, state = nnx.split(Dense(cfg, rngs=nnx.Rngs(0)))
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens)[0] ** 2)
        results.append(jax.jit(jax.value_and_grad(loss))(state))
    for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(registry.ConfigError, match="model.scan_unroll"):
        dataclasses.replace(TINY, scan_unroll=0).validate()
