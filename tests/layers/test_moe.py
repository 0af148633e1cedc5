"""The MoE feed-forward (layers/moe.py) against a plain-jnp dense loop over experts (moe_reference.py),
forward and gradients, for every router and expert set and both dispatch paths; drops pass through the
residual and are counted; empty experts and every token on one expert; zero / copy / constant experts;
counts; layer selection; config errors; the aux-free Buffer; cached decoding; expert choice refuses it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_reference  # tests/layers is on sys.path
from effax.layers import moe_dispatch
from effax.layers.mixer import LayerContext
from effax.layers.moe import CARRY, MoE
from effax.models.dense import DenseConfig
from effax.models.moe import MoEConfig, MoEModel
from effax.models.registry import ConfigError

B, T, D = 2, 8, 16
BASE = MoEConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=2, d_ff=32, n_experts=4, top_k=2, expert_d_ff=8,
                 init_std=0.3)
# fp32, O(1) values: the same products summed in another order (grouped tiles, slots, the gate-weighted sum
# over k vs one [N, E] gate matrix): observed <= 2e-6; 2e-5 leaves room without hiding a wrong token or
# expert (those are O(0.1) errors).
TOL = {"rtol": 2e-5, "atol": 2e-5}

CONFIGS = {
    "top-k softmax, shared expert": {"n_shared_experts": 1},
    "sigmoid, aux-free bias, no renormalisation": {"balance": "aux_free", "router_score": "sigmoid",
                                                    "router_renormalize": False},
    "MoGE": {"router": "moge", "n_groups": 2},
    "MoE++ with BigMac": {"n_zero_experts": 1, "n_copy_experts": 1, "n_constant_experts": 2, "gating_residual": True,
                          "router_mlp": True, "bigmac_dim": 8},
    "expert choice": {"router": "expert_choice", "dispatch": "capacity", "balance": "none"},
    "capacity that drops nothing": {"dispatch": "capacity", "capacity_factor": 2.0},  # C = T k 2 / E = T
    "capacity that drops": {"dispatch": "capacity", "capacity_factor": 0.25},  # C = 1 slot per expert and row
}


def _inputs(R):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    d = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)  # a random cotangent for the gradients
    carry = jnp.asarray(rng.standard_normal((B, T, R)), jnp.float32)
    return x, d, carry


def _layer(cfg, seed=0):
    layer = MoE(cfg, rngs=nnx.Rngs(seed))
    if cfg.balance == "aux_free":
        layer.bias[...] = jnp.linspace(-0.3, 0.3, layer.bias.shape[0])  # a bias that changes some choices
    return layer


def _run_layer(layer, x, d, carry, train=False):
    """(y, carry out, reported values, grads by parameter name, dx) of sum(layer(x) * d), jitted."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        ctx = LayerContext(positions_BT=jnp.zeros(x.shape[:2], jnp.int32), train=train,
                           carry={CARRY: carry} if layer.cfg.gating_residual else {})
        y = nnx.merge(graphdef, params, rest)(x, ctx)
        return jnp.sum(y * d), (y, ctx.carry, ctx.values)

    (_, (y, carry_out, values)), (g, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    grads = {"_".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(g)}
    return y, carry_out, values, grads, dx


def _run_reference(layer, x, d, carry, capacity=None):
    p = moe_reference.params_of(layer)
    bias = layer.bias[...] if layer.cfg.balance == "aux_free" else None
    keep = None
    if capacity is not None:  # which choices survive: decided by hand, outside the differentiated function
        order = moe_reference.choice_order(moe_reference.gates(p, layer.cfg, x, bias), layer.cfg.top_k)
        keep = jnp.asarray(moe_reference.sequence_order_keep(order, layer.cfg.n_experts, capacity, B, T))

    def loss(p, x):
        y, logits = moe_reference.moe(p, layer.cfg, x, bias_R=bias, carry=carry, keep_NK=keep)
        return jnp.sum(y * d), (y, logits)

    (_, (y, logits)), (grads, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(p, x)
    return y, logits, grads, dx


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_equals_a_dense_loop_over_experts_forward_and_gradients(name):
    cfg = dataclasses.replace(BASE, **CONFIGS[name])
    layer = _layer(cfg)
    x, d, carry = _inputs(layer.router.shape[1])
    y, carry_out, values, grads, dx = _run_layer(layer, x, d, carry)
    capacity = None
    if cfg.dispatch == "capacity" and cfg.router != "expert_choice":
        capacity = int(-(-T * cfg.top_k * cfg.capacity_factor // cfg.n_experts))
    ref_y, ref_logits, ref_grads, ref_dx = _run_reference(layer, x, d, carry, capacity)
    np.testing.assert_allclose(y, ref_y, **TOL)
    np.testing.assert_allclose(dx, ref_dx, **TOL)
    assert set(grads) == set(ref_grads)
    for key in grads:
        np.testing.assert_allclose(grads[key], ref_grads[key], err_msg=key, **TOL)
    if cfg.gating_residual:
        np.testing.assert_allclose(carry_out[CARRY], ref_logits, **TOL)  # handed to the next MoE layer
    if name == "capacity that drops":
        assert 0.2 < float(values["moe/dropped"]) < 1.0
    if name == "capacity that drops nothing":  # and it is the dropless result, gradients included
        assert float(values["moe/dropped"]) == 0.0
        dropless = _run_layer(_layer(dataclasses.replace(cfg, dispatch="dropless")), x, d, carry)
        np.testing.assert_allclose(y, dropless[0], **TOL)
        for key in grads:
            np.testing.assert_allclose(grads[key], dropless[3][key], err_msg=key, **TOL)


def test_dropped_fraction_is_the_share_of_assignments_past_capacity():
    cfg = dataclasses.replace(BASE, **CONFIGS["capacity that drops"])
    layer = _layer(cfg)
    x, d, carry = _inputs(4)
    _, _, values, _, _ = _run_layer(layer, x, d, carry)
    order = moe_reference.choice_order(moe_reference.gates(moe_reference.params_of(layer), cfg, x), 2)
    keep = moe_reference.sequence_order_keep(order, 4, 1, B, T)
    assert abs(float(values["moe/dropped"]) - (1 - keep.mean())) < 1e-6


@pytest.mark.parametrize("path", ["dropless", "capacity"])
def test_empty_experts_and_every_token_on_one_expert_forward_and_backward(path):
    E, F = 4, 8
    rng = np.random.default_rng(1)
    w = moe_dispatch.ExpertWeights(*(jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
                                     for s in ((E, D, F), (E, D, F), (E, F, D))))
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    gate_BT1 = jnp.asarray(rng.uniform(0.1, 1.0, (B, T, 1)), jnp.float32)
    expert_BT1 = jnp.full((B, T, 1), 2, jnp.int32)  # experts 0, 1 and 3 get nothing

    def run(x, w, gate):
        if path == "dropless":
            return moe_dispatch.dropless(x, expert_BT1, gate, w)
        token_BEC, slot_gate_BEC, kept, _ = moe_dispatch.capacity_slots(expert_BT1, gate, E, T)
        return moe_dispatch.capacity(x, token_BEC, slot_gate_BEC, w)

    def reference(x, w, gate):
        return gate * moe_reference.swiglu(x, w.gate_EDF[2], w.up_EDF[2], w.down_EFD[2])

    out, grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(run(*a) ** 2), (0, 1, 2)))(x, w, gate_BT1)
    ref, ref_grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(reference(*a) ** 2), (0, 1, 2)))(x, w, gate_BT1)
    np.testing.assert_allclose(out, ref, **TOL)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, **TOL)
    assert not np.any(grads[1].gate_EDF[np.array([0, 1, 3])])  # empty experts: exactly zero gradient


