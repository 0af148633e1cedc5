"""Cached generation: the cache against the full forward, sampling rules, and the `generate` suite."""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effax.eval import generate as gen
from effax.eval.context import EvalContext
from effax.layers.attention import Mask, cache_attention, reference_attention
from effax.models.dense import Dense, DenseConfig
from effax.train import config as config_lib
from effax.train import mesh as mesh_lib
from effax.train.tokenizer import ByteTokenizer

# GQA (4 query heads over 2 kv heads); vocab fits the byte tokenizer; init_std large enough that a
# random model's logits are well separated (argmax ties would make token equality meaningless).
CFG = DenseConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.2)
EOS = 256
LENGTHS = (3, 9, 17)  # different prompt lengths in one batch (padded to 32)


@functools.cache
def _model():
    return Dense(CFG, rngs=nnx.Rngs(0))


def _prompts():
    return [np.asarray(jax.random.randint(jax.random.key(10 + i), (n,), 0, EOS)).tolist() for i, n in enumerate(LENGTHS)]


@functools.cache
def _full_logits_fn():
    graphdef, state = nnx.split(_model())
    return state, jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])


def _full_logits(ids, window=48):
    """Full-forward logits [len(ids), V] of one sequence, right-padded to a fixed window (one compile;
    under the causal mask the padding changes nothing before it)."""
    state, fn = _full_logits_fn()
    return np.asarray(fn(state, jnp.asarray([list(ids) + [0] * (window - len(ids))], jnp.int32)))[0, : len(ids)]


def test_cache_attention_honours_causal_window_and_hides_stale_slots():
    B, T, S, H, K, D = 2, 7, 12, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, D)) for kk, n in zip(ks[:3], (H, K, K)))
    garbage = 100 * jax.random.normal(ks[3], (B, S - T, K, D))  # slots past the length: must stay invisible
    k_BSKP, v_BSKP = jnp.concatenate([k, garbage], 1), jnp.concatenate([v, garbage], 1)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    for window in (None, 3):
        mask = Mask(causal=True, window=window)
        got = jax.jit(functools.partial(cache_attention, mask=mask))(q, k_BSKP, v_BSKP, q_positions_BT=positions)
        want = jax.jit(functools.partial(reference_attention, mask=mask))(q, k, v)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # fp32, same math, different layout
    with pytest.raises(NotImplementedError):
        cache_attention(q, k_BSKP, v_BSKP, q_positions_BT=positions, mask=Mask(causal=False))


def test_prefill_and_decode_logits_equal_full_forward():
    """Teacher-forced: prefill right-padded prompts of different lengths, decode a fixed continuation,
    and compare every step's logits with the full forward at that position. An off-by-one in cache slots,
    RoPE positions or per-row lengths moves the logits by O(1) and fails this.
    Tolerance 2e-5 (fp32): the cached path runs the same ops; only reduction order differs (masked keys
    add exact zeros)."""
    model = _model()
    prompts, n_steps = _prompts(), 6
    cont = np.asarray(jax.random.randint(jax.random.key(99), (len(prompts), n_steps), 0, EOS))
    T = max(LENGTHS)
    tokens_BT = np.full((len(prompts), T), EOS, np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, : len(p)] = p
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, t, n, c: nnx.merge(graphdef, s).prefill(t, n, c))
    decode = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c))
    logits_BV, cache = prefill(state, jnp.asarray(tokens_BT), jnp.asarray(LENGTHS), model.init_cache(len(prompts), T + n_steps))
    steps = [np.asarray(logits_BV)]
    for i in range(n_steps):
        logits_BV, cache = decode(state, jnp.asarray(cont[:, i]), cache)
        steps.append(np.asarray(logits_BV))
    np.testing.assert_array_equal(cache.lengths_B, np.asarray(LENGTHS) + n_steps)
    for b, p in enumerate(prompts):
        full = _full_logits(p + cont[b].tolist())
        for i, got in enumerate(steps):
            np.testing.assert_allclose(got[b], full[len(p) - 1 + i], atol=2e-5, rtol=2e-5, err_msg=f"row {b} step {i}")


def _uncached_greedy(prompt, n):
    """Argmax decoding recomputing the full forward for every token (one fixed window: one compile)."""
    ids = list(prompt)
    for _ in range(n):
        logits = _full_logits(ids)[-1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3, "near-tie: token equality would test float noise"
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :]


def test_cached_greedy_equals_uncached_argmax():
    prompts, n = _prompts(), 12
    rows, stats = gen.generate_ids(_model(), prompts, max_new_tokens=n, eos_id=EOS, stop_at_eos=False)
    assert stats["new_tokens"] == n * len(prompts)
    for p, row in zip(prompts, rows):
        assert row == _uncached_greedy(p, n)


