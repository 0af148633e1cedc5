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


def _masked_recursion(mor, r, x_BTD, active_BT):
    """The reference: every token through the shared layers, attention restricted to active keys of the
    same document (causal), outputs kept only for active tokens, x + g (f(x) - x) with g = 0.1 sigmoid(w.x)."""
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
    g = 0.1 * jax.nn.sigmoid(x_BTD @ mor.router_w[r])
    return jnp.where(active_BT[..., None], x_BTD + g[..., None] * (h - x_BTD), x_BTD)


def test_gathered_path_equals_a_masked_reference_that_computes_every_token():
    mor = model()
    _, aux = forward()()
    for r, (active, x_in, x_out) in enumerate(aux["routing"]):
        np.testing.assert_allclose(x_out, _masked_recursion(mor, r, x_in, active), **TOL, err_msg=f"recursion {r}")


def test_gradients_reach_the_router():
    for router in ("expert_choice", "token_choice"):  # 2 recursions of 1 layer: the backward pass compiles slowly
        mor = model(router=router, n_layers=2, n_recursions=2, sharing="cycle")
        graphdef, state = nnx.split(mor)
        names = ("router_w", "aux_w1") if router == "expert_choice" else ("router_w",)

        def loss(routers, tokens):  # gradients w.r.t. the routers only: a smaller backward pass to compile
            logits, aux = nnx.merge(graphdef, nnx.merge_state(state, nnx.State(routers)))(tokens, train=True)
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1))
            return ce + sum(aux["losses"].values())

        routers = {n: state[n] for n in names}
        grads = compiled(jax.grad(loss), routers, TOKENS)(routers, TOKENS)
        for n in names:
            assert float(jnp.sum(jnp.abs(grads[n][...]))) > 0, (router, n)


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