def test_zero_copy_and_constant_experts_do_what_their_names_say():
    """Routing forced through the gating residual: router weights 0, W_g = identity, and the previous
    layer's logits 50 on one expert, so every token takes that expert alone with gate 1."""
    cfg = dataclasses.replace(BASE, n_experts=2, top_k=1, n_zero_experts=1, n_copy_experts=1, n_constant_experts=1,
                              gating_residual=True)
    layer = _layer(cfg)
    layer.router[...] = jnp.zeros_like(layer.router[...])
    layer.gate_residual[...] = jnp.eye(5)
    x, d, _ = _inputs(5)

    @jax.jit
    def forced(carry):
        ctx = LayerContext(positions_BT=jnp.zeros((B, T), jnp.int32), carry={CARRY: carry})
        return layer(x, ctx), ctx.values

    def route_to(j):
        return forced(jnp.broadcast_to(50.0 * jax.nn.one_hot(j, 5), (B, T, 5)))

    zero, values = route_to(2)
    assert not np.any(zero) and float(values["moe/zero_frac"]) == 1.0
    copy, values = route_to(3)
    np.testing.assert_array_equal(copy, x)
    assert float(values["moe/copy_frac"]) == 1.0
    constant, values = route_to(4)
    mix = jax.nn.softmax(x @ layer.constant_mix[...][0], -1)
    np.testing.assert_allclose(constant, mix[..., :1] * x + mix[..., 1:] * layer.constant_value[...][0], **TOL)
    assert float(values["moe/constant_frac"]) == 1.0


