"""Mixture-of-Recursions (models/mor.py): schedules, routers, the gathered path, KV strategies, generation.

One tiny model per router (d_model 32, 3 recursions of 1 shared layer, T = 24; middle-cycle, with an
unshared first and last layer, where those layers matter), parameters drawn by numpy, each function compiled once with XLA's backend optimisation
off (tests/attention_testing.py). Tolerances: fp32 throughout; where two paths compute the same sums in
a different order (gathered vs masked, cached vs uncached) 2e-5 absolute on O(1) activations and logits.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_testing import compiled, filled

from effax.layers.mixer import LayerContext
from effax.models.dense import Dense, DenseConfig
from effax.models.mor import MoR, MoRConfig
from effax.models.registry import ConfigError

V, B, T = 64, 2, 24
TOL = dict(atol=2e-5, rtol=2e-5)
BASE = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, n_recursions=3, sharing="cycle",
            aux_router_dim=8)
MIDDLE = dict(n_layers=5, sharing="middle-cycle")
TOKENS = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)
SEGMENTS = np.array([[0] * 10 + [1] * 14, [0] * 24], np.int32)  # row 0 packs two documents
POSITIONS = np.array([list(range(10)) + list(range(14)), list(range(24))], np.int32)


@functools.cache
def model(**fields) -> MoR:
    return filled(lambda: MoR(MoRConfig(**{**BASE, **fields}), rngs=nnx.Rngs(0)))


@functools.cache
def forward(**fields):
    """(params -> logits, aux) for the model `fields` describes, packed rows, compiled once."""
    graphdef, state = nnx.split(model(**fields))

    def fn(state, tokens, positions, segments):
        return nnx.merge(graphdef, state)(tokens, positions_BT=positions, segment_ids_BT=segments, return_routing=True)

    f = compiled(fn, state, TOKENS, POSITIONS, SEGMENTS)
    return lambda tokens=TOKENS, state=state: f(state, tokens, POSITIONS, SEGMENTS)


# --- structure ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharing, unrolled", [
    ("cycle", [0, 1, 0, 1, 0, 1]),
    ("sequence", [0, 0, 0, 1, 1, 1]),
    ("middle-cycle", [0, 1, 2, 1, 2, 1, 2, 3]),
    ("middle-sequence", [0, 1, 1, 1, 2, 2, 2, 3]),
])
def test_each_schedule_ties_exactly_its_layers(sharing, unrolled):
    cfg = MoRConfig(**{**BASE, "sharing": sharing, "n_layers": len(unrolled), "router": "none", "n_recursions": 3})
    assert cfg.unrolled_layers() == unrolled
    built = nnx.eval_shape(lambda: MoR(cfg, rngs=nnx.Rngs(0)))
    n_unique = len(set(unrolled))
    stacked = {a.shape[0] for a in jax.tree.leaves(nnx.state(built.blocks, nnx.Param))}
    assert stacked == {n_unique}  # one stacked copy per unique layer, no more
    params = sum(a.size for a in jax.tree.leaves(nnx.state(built, nnx.Param)))
    dense = DenseConfig(**{k: v for k, v in BASE.items() if k in DenseConfig.__dataclass_fields__})
    per_layer = (dense.param_count() - V * 32 - 32) // dense.n_layers
    assert params == cfg.param_count() == V * 32 + 32 + n_unique * per_layer


def test_bad_configs_name_their_key():
    with pytest.raises(ConfigError, match="n_recursions"):
        MoRConfig(**{**BASE, **MIDDLE, "n_layers": 6}).validate()  # 4 middle layers over 3 recursions
    with pytest.raises(ConfigError, match="capacities"):
        MoRConfig(**{**BASE, "capacities": (0.5, 1.0, 0.2)}).validate()
    with pytest.raises(ConfigError, match="kv_sharing"):
        MoRConfig(**{**BASE, "capacities": (0.5, 0.5, 0.2), "kv_sharing": True}).validate()
    with pytest.raises(ConfigError, match="capacity_warmup_steps"):
        MoRConfig(**{**BASE, "router": "token_choice", "capacity_warmup_steps": 4}).validate()  # dropless: nothing to warm
    with pytest.raises(ConfigError, match="model.scan_unroll"):
        MoRConfig(**{**BASE, "scan_unroll": 2}).validate()  # no scan to unroll: refused, not ignored
    assert MoRConfig(**BASE).buffer_sizes(20) == [20, 14, 7]  # ceil(c T) for c = 1, 2/3, 1/3


def test_flops_per_token_follow_the_capacities():
    T = 256
    rec = MoRConfig(**{**BASE, **MIDDLE, "router": "none"})
    ec = MoRConfig(**{**BASE, **MIDDLE})
    attn = lambda C: 2 * 32 * 8 * (2 * 4 + 2 * 2) + 4 * C * 4 * 8  # noqa: E731  2 x projections + 4 keys H P
    ffn = 3 * 2 * 32 * rec.ffn_dim
    head = 2 * 32 * V
    assert rec.flops_per_token(T) == 3 * (head + 5 * (attn(T) + ffn))
    routers = 3 * (2 * 32 + 2 * (32 * 8 + 8))
    expect = head + 2 * (attn(T) + ffn) + sum(C / T * (attn(C) + ffn) for C in (256, 171, 86)) + routers
    assert ec.flops_per_token(T) == pytest.approx(3 * expect, rel=1e-12)


# --- the recursive transformer ------------------------------------------------------------------------

def test_recursive_transformer_is_a_vanilla_model_with_copied_weights():
    mor = model(router="none", **MIDDLE)
    dense_cfg = DenseConfig(**{k: v for k, v in {**BASE, **MIDDLE}.items() if k in DenseConfig.__dataclass_fields__})
    dense = nnx.eval_shape(lambda: Dense(dense_cfg, rngs=nnx.Rngs(0)))
    unrolled = jnp.asarray(mor.cfg.unrolled_layers())
    nnx.update(dense, {"blocks": {0: jax.tree.map(lambda a: a[unrolled], nnx.state(mor.blocks[0]))},
                       "embed": nnx.state(mor)["embed"], "final_norm": nnx.state(mor.final_norm)})
    graphdef, state = nnx.split(dense)
    fn = lambda s, t, p, g: nnx.merge(graphdef, s)(t, positions_BT=p, segment_ids_BT=g)[0]  # noqa: E731
    want = compiled(fn, state, TOKENS, POSITIONS, SEGMENTS)(state, TOKENS, POSITIONS, SEGMENTS)
    got = forward(router="none", **MIDDLE)()[0]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)  # same ops, scan vs unrolled: ~1 ulp


def test_capacity_one_without_gate_equals_the_recursive_transformer():
    """Expert choice keeping every token (capacities 1) with g = 1 runs the gather / attention-among-active /
    scatter path on all tokens: it must give the recursive transformer's logits."""
    fields = dict(capacities=(1.0, 1.0, 1.0), router_gate="none", **MIDDLE)
    rec, ec = model(router="none", **MIDDLE), model(**fields)
    shared = nnx.state(rec)
    state = nnx.merge_state(nnx.state(ec), nnx.State({k: shared[k] for k in ("blocks", "embed", "final_norm")}))
    np.testing.assert_allclose(forward(**fields)(state=state)[0], forward(router="none", **MIDDLE)()[0], atol=1e-6, rtol=1e-6)


