"""layers/moe_routing.py on hand cases: the Switch/GShard balance loss and the router z-loss equal their
formulas, token choice (softmax / sigmoid, renormalised), the aux-loss-free bias steers selection and never
the gates and moves load toward balance, MoGE gives every group exactly its share, expert choice takes each
expert's top-C tokens, capacity slots keep sequence order and drop past C, MaxVio."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from effax.layers import moe_dispatch, moe_routing

# fp32 formulas on a handful of numbers: agreement to ~1e-7; 1e-6 is rounding, not a mechanism.
TOL = 1e-6


def test_balance_loss_equals_the_switch_formula_on_a_hand_case():
    scores_NE = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    expert_NK = jnp.array([[0], [0], [1], [0]])
    # f = (3/4, 1/4), P = (0.65, 0.35): E Σ f P = 2 (0.75 · 0.65 + 0.25 · 0.35) = 1.15
    assert abs(moe_routing.balance_loss(scores_NE, expert_NK, "softmax") - 1.15) < TOL
    # top-2 of 3: f counts the 2 N assignments; uniform routing and probabilities give exactly 1
    uniform = jnp.full((3, 3), 1 / 3)
    assert abs(moe_routing.balance_loss(uniform, jnp.array([[0, 1], [1, 2], [2, 0]]), "softmax") - 1.0) < TOL
    # sigmoid scores are normalised per token before averaging: (0.5, 0.5) and (0.2, 0.2) both become (½, ½)
    sig = jnp.array([[0.5, 0.5], [0.2, 0.2]])
    assert abs(moe_routing.balance_loss(sig, jnp.array([[0], [0]]), "sigmoid") - 2 * (1.0 * 0.5)) < TOL


def test_router_z_loss_is_the_mean_squared_logsumexp():
    logits_NE = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: ln 2, ln 4
    assert abs(moe_routing.router_z_loss(logits_NE) - (math.log(2) ** 2 + math.log(4) ** 2) / 2) < TOL


def test_token_choice_gates_are_the_scores_of_the_chosen_experts():
    logits_NE = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    soft = moe_routing.scores(logits_NE, "softmax")
    expert, gate = moe_routing.token_choice(soft, 2, renormalize=False)
    assert expert.tolist() == [[0, 1]]
    np.testing.assert_allclose(gate, soft[:, :2], atol=TOL)
    _, renorm = moe_routing.token_choice(soft, 2, renormalize=True)
    np.testing.assert_allclose(renorm, [[1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]], atol=TOL)
    sig = moe_routing.scores(logits_NE, "sigmoid")
    _, gate = moe_routing.token_choice(sig, 2, renormalize=False)
    np.testing.assert_allclose(gate, [[1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))]], atol=TOL)


def test_aux_free_bias_steers_selection_but_never_the_gates():
    scores_NE = moe_routing.scores(jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0]]), "sigmoid")
    bias_E = jnp.array([0.0, 0.0, 0.9, 0.0])
    for renormalize in (False, True):
        plain_e, plain_g = moe_routing.token_choice(scores_NE, 2, renormalize=renormalize)
        biased_e, biased_g = moe_routing.token_choice(scores_NE, 2, renormalize=renormalize, bias_O=bias_E)
        assert plain_e.tolist() == [[0, 1], [3, 2]] and biased_e.tolist() == [[2, 0], [2, 3]]  # selection moved
        expected = jnp.take_along_axis(scores_NE, biased_e, axis=1)  # the unbiased scores of what was chosen
        if renormalize:
            expected = expected / expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(biased_g, expected, atol=TOL)


def test_aux_free_update_moves_the_load_toward_balance():
    load_E = jnp.array([5.0, 1.0, 2.0, 4.0])  # mean 3: experts 0 and 3 overloaded
    np.testing.assert_allclose(moe_routing.aux_free_update(jnp.zeros(4), load_E, 0.1), [-0.1, 0.1, 0.1, -0.1], atol=TOL)
    # a fixed skewed router: repeated steps of the rule bring MaxVio from > 1 to near 0
    logits_NE = jax.random.normal(jax.random.key(0), (512, 4)) + jnp.array([1.5, 0.0, 0.0, -1.0])
    scores_NE = moe_routing.scores(logits_NE, "sigmoid")

    def step(bias_E, _):
        expert, _ = moe_routing.token_choice(scores_NE, 1, renormalize=False, bias_O=bias_E)
        load_E = moe_routing.assignment_counts(expert, 4)
        return moe_routing.aux_free_update(bias_E, load_E, 1e-2), moe_routing.max_violation(load_E)

    _, maxvio = jax.lax.scan(step, jnp.zeros(4), None, length=300)
    assert maxvio[0] > 1.0 and maxvio[-20:].max() < 0.2, (maxvio[0], maxvio[-20:])


def test_moge_gives_every_group_exactly_its_share():
    N, E, G, k = 64, 8, 4, 4
    scores_NE = moe_routing.scores(jax.random.normal(jax.random.key(1), (N, E)), "softmax")
    expert_NK, gate_NK = moe_routing.token_choice(scores_NE, k, renormalize=False, n_groups=G)
    group_counts = np.bincount(np.asarray(expert_NK).ravel() // (E // G), minlength=G)
    assert group_counts.tolist() == [N * k // G] * G  # exact, whatever the scores
    best_in_group = np.argmax(np.asarray(scores_NE).reshape(N, G, E // G), axis=-1) + (E // G) * np.arange(G)
    assert (np.asarray(expert_NK) == best_in_group).all()  # top-(k/G) = top-1 of each group, group by group
    np.testing.assert_allclose(gate_NK, jnp.take_along_axis(scores_NE, expert_NK, 1), atol=TOL)  # one global softmax


def test_expert_choice_takes_each_experts_top_c_tokens():
    scores_BTE = moe_routing.scores(jax.random.normal(jax.random.key(2), (2, 6, 3)), "softmax")
    token_BEC, gate_BEC = moe_routing.expert_choice(scores_BTE, 2)
    s = np.asarray(scores_BTE)
    for b in range(2):
        for e in range(3):
            assert sorted(token_BEC[b, e].tolist()) == sorted(np.argsort(-s[b, :, e])[:2].tolist())
            np.testing.assert_allclose(gate_BEC[b, e], s[b, token_BEC[b, e], e], atol=TOL)


def test_capacity_slots_keep_sequence_order_and_drop_past_capacity():
    # one row, 4 tokens, top-2 over E = 2 (+ id 2: a zero-computation expert, never dispatched), capacity 2
    expert_BTK = jnp.array([[[0, 1], [0, 2], [0, 1], [1, 0]]])
    gate_BTK = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]]])
    token_BEC, gate_BEC, kept, routed = moe_dispatch.capacity_slots(expert_BTK, gate_BTK, 2, 2)
    # expert 0 is asked by tokens 0, 1, 2, 3 (in that order) and keeps 0, 1; expert 1 by 0, 2, 3, keeps 0, 2
    assert token_BEC[0].tolist() == [[0, 1], [0, 2]]
    np.testing.assert_allclose(gate_BEC[0], [[0.6, 0.7], [0.4, 0.5]], atol=TOL)
    assert (int(kept), int(routed)) == (4, 7)


def test_max_violation():
    assert abs(moe_routing.max_violation(jnp.array([2.0, 2.0, 2.0])) - 0.0) < TOL
    assert abs(moe_routing.max_violation(jnp.array([4.0, 1.0, 1.0])) - 1.0) < TOL  # max 4 / mean 2 - 1