# --- counts, layer selection, config ----------------------------------------------------------------


def test_param_count_matches_the_built_model_and_active_counts_follow_the_routing():
    rich = dataclasses.replace(BASE, n_shared_experts=1, n_zero_experts=1, n_copy_experts=1, n_constant_experts=2,
                               gating_residual=True, router_mlp=True, bigmac_dim=8, balance="aux_free")
    for cfg in (BASE, rich):
        model = nnx.eval_shape(lambda cfg=cfg: MoEModel(cfg, rngs=nnx.Rngs(0)))
        assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.param_count()  # the bias is not one
    expert = 3 * D * 8
    layer = MoE.param_count(BASE) - 4 * expert
    assert MoE.active_param_count(BASE) == layer + 2 * expert  # top-2 of 4
    assert MoE.flops_per_token(BASE, 8) == 2 * (layer + 2 * expert)
    # 4 FFN + 4 zero-computation experts, top-2: under balanced routing one FFN expert per token
    zc = dataclasses.replace(BASE, n_zero_experts=2, n_copy_experts=1, n_constant_experts=1)
    assert MoE.flops_per_token(zc, 8) == 2 * (D * 8 + expert)  # router (8 outputs) + 1 expert; the rest is free


def test_active_parameters_equal_the_dense_model_up_to_the_router():
    moe = MoEConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, d_ff=192, n_experts=8, top_k=2,
                    n_shared_experts=1)  # expert_d_ff = 192 / 3 = 64: 2 routed + 1 shared = 192 wide
    dense = DenseConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, d_ff=192)
    assert moe.param_count(active=True) - 4 * 64 * 8 == dense.param_count()  # router: D x E per layer
    assert moe.flops_per_token(128) - 3 * 4 * 2 * 64 * 8 == dense.flops_per_token(128)