# --- expert choice ------------------------------------------------------------------------------------

def test_expert_choice_keeps_ceil_capacity_tokens_nested():
    _, aux = forward()()
    prev = np.ones((B, T), bool)
    for (active, _, _), c in zip(aux["routing"], (1, 2 / 3, 1 / 3)):
        active = np.asarray(active)
        assert (active.sum(axis=1) == math.ceil(round(c * T, 6))).all()  # 24, 16, 8 in every row
        assert not (active & ~prev).any()  # a subset of the previous depth's
        prev = active
    assert 0.0 < float(aux["metrics"]["mor/mean_depth"]) and aux["metrics"]["mor/depth_frac"].shape == (4,)
    np.testing.assert_allclose(aux["metrics"]["mor/depth_frac"], [0, 1 / 3, 1 / 3, 1 / 3], atol=1e-6)


def _masked_recursion(mor, r, x_BTD, active_BT, gate_BT=None):
    """The reference: every token through the shared layers, attention restricted to active keys of the
    same document (causal), outputs kept only for active tokens, x + g (f(x) - x) with g = 0.1 sigmoid(w.x)
    (expert choice) or the given gate."""
    cfg, h = mor.cfg, x_BTD
    same_doc = (SEGMENTS[:, :, None] == SEGMENTS[:, None, :]) & (np.arange(T)[None, :, None] >= np.arange(T)[None, None, :])
    allowed_BTS = (same_doc & np.asarray(active_BT)[:, None, :]) | np.eye(T, dtype=bool)  # itself: no empty rows
    for j in range(cfg.block_layers):
        block = mor.layer(cfg.unique_index(r, j))
        q, k, v = block.mixer.qkv(block.mixer_norm(h), jnp.asarray(POSITIONS))
        k, v = (jnp.repeat(a, 2, axis=2) for a in (k, v))  # 4 query heads over 2 kv heads
        logits = jnp.einsum("bthp,bshp->bhts", q, k) / math.sqrt(cfg.dim_per_head)
        probs = jax.nn.softmax(jnp.where(allowed_BTS[:, None], logits, -jnp.inf), axis=-1)
        h = h + block.mixer.project_out(jnp.einsum("bhts,bshp->bthp", probs, v))
        h = h + block.mlp(block.mlp_norm(h), LayerContext(positions_BT=jnp.asarray(POSITIONS)))
    g = 0.1 * jax.nn.sigmoid(x_BTD @ mor.router_w[r]) if gate_BT is None else gate_BT
    return jnp.where(active_BT[..., None], x_BTD + g[..., None] * (h - x_BTD), x_BTD)


