"""SambaY, YOCO and Hydra (models/hybrid.py; layers/yoco.py, layers/chunk_moe.py, layers/pkm.py): the GMU on a
hand case, the cross-decoder reading the one shared KV cache, chunk-level routing and the product-key lookup
against numpy references, cached decoding = the full forward, presets' layouts and counts.

One tiny model holds every layer type these presets add to the skeleton, once each, in the order they need: SambaY's
memory Mamba (with Hydra's chunk-level MoE as its feed-forward), the KV layer (with the product-key memory), a GMU
and a cross-attention layer (no feed-forward: compile time): one set of compiles for all. (Their other layers, `mamba2`, `swa`, `block_sparse`,
are the skeleton's, with cached-decoding tests of their own.)
Parameters drawn by numpy (tests/attention_testing.py), everything compiled with XLA's backend optimisation off.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_testing import compiled, filled
from effax.layers import yoco
from effax.layers.mixer import LayerContext
from effax.models import registry
from effax.models.hybrid import HybridConfig, HydraConfig, sambay_pattern, samba_yoco_pattern, yoco_pattern

TINY = HydraConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=32, init_std=0.3,
                   pattern=("mamba2_memory+chunk_moe", "yoco_kv+pkm", "gmu+none", "yoco_cross+none"), ssm_state=4, ssm_head_dim=8,
                   chunk_size=4, n_experts=4, top_k=2, moe_chunk=4, pkm_heads=2, pkm_keys=4, pkm_topk=2, pkm_key_dim=8,
                   gmm_impl="reference")  # the exact ragged_dot: compiles in half the time of the xla grouped matmul
LENGTHS = (3, 11, 17)  # right-padded prompts ending inside routing chunks of 4; decoding crosses chunk starts
N_STEPS = 6
# fp32, the same math in another order (chunked vs recurrent SSM, full vs cached attention): the skeleton's 5e-5.
TOL = 5e-5


@functools.cache
def _model():
    model = filled(lambda: registry.build(TINY, rngs=nnx.Rngs(0)), std=0.3)
    return model, *nnx.split(model)


def _layer(index: int, slot: str):
    """Layer `index`'s mixer or mlp as a standalone module (each layer here is its own scan group of R = 1)."""
    graphdef, state = nnx.split(getattr(_model()[0].blocks[index].layers[0], slot))
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[0]), state))