def test_moe_layers_are_chosen_by_moe_every_or_by_pattern():
    ffns = lambda cfg: [s.ffn for s in cfg.layer_specs]  # noqa: E731
    assert ffns(dataclasses.replace(BASE, n_layers=4)) == ["moe"] * 4
    assert ffns(dataclasses.replace(BASE, n_layers=4, moe_every=2)) == ["swiglu", "moe"] * 2
    first_dense = dataclasses.replace(BASE, n_layers=4, pattern=("attn+swiglu", "attn+moe", "attn+moe", "attn+moe"))
    assert ffns(first_dense) == ["swiglu", "moe", "moe", "moe"]
    with pytest.raises(ValueError, match="needs model.type=moe"):
        MoE(DenseConfig(d_model=16, n_heads=2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("changes, needle", [
    ({"top_k": 9}, "model.top_k=9 exceeds the 4 experts"),
    ({"expert_d_ff": 0, "d_ff": 32, "top_k": 3}, "model.expert_d_ff=0 splits the dense width 32"),
    ({"router": "moge", "n_groups": 3}, "model.n_groups=3 must be >= 2 and divide"),
    ({"router": "expert_choice"}, "set model.dispatch=capacity"),
    ({"router": "expert_choice", "dispatch": "capacity"}, "set model.balance=none"),
    ({"capacity_factor": 0.0}, "model.capacity_factor must be > 0"),
    ({"n_zero_experts": -1}, "model.n_zero_experts must be >= 0"),
])
def test_bad_moe_settings_fail_naming_the_key(changes, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        dataclasses.replace(BASE, **changes).validate()


# --- in the model: the aux-free Buffer, decoding ------------------------------------------------------


@functools.cache
def _model():
    """One model for the tests below (an eager init compiles per parameter shape): aux-free balancing,
    zero and copy experts, gating residuals over three MoE layers."""
    cfg = dataclasses.replace(BASE, n_layers=3, balance="aux_free", bias_update_rate=0.01, n_zero_experts=1,
                              n_copy_experts=1, gating_residual=True)
    return MoEModel(cfg, rngs=nnx.Rngs(1))


def test_aux_free_bias_moves_only_in_training_by_u_times_the_sign():
    model = _model()
    tokens = jnp.arange(B * T).reshape(B, T) % 64
    bias = jax.jit(lambda train: model(tokens, train=train)[1]["state"]["blocks"][0]["layers"][0]["mlp"]["bias"][...],
                   static_argnums=0)
    moved = np.abs(np.asarray(bias(True)))  # [layers, E], from 0
    assert np.all(np.isclose(moved, 0.0) | np.isclose(moved, 0.01)) and np.any(moved)
    assert not np.any(bias(False))


def test_cached_decoding_equals_the_full_forward_with_gating_residuals():
    """Prefill right-padded prompts, decode a continuation, compare each step's logits with the full
    forward: routing is per token, and the gating residual's carry runs through the decode scan too."""
    model = _model()
    lengths = jnp.array([3, 6])
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)), jnp.int32)

    @jax.jit
    def run(tokens):
        cache = model.init_cache(2, 10)
        prompt = jnp.where(jnp.arange(6)[None] < lengths[:, None], tokens[:, :6], 63)  # padding that would leak
        first, cache = model.prefill(prompt, lengths, cache)
        steps = []
        for i in range(3):
            logits, cache = model.decode_step(tokens[jnp.arange(2), lengths + i], cache)
            steps.append(logits)
        full, _ = model(tokens)
        return first, jnp.stack(steps, 1), full

    first, steps, full = run(tokens)
    rows = jnp.arange(2)
    np.testing.assert_allclose(first, full[rows, lengths - 1], **TOL)
    for i in range(3):
        np.testing.assert_allclose(steps[:, i], full[rows, lengths + i], **TOL)


def test_expert_choice_refuses_to_decode_and_says_why():
    cfg = dataclasses.replace(BASE, **CONFIGS["expert choice"])
    model = nnx.eval_shape(lambda: MoEModel(cfg, rngs=nnx.Rngs(0)))  # refused before any parameter is read
    with pytest.raises(ConfigError, match="expert_choice cannot decode.*depends on the tokens after it"):
        model.init_cache(1, 8)
    layer = _layer(cfg)
    ctx = LayerContext(positions_BT=jnp.zeros((1, 4), jnp.int32), valid_BT=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="non-causal"):
        layer(jnp.ones((1, 4, D)), ctx)