def test_gathered_path_equals_a_masked_reference_that_computes_every_token():
    mor = model()
    _, aux = forward()()
    for r, (active, x_in, x_out) in enumerate(aux["routing"]):
        np.testing.assert_allclose(x_out, _masked_recursion(mor, r, x_in, active), **TOL, err_msg=f"recursion {r}")


def _loss(graphdef, state, tokens):
    logits, aux = nnx.merge(graphdef, state)(tokens, train=True)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1))
    return ce + sum(aux["losses"].values())


@functools.cache
def router_grads(router, remat="none"):
    """Gradients w.r.t. the routers only (a smaller backward pass to compile) of 2 recursions of 1 layer; the
    parameters are the same whatever `remat` (the graph of a model built with that policy)."""
    state = nnx.state(model(router=router, n_layers=2, n_recursions=2, sharing="cycle"))
    graphdef = nnx.graphdef(model(router=router, n_layers=2, n_recursions=2, sharing="cycle", remat=remat))
    names = ("router_w", "aux_w1") if router == "expert_choice" else ("router_w",)
    routers = {n: state[n] for n in names}
    loss = lambda routers, tokens: _loss(graphdef, nnx.merge_state(state, nnx.State(routers)), tokens)  # noqa: E731
    return compiled(jax.grad(loss), routers, TOKENS)(routers, TOKENS)


def test_gradients_reach_the_router():
    for router in ("expert_choice", "token_choice"):  # 2 recursions of 1 layer: the backward pass compiles slowly
        for n, g in router_grads(router).items():
            assert float(jnp.sum(jnp.abs(g[...]))) > 0, (router, n)