def params(module) -> dict:
    return {path[0]: np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# --- the Gated Memory Unit ---------------------------------------------------------------------------------

def test_gmu_equation_on_a_hand_case():
    """x = [1, -1], W_in = [[1, 0], [0, 2]] -> W_in x = [1, -2]; silu(1) = 0.7310586, silu(-2) = -0.2384058;
    m = [2, 3] -> silu(W_in x) * m = [1.4621172, -0.7152175]; W_out = [[1, 1], [0, 1]] -> y = [1.4621172, 0.7468996].
    With the norm (gain [1, 0.5]): rms = sqrt((1.4621172² + 0.7152175²) / 2) = 1.1509393, so the normalised gated
    memory is [1.2703686, -0.6214207] * [1, 0.5] and y = [1.2703686, 0.9596582]."""
    x, m = jnp.array([[[1.0, -1.0]]]), jnp.array([[[2.0, 3.0]]])
    w_in, w_out = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(np.asarray(yoco.gmu(x, m, w_in, w_out))[0, 0], [1.4621172, 0.7468996], rtol=1e-6)
    with_norm = yoco.gmu(x, m, w_in, w_out, jnp.array([1.0, 0.5]), eps=0.0)
    np.testing.assert_allclose(np.asarray(with_norm)[0, 0], [1.2703686, 0.9596582], rtol=1e-6)


# --- standalone layers against numpy: cross-attention, chunk-level routing, product keys --------------------

T = 10
POSITIONS = np.concatenate([np.arange(6), np.arange(4)])[None]  # two packed documents: chunks 0-3, 4-5 | 0-3
SEGMENTS = np.array([[1] * 6 + [2] * 4], np.int32)


@functools.cache
def _standalone():
    """x, carried K/V (and a copy with V perturbed at one token), and the three layers' outputs: one compile."""
    rng = np.random.default_rng(3)
    K, P = TINY.kv_heads, TINY.dim_per_head
    x = rng.standard_normal((1, T, TINY.d_model)).astype(np.float32)
    k, v = (rng.standard_normal((1, T, K, P)).astype(np.float32) for _ in range(2))
    v2 = v.copy()
    v2[0, 2] += 1.0
    layers = {"cross": _layer(3, "mixer"), "moe": _layer(0, "mlp"), "pkm": _layer(1, "mlp"), "memory": _layer(0, "mixer")}
    graphdef, state = nnx.split(layers)

    def run(state, x, k, v, v2, pos, seg):
        mods = nnx.merge(graphdef, state)
        ctx = lambda v: LayerContext(positions_BT=pos, segment_ids_BT=seg, carry={yoco.KEYS: k, yoco.VALUES: v})  # noqa: E731
        memory_ctx = ctx(v)
        return {"cross": mods["cross"](x, ctx(v)), "cross_perturbed": mods["cross"](x, ctx(v2)),
                "moe": mods["moe"](x, ctx(v)), "pkm": mods["pkm"](x, ctx(v)),
                "mamba": mods["memory"](x, memory_ctx), "memory": memory_ctx.carry[yoco.MEMORY]}

    args = (state, *map(jnp.asarray, (x, k, v, v2, POSITIONS, SEGMENTS)))
    out = compiled(run, *args)(*args)
    return x[0].astype(np.float64), k[0], v[0], v2[0], {n: np.asarray(o, np.float64)[0] for n, o in out.items()}, layers


def _rope(x_THP, pos_T, theta):
    P = x_THP.shape[-1]
    ang = pos_T[:, None, None] * theta ** (-np.arange(0, P, 2) / P)
    x1, x2 = x_THP[..., : P // 2], x_THP[..., P // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _close(got, want, rtol=1e-5):
    assert np.abs(got - want).max() <= rtol * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())


def test_the_cross_layer_attends_the_carried_keys_and_values():
    """yoco_cross = o(softmax(q k^T / sqrt(P)) v) with q its own (RoPE) and k, v the yoco_kv layer's, causal
    within each packed document; perturbing one token's carried value changes exactly the outputs that see it."""
    x, k, v, v2, out, layers = _standalone()
    p = params(layers["cross"])
    pos, seg = POSITIONS[0], SEGMENTS[0]

    def reference(v):
        q = _rope(np.einsum("td,dhp->thp", x, p["q"]), pos, TINY.rope_theta)
        logits = np.einsum("thp,sp->hts", q, k[:, 0]) / np.sqrt(q.shape[-1])
        seen = (np.arange(T)[None, :] <= np.arange(T)[:, None]) & (seg[None, :] == seg[:, None])
        w = np.where(seen, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
        att = np.einsum("hts,sp->thp", w / w.sum(-1, keepdims=True), v[:, 0])
        return np.einsum("thp,hpd->td", att, p["o"])

    _close(out["cross"], reference(v))
    _close(out["cross_perturbed"], reference(v2))
    changed = np.abs(out["cross_perturbed"] - out["cross"]).max(-1) > 1e-6
    np.testing.assert_array_equal(changed, (np.arange(T) >= 2) & (seg == 1))  # token 2's value: later tokens of doc 1


def _silu(a):
    return a / (1 + np.exp(-a))


def test_the_memory_is_the_ssm_output_before_the_gated_norm():
    """mamba2_memory hands on m with out = (RMSNorm(m * silu(z)) * w) W_out, z the gate columns of in_proj:
    the pre-gate output (ArchScale's gmu_save), not the block's output nor the gated value."""
    x, _, _, _, out, layers = _standalone()
    p = params(layers["memory"])
    z = x @ p["in_proj"][:, : TINY.expand * TINY.d_model]
    g = out["memory"] * _silu(z)
    want = (g / np.sqrt(np.mean(g**2, -1, keepdims=True) + TINY.norm_eps) * p["norm"]) @ p["out_proj"]
    _close(out["mamba"], want)


def test_chunk_moe_routes_every_chunk_by_its_first_token():
    """Each token's experts and gates are those of the router logits of its chunk's first token (chunks of 4
    positions, restarting per document), applied to the token's own input: softmax, top-2, renormalised."""
    x, _, _, _, out, layers = _standalone()
    p = params(layers["moe"])
    first = np.arange(T) - POSITIONS[0] % TINY.moe_chunk
    scores = np.exp(x[first] @ p["router"])
    scores /= scores.sum(-1, keepdims=True)
    want = np.zeros_like(x)
    for t in range(T):
        top = np.argsort(-scores[t])[: TINY.top_k]
        gates = scores[t, top] / scores[t, top].sum()
        for e, g in zip(top, gates):
            h = _silu(x[t] @ p["expert_gate"][e]) * (x[t] @ p["expert_up"][e])
            want[t] += g * (h @ p["expert_down"][e])
    _close(out["moe"], want)


def test_product_key_memory_reads_the_exact_top_k_of_all_product_keys():
    """Brute force over all n² keys (score s1_i + s2_j) per head: softmax over the best k, a weighted sum of
    their value rows, summed over heads."""
    x, _, _, _, out, layers = _standalone()
    p = params(layers["pkm"])
    n, k = TINY.pkm_keys, TINY.pkm_topk
    q = np.einsum("td,dhc->thc", x, p["query"])
    half = q.shape[-1] // 2
    want = np.zeros_like(x)
    for h in range(TINY.pkm_heads):
        full = (q[:, h, :half] @ p["keys1"][h].T)[:, :, None] + (q[:, h, half:] @ p["keys2"][h].T)[:, None, :]
        full = full.reshape(T, n * n)  # key (i, j) at i * n + j
        for t in range(T):
            best = np.argsort(-full[t])[:k]
            w = np.exp(full[t, best] - full[t, best].max())
            want[t] += (w / w.sum()) @ p["values"][best]
    _close(out["pkm"], want)


# --- the whole model: cached decoding and the shared cache -----------------------------------------------

@functools.cache
def _decoded():
    """Prefill right-padded prompts, decode N_STEPS tokens; also the first step again from a cache whose shared
    values were perturbed. Returns (logits per step, the perturbed step's logits, prompts, continuation, cache)."""
    model, graphdef, state = _model()
    T, V, B = max(LENGTHS), TINY.vocab_size, len(LENGTHS)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, n).tolist() for n in LENGTHS]
    cont = rng.integers(0, V, (B, N_STEPS))
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)  # padding: random tokens, which would leak if seen
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    cache = model.init_cache(B, T + N_STEPS)
    args = (state, jnp.asarray(tokens), jnp.asarray(LENGTHS), cache)
    logits, cache = compiled(lambda s, t, n, c: nnx.merge(graphdef, s).prefill(t, n, c), *args)(*args)
    decode = compiled(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c), state, jnp.asarray(cont[:, 0]), cache)
    kv = cache.shared[yoco.SHARED_KV]
    perturbed = dataclasses.replace(cache, shared={yoco.SHARED_KV: dataclasses.replace(kv, v=kv.v + 1.0)})
    perturbed_logits = np.asarray(decode(state, jnp.asarray(cont[:, 0]), perturbed)[0])
    steps = [np.asarray(logits)]
    for i in range(N_STEPS):
        logits, cache = decode(state, jnp.asarray(cont[:, i]), cache)
        steps.append(np.asarray(logits))
    return steps, perturbed_logits, prompts, cont, cache