def test_top_k_1_equals_greedy_and_seeds_are_deterministic():
    model, prompts = _model(), _prompts()
    kw = dict(max_new_tokens=12, eos_id=EOS, stop_at_eos=False)  # greedy shares the compile of the test above
    greedy, _ = gen.generate_ids(model, prompts, **kw)
    top1, _ = gen.generate_ids(model, prompts, sampling=gen.Sampling(temperature=1.0, top_k=1), seed=5, **kw)
    assert top1 == greedy
    hot = gen.Sampling(temperature=1.5)
    a, _ = gen.generate_ids(model, prompts, sampling=hot, seed=3, **kw)
    b, _ = gen.generate_ids(model, prompts, sampling=hot, seed=3, **kw)
    c, _ = gen.generate_ids(model, prompts, sampling=hot, seed=4, **kw)
    assert a == b
    assert a != c and a != greedy  # 36 tokens at temperature 1.5: equal by chance has negligible odds


class Scripted(nnx.Module):
    """A stand-in family whose cache is just a step counter (the cache is opaque to the generator) and
    whose logits put all mass on script[b, step]."""

    def __init__(self, script_BN):
        self.script_BN = nnx.Variable(jnp.asarray(script_BN, jnp.int32))

    def init_cache(self, batch, max_len, dtype=None):
        return jnp.zeros((batch,), jnp.int32)

    def _logits(self, step_B):
        tok_B = jnp.take_along_axis(self.script_BN[...], step_B[:, None], axis=1)[:, 0]
        return 10.0 * jax.nn.one_hot(tok_B, CFG.vocab_size), step_B + 1

    def prefill(self, tokens_BT, lengths_B, step_B):
        return self._logits(step_B)

    def decode_step(self, tokens_B, step_B):
        return self._logits(step_B)


def test_stop_at_eos_cuts_each_row():
    script = [[5, EOS, 7, 7, 7, 7], [EOS, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6]]
    rows, stats = gen.generate_ids(Scripted(script), _prompts(), max_new_tokens=6, eos_id=EOS)
    assert rows == [[5], [], [1, 2, 3, 4, 5, 6]] and stats["new_tokens"] == 2 + 1 + 6
    rows, _ = gen.generate_ids(Scripted(script), _prompts(), max_new_tokens=6, eos_id=EOS, stop_at_eos=False)
    assert rows == script
    # Sampling at a high temperature still draws from the one-hot logits (mass ~1 - V * e^-10/T).
    rows, _ = gen.generate_ids(Scripted(script), _prompts(), max_new_tokens=6, eos_id=EOS, sampling=gen.Sampling(0.5))
    assert rows == [[5], [], [1, 2, 3, 4, 5, 6]]


def test_top_p_never_leaves_the_nucleus():
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.13])  # sorted: 0.5, 0.3, 0.13, 0.05, 0.02
    logits_BV = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (4000, 5)))
    sample = jax.jit(gen.sample_logits, static_argnums=2)
    for top_p, nucleus in ((0.75, {1, 3}), (0.85, {1, 3, 4}), (0.3, {1})):
        got = np.asarray(sample(logits_BV, jax.random.key(0), gen.Sampling(temperature=1.0, top_p=top_p)))
        assert set(got.tolist()) == nucleus, top_p  # nothing outside, every member drawn
        if nucleus == {1, 3}:  # renormalised inside the nucleus: 0.5 / 0.8 = 0.625 (4000 draws: std 0.008)
            assert abs(np.mean(got == 1) - 0.625) < 0.04
    # top-k then top-p (HF order): top_k=2 renormalises to (0.625, 0.375); top_p=0.6 keeps the first only.
    got = sample(logits_BV, jax.random.key(1), gen.Sampling(temperature=1.0, top_k=2, top_p=0.6))
    assert set(np.asarray(got).tolist()) == {1}


def test_temperature_to_zero_is_argmax():
    logits_BV = jax.random.normal(jax.random.key(100), (64, 50)) * 3  # gaps >> temperature; a key unlike the samplers
    want = np.asarray(jnp.argmax(logits_BV, -1))
    for seed in range(3):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(gen.sample_logits(logits_BV, key, gen.Sampling(temperature=0.0)), want)
        np.testing.assert_array_equal(gen.sample_logits(logits_BV, key, gen.Sampling(temperature=1e-4)), want)
    hot = gen.sample_logits(logits_BV, jax.random.key(0), gen.Sampling(temperature=5.0))
    assert (np.asarray(hot) != want).any()  # a high temperature does sample
    with pytest.raises(ValueError):
        gen.Sampling(top_p=0.0)


def test_generate_suite_on_a_mesh(tmp_path):
    """run(ctx, opts) on the 8-device mesh the eval CLI builds; batch 3 does not divide it."""
    cfg = config_lib.Config(model=CFG)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    ctx = EvalContext(cfg=cfg, model=_model(), tokenizer=ByteTokenizer(), mesh=mesh, rules=mesh_lib.rules(cfg.mesh),
                      step=0, workdir=str(tmp_path))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("We the people\n\nof the United States\n")
    parser = argparse.ArgumentParser()
    gen.add_arguments(parser)
    opts = parser.parse_args(["--prompt", "Hello", "--prompts-file", str(prompts_file), "--max-new-tokens", "5",
                              "--gen-batch", "2"])
    out = gen.run(ctx, opts)
    assert [s["prompt"] for s in out["samples"]] == ["Hello", "We the people", "of the United States"]
    assert out["tokens_per_s"] > 0 and 3 <= out["new_tokens"] <= 15
    assert all(isinstance(s["completion"], str) for s in out["samples"])