def test_remat_recomputes_the_layers_and_keeps_the_gradients():
    """model.remat wraps each layer in jax.checkpoint (the forward jaxpr holds one per layer run: 2 recursions
    of 1 layer); the routers' gradients, which flow back through every layer, are unchanged. Recomputation
    runs the same fp32 ops; XLA may fuse them differently (last-bit differences): the dense remat test's
    tolerance."""
    graphdef = nnx.graphdef(model(n_layers=2, n_recursions=2, sharing="cycle", remat="full"))
    state = nnx.state(model(n_layers=2, n_recursions=2, sharing="cycle"))
    eqns = jax.make_jaxpr(lambda s: _loss(graphdef, s, TOKENS))(state).jaxpr.eqns
    assert sum("prevent_cse" in e.params for e in eqns) == 2  # jax.checkpoint's equations (named remat2 in jax 0.10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 router_grads("expert_choice"), router_grads("expert_choice", "full"))


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_gradients_of_every_parameter(remat):
    fields = dict(**MIDDLE, kv_sharing=True)  # first and last layers, a KV-shared depth
    state = nnx.state(model(**fields))
    grads = lambda graphdef: compiled(jax.grad(lambda s, t: _loss(graphdef, s, t)), state, TOKENS)(state, TOKENS)  # noqa: E731
    want, got = grads(nnx.graphdef(model(**fields))), grads(nnx.graphdef(model(**fields, remat=remat)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), want, got)


# --- generation ---------------------------------------------------------------------------------------

LENGTHS = (7, 12)
STEPS = 6


@functools.cache
def generation(**fields):
    """Teacher-forced cached decoding of right-padded prompts and the uncached causal forward of each row."""
    mor = model(**fields)
    graphdef, state = nnx.split(mor)
    rng = np.random.default_rng(1)
    full = rng.integers(0, V, (B, T)).astype(np.int32)
    prompts = full[:, : max(LENGTHS)].copy()
    for b, n in enumerate(LENGTHS):
        prompts[b, n:] = rng.integers(0, V, max(LENGTHS) - n)  # padding: random tokens, never seen
    cache = mor.init_cache(B, max(LENGTHS) + STEPS)
    prefill = compiled(lambda s, t, n, c: nnx.merge(graphdef, s).prefill(t, n, c), state, prompts, np.asarray(LENGTHS), cache)
    logits, cache = prefill(state, prompts, np.asarray(LENGTHS), cache)
    decode = compiled(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c), state, full[:, 0], cache)
    steps = [np.asarray(logits)]
    for i in range(STEPS - 1):
        logits, cache = decode(state, np.asarray([full[b, n + i] for b, n in enumerate(LENGTHS)], np.int32), cache)
        steps.append(np.asarray(logits))

    def fn(s, t, delta):
        return nnx.merge(graphdef, s)(t, causal_routing=True, return_routing=True, kv_delta=delta)

    zero = {j: (jnp.zeros((B, T, 2, 8)),) * 2 for j in range(mor.cfg.block_layers)} if mor.cfg.kv_sharing else None
    uncached = compiled(fn, state, full, zero)
    return full, steps, cache, (lambda tokens, delta=zero: uncached(state, tokens, delta))


EC_KV = dict(kv_sharing=True, generation_router="aux_router")
CAUSAL = [dict(router="token_choice", **MIDDLE), EC_KV]


@pytest.mark.parametrize("fields", CAUSAL, ids=["token-choice-middle-cycle", "expert-choice-aux-router-kv-sharing"])
def test_cached_generation_equals_the_uncached_forward(fields):
    full, steps, cache, uncached = generation(**fields)
    logits, aux = uncached(full)
    depths = sum(np.asarray(a, int) for a, _, _ in aux["routing"])
    assert len(np.unique(depths)) > 1  # tokens really take different depths
    for b, n in enumerate(LENGTHS):
        for i, got in enumerate(steps):
            np.testing.assert_allclose(got[b], logits[b, n - 1 + i], **TOL, err_msg=f"row {b} step {i}")
    # (first, last +) one per (depth, layer), or depth 1's only with kv sharing
    assert len(cache.layers) == (1 if fields.get("kv_sharing") else 2 + 3)


