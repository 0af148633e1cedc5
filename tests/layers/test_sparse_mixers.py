"""The sparse-attention mixers (sink_swa, chunked, block_sparse, moa, nsa) in one model: cached decoding equals
the full forward with right-padded prompts (so sink slots, rings, per-head span eviction, the full cache
of strided blocks and NSA's compressed and selected blocks all hold), cache sizes, counts, and config
errors naming their key."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_testing import compiled, filled
from effax.layers.mixer import mixer
from effax.models import registry
from effax.models.dense import Dense, DenseConfig

PATTERN = ("sink_swa", "chunked", "block_sparse", "moa", "nsa")
# Spans up to 4 + 0.25 * 25 < 11 keys by the end of the 25-token sequences below: the moa cache is a ring
# (2 sinks + 11 slots), so tokens leave it while they are decoded. Head 1 of layer 3 (the moa layer) sees
# no key before offset 8 besides the sinks. The plan covers every layer; only layer 3 reads it.
PLAN = {"alphas": [[1, 2, 3, 4]] * 3 + [[2, -2, 0, 4], [1, 2, 3, 4]],
        "betas": [[0.25, 0.125, 0.0, 0.25]] * 3 + [[0.125, 0.25, 0.125, 0.0], [0.25, 0.125, 0.0, 0.25]]}
LENGTHS = (3, 11, 17)  # right-padded prompts of different lengths; 17 > every window and chunk below
N_STEPS = 8


@functools.cache
def _config(plan_path):
    # NSA: compressed blocks of 4 every 2 tokens, top-4 selection blocks of 4 (one beyond the forced three), window 5.
    return DenseConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.2, pattern=PATTERN,
                       sliding_window=5, attention_sinks=2, attention_chunk=6, sparse_block_size=3, sparse_local_blocks=2,
                       sparse_global_blocks=1, sparse_stride_blocks=3, moa_plan=plan_path, moa_sinks=2, nsa_compress_block=4,
                       nsa_compress_stride=2, nsa_select_block=4, nsa_select_blocks=4, nsa_window=5)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("moa") / "plan.json"
    path.write_text(json.dumps(PLAN))
    return _config(str(path))


def test_cached_decoding_equals_the_full_forward(cfg):
    """Teacher-forced, as tests/models/test_decoder.py does for attn and swa: prefill prompts right-padded
    with random tokens, decode a fixed continuation, compare every step with the full forward on the real
    tokens. Tolerance 5e-5 (fp32): the same math over cache slots in another order (NSA: the blocks it
    compresses while decoding and selects from them must be the full forward's)."""
    model = filled(lambda: Dense(cfg, rngs=nnx.Rngs(1)), seed=1)
    graphdef, state = nnx.split(model)
    T, V = max(LENGTHS), cfg.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, n).tolist() for n in LENGTHS]
    cont = rng.integers(0, V, (len(LENGTHS), N_STEPS))
    tokens_BT = rng.integers(0, V, (len(LENGTHS), T)).astype(np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, : len(p)] = p
    cache = model.init_cache(len(LENGTHS), T + N_STEPS)
    sizes = [layer[0].pos.shape[-1] for layer in cache.layers[:4]]
    assert sizes == [2 + 5, 6, T + N_STEPS, 2 + 11]  # sinks + window, chunk, full (strided blocks), sinks + widest span
    nsa = cache.layers[4][0]
    assert (nsa.slc.slots, nsa.win.slots, nsa.raw.slots, nsa.cmp.slots) == (T + N_STEPS, 5, 4, (T + N_STEPS - 4) // 2 + 1)
    prefill = compiled(lambda s, t, n, c: nnx.merge(graphdef, s).prefill(t, n, c), state, tokens_BT, np.asarray(LENGTHS), cache)
    logits_BV, cache = prefill(state, tokens_BT, np.asarray(LENGTHS), cache)
    decode = compiled(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c), state, cont[:, 0], cache)
    steps = [np.asarray(logits_BV)]
    for i in range(N_STEPS):
        logits_BV, cache = decode(state, cont[:, i], cache)
        steps.append(np.asarray(logits_BV))
    rows = np.zeros((1, T + N_STEPS), np.int32)
    forward = compiled(lambda s, t: nnx.merge(graphdef, s)(t)[0], state, rows)
    for b, p in enumerate(prompts):
        rows[0] = p + cont[b].tolist() + [0] * (T - len(p))
        full = np.asarray(forward(state, rows))[0]
        for i, got in enumerate(steps):
            np.testing.assert_allclose(got[b], full[len(p) - 1 + i], atol=5e-5, rtol=5e-5, err_msg=f"row {b} step {i}")


def test_counts(cfg):
    """Same projections as attn; attention FLOPs over the keys a query at the end of T tokens sees."""
    model = nnx.eval_shape(lambda: Dense(cfg, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.param_count()
    per_key = 4 * cfg.n_heads * cfg.dim_per_head
    projections = 2 * mixer("attn").param_count(cfg)
    keys = {"sink_swa": 5 + 2, "chunked": 6, "block_sparse": 13 * 3}  # blocks 33, 32 (local), 0 (global), 0, 3, ..., 30 (stride)
    for name, n in keys.items():
        assert mixer(name).flops_per_token(cfg, 100) == projections + n * per_key, name
    spans = np.minimum(100, np.ceil(np.asarray(PLAN["alphas"]) + np.asarray(PLAN["betas"]) * 100).clip(0) + 2)
    assert mixer("moa").flops_per_token(cfg, 100) == pytest.approx(projections + spans.mean() * per_key)


@pytest.mark.parametrize("key,value,message", [
    ("attention_chunk", 0, "model.attention_chunk must be >= 1"),
    ("sparse_stride_blocks", -1, "model.sparse_stride_blocks must be >= 0"),
    ("moa_plan", "", "model.moa_plan must name"),
    ("moa_plan", "/nonexistent/plan.json", "model.moa_plan='/nonexistent/plan.json'"),
])
def test_bad_values_fail_naming_the_key(cfg, key, value, message):
    with pytest.raises(registry.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        dataclasses.replace(cfg, **{key: value}).validate()


def test_a_plan_of_the_wrong_shape_is_refused(cfg, tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"alphas": [[1, 2]], "betas": [[0.5, 0.5]]}))
    with pytest.raises(registry.ConfigError, match="1 layers x 2 heads; the model has 5 x 4"):
        dataclasses.replace(cfg, moa_plan=str(path)).validate()