def test_cached_decoding_equals_the_full_forward():
    """Prefill (chunked SSMs, KV written once into the shared cache, each row's chunk routing) then step
    decoding (recurrent SSMs, the memory carried to the GMU in the same step, cross-attention over the shared
    cache, routing kept across steps and renewed at chunk starts) against the full forward on the real tokens."""
    steps, _, prompts, cont, _ = _decoded()
    _, graphdef, state = _model()
    full = np.zeros((len(LENGTHS), max(LENGTHS) + N_STEPS), np.int32)
    for b, p in enumerate(prompts):
        full[b, : len(p) + N_STEPS] = p + cont[b].tolist()
    forward = compiled(lambda s, t: nnx.merge(graphdef, s)(t)[0], state, jnp.asarray(full))
    logits = np.asarray(forward(state, jnp.asarray(full)))
    for b, p in enumerate(prompts):
        for i, got in enumerate(steps):
            np.testing.assert_allclose(got[b], logits[b, len(p) - 1 + i], atol=TOL, rtol=TOL, err_msg=f"row {b} step {i}")


def test_the_cross_decoder_has_no_cache_of_its_own_and_reads_the_shared_one():
    steps, perturbed, _, _, cache = _decoded()
    kinds = [spec.mixer for spec in TINY.layer_specs]
    for kind, (state,) in zip(kinds, cache.layers):  # one layer per scan group here
        if kind in ("yoco_kv", "yoco_cross", "gmu"):
            assert state is None, kind
    full_kv = [a for a in jax.tree.leaves(cache) if a.shape[-3:] == (max(LENGTHS) + N_STEPS, TINY.kv_heads, TINY.dim_per_head)]
    assert len(full_kv) == 2  # one full-length K and V in the whole cache: the shared pair (others are rings)
    assert np.abs(perturbed - steps[1]).max() > 1e-2  # the decode step reads the shared values