def test_generation_never_reads_future_tokens():
    """Changing tokens after position p leaves the causal routers' logits up to p unchanged; expert choice's
    top-k over the row (training) does change them, which is why generation cannot use it."""
    _, _, _, uncached = generation(**EC_KV)
    p = 11
    other = TOKENS.copy()
    other[:, p + 1:] = (other[:, p + 1:] + 1 + np.arange(T - p - 1)) % V
    np.testing.assert_array_equal(uncached(TOKENS)[0][:, : p + 1], uncached(other)[0][:, : p + 1])
    topk = forward()
    assert np.abs(np.asarray(topk(TOKENS)[0][:, : p + 1] - topk(other)[0][:, : p + 1])).max() > 1e-4


def test_kv_sharing_reuses_the_first_recursions_keys_and_values():
    """Perturbing the first recursion's K/V as depths >= 1 read them leaves depth 1 unchanged and changes
    the output of every later depth (of the tokens that reach it)."""
    _, _, _, uncached = generation(**EC_KV)
    _, base = uncached(TOKENS)
    delta = {0: (jnp.full((B, T, 2, 8), 0.5), jnp.full((B, T, 2, 8), -0.5))}
    _, moved = uncached(TOKENS, delta)
    for r, ((active, _, x0), (_, _, x1)) in enumerate(zip(base["routing"], moved["routing"])):
        change = np.abs(np.asarray(x1 - x0)).max(axis=-1)
        if r == 0:
            assert change.max() == 0
        else:
            assert (change[np.asarray(active)] > 1e-4).all(), f"depth {r + 1}"


# --- capacity warm-up, token choice with a capacity ---------------------------------------------------

WARMUP = 4


@functools.cache
def warmup_forward():
    """The default expert-choice model with a capacity warm-up over WARMUP steps, (step, tokens) -> (logits, aux)."""
    graphdef, state = nnx.split(model(capacity_warmup_steps=WARMUP))

    def fn(state, tokens, step):
        return nnx.merge(graphdef, state)(tokens, positions_BT=POSITIONS, segment_ids_BT=SEGMENTS, train=True, step=step,
                                          return_routing=True)

    f = compiled(fn, state, TOKENS, np.int32(0))
    return lambda step: f(state, TOKENS, np.int32(step))


def _kept_is_top_scored(kept, candidates, score, err):
    """Every kept token outscores every candidate left out (ties have probability 0 in fp32 here)."""
    for b in range(B):
        k, c = kept[b], candidates[b]
        assert not (k & ~c).any(), err
        if (c & ~k).any() and k.any():
            assert score[b][k].min() > score[b][c & ~k].max(), err


def test_capacity_warmup_starts_at_one_and_ends_at_the_capacities():
    """Step 0 keeps every token; step 2 of 4 keeps T - floor((T - C_r) 2 / 4) of each row, the top-scored of the
    previous depth's, computed on a T-slot buffer (= the masked reference); from step 4 on it is the model
    without warm-up (ceil(c T) tokens, same logits)."""
    mor = model(capacity_warmup_steps=WARMUP)
    for step, counts in ((0, (24, 24, 24)), (2, (24, 20, 16)), (WARMUP, (24, 16, 8)), (1000, (24, 16, 8))):
        logits, aux = warmup_forward()(step)
        prev = np.ones((B, T), bool)
        for r, ((active, x_in, x_out), n) in enumerate(zip(aux["routing"], counts)):
            active = np.asarray(active)
            assert (active.sum(axis=1) == n).all(), (step, r)
            _kept_is_top_scored(active, prev, np.asarray(x_in @ mor.router_w[r]), f"step {step} recursion {r}")
            if step == 2 and r == 1:  # 20 tokens, more than the 16 slots after warm-up: all of them computed
                np.testing.assert_allclose(x_out, _masked_recursion(mor, r, x_in, active), **TOL, err_msg=f"recursion {r}")
            prev = active
        if step >= WARMUP:
            want_logits, want = forward()()
            for (a, _, x), (wa, _, wx) in zip(aux["routing"], want["routing"]):
                np.testing.assert_array_equal(a, wa)
                np.testing.assert_allclose(x, wx, **TOL)
            np.testing.assert_allclose(logits, want_logits, **TOL)