# --- presets -------------------------------------------------------------------------------------------------

def test_presets_follow_archscale_and_refuse_bad_layouts():
    assert sambay_pattern(8) == ("mamba2", "swa", "mamba2", "swa", "mamba2_memory", "yoco_kv", "gmu", "yoco_cross")
    assert sambay_pattern(16)[8:] == ("mamba2_memory", "yoco_kv") + ("gmu", "yoco_cross") * 3
    assert samba_yoco_pattern(8) == ("mamba2", "swa", "mamba2", "swa", "mamba2", "yoco_kv", "yoco_cross", "yoco_cross")
    assert yoco_pattern(8) == ("swa",) * 5 + ("yoco_kv", "yoco_cross", "yoco_cross")
    sambay = HybridConfig.preset("sambay", n_layers=12)
    assert sambay.nope and sambay.sliding_window == 128 and len(sambay.pattern) == 12
    assert type(HybridConfig.preset("hydra")) is HydraConfig
    with pytest.raises(registry.ConfigError, match="divisible by 4"):
        HybridConfig.preset("sambay", n_layers=6)
    with pytest.raises(registry.ConfigError, match="after the yoco_kv"):
        HybridConfig(n_layers=2, pattern=("yoco_cross", "yoco_kv")).validate()
    with pytest.raises(registry.ConfigError, match="exactly one mamba2_memory"):
        HybridConfig(n_layers=2, pattern=("mamba2", "gmu")).validate()
    with pytest.raises(registry.ConfigError, match="model.type=hydra"):
        HybridConfig(n_layers=1, pattern=("mamba2+chunk_moe",)).validate()


def test_param_count_matches_the_built_model():
    model = nnx.eval_shape(lambda: registry.build(TINY, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == TINY.param_count()
    # the cross layers have q and o only; the KV layer is a full attention layer
    assert yoco.YocoCross.param_count(TINY) == 2 * TINY.d_model * TINY.n_heads * TINY.dim_per_head


def test_nope_drops_the_positional_encoding():
    from effax.layers.attention import Attention

    cfg = dataclasses.replace(HybridConfig.preset("sambay", n_layers=4, d_model=16, n_heads=2), nope=True)
    layer = filled(lambda: Attention(cfg, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 16)), jnp.float32)
    q0, k0, _ = layer.qkv(x, jnp.arange(3)[None])
    q1, k1, _ = layer.qkv(x, jnp.arange(3)[None] + 5)
    np.testing.assert_array_equal(np.asarray(q0), np.asarray(q1))
    np.testing.assert_array_equal(np.asarray(k0), np.asarray(k1))