TC_CAP = dict(router="token_choice", capacities=(1.0, 0.5, 0.25))


def test_token_choice_with_a_capacity_drops_the_lowest_scored_overflow():
    """Recursion r computes a buffer of ceil(c_r T) slots; it keeps the top-p_depth tokens among those still
    active that chose a depth > r (a dropped token stops), and equals the masked reference."""
    mor = model(**TC_CAP)
    assert mor.cfg.buffer_sizes(T) == [24, 12, 6]
    graphdef, state = nnx.split(mor)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(TOKENS, positions_BT=POSITIONS, segment_ids_BT=SEGMENTS))(state))
    assert "f32[2,12,32]" in jaxpr and "f32[2,6,32]" in jaxpr  # the recursions' gathered buffers
    _, aux = forward(**TC_CAP)()
    probs = np.asarray(jax.nn.softmax(aux["routing"][0][1] @ mor.router_w[...], axis=-1))
    choice, gate = probs.argmax(-1) + 1, probs.max(-1)
    prev, dropped = np.ones((B, T), bool), 0
    for r, ((active, x_in, x_out), C) in enumerate(zip(aux["routing"], (24, 12, 6))):
        active, candidates = np.asarray(active), prev & (choice > r)
        assert (active.sum(axis=1) == np.minimum(candidates.sum(axis=1), C)).all(), r
        _kept_is_top_scored(active, candidates, gate, f"recursion {r}")
        dropped += (candidates & ~active).sum()
        np.testing.assert_allclose(x_out, _masked_recursion(mor, r, x_in, active, gate), **TOL, err_msg=f"recursion {r}")
        prev = active
    assert dropped > 0  # the capacity really bound


def test_decoding_skips_a_depth_no_row_reaches(monkeypatch):
    """A decode step runs a depth only if some row's token is active there (a lax.cond, so only the branch taken
    runs): counted by a callback in each layer's cache attention, with the auxiliary router of depths >= 2
    switched off (no token continues) and as trained (the same compiled step runs depth 2 for some row)."""
    _, _, cache, _ = generation(**EC_KV)  # 12 and 17 of 18 slots used: one more step fits
    mor = model(**EC_KV)
    graphdef, state = nnx.split(mor)
    calls = []

    def counted(q, *args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return cache_attention(q, *args, **kwargs)

    from effax.models import mor as mor_lib
    cache_attention = mor_lib.cache_attention
    monkeypatch.setattr(mor_lib, "cache_attention", counted)
    decode = compiled(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c), state, TOKENS[:, 0], cache)
    off = nnx.merge_state(state, nnx.State({"aux_w1": state["aux_w1"].replace(value=state["aux_w1"][...].at[1:].set(0.0))}))
    for s, least, most in ((off, 1, 1), (state, 2, 3)):  # aux logit 0 at depths >= 2: no token continues there
        calls.clear()
        jax.block_until_ready(decode(s, TOKENS[:, 0], cache))
        jax.effects_barrier()
        assert least <= len(calls) <= most


def test_kv_shared_depths_honour_the_attention_impl():
    """With model.attention_impl=blockwise the KV-shared depths run the skeleton's attention (its custom VJP:
    one call per layer run, 3 here instead of the first depth's 1) and give the masked einsum's logits, on
    packed rows, each depth >= 1 holding a subset of the row in its buffer."""
    _, _, _, uncached = generation(**EC_KV)  # the masked einsum ("auto" at T = 24 on CPU)
    graphdef, state = nnx.split(model(**EC_KV, attention_impl="blockwise"))
    fn = lambda s, t: nnx.merge(graphdef, s)(t, causal_routing=True)[0]  # noqa: E731
    assert str(jax.make_jaxpr(fn)(state, TOKENS)).count("custom_vjp_call") == 3
    np.testing.assert_allclose(compiled(fn, state, TOKENS)(state, TOKENS), uncached(TOKENS)[0], **TOL)
