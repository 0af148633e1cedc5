"""A plain-jnp MoE layer for the tests: every expert computed densely on every token, one expert at a time,
combined through a [N, E] gate matrix. No sort, no grouped matmul, no slots, no shard_map: what the layer's
dispatch must equal (forward and gradients). Selection uses argsort, not lax.top_k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def swiglu(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def router_logits(p: dict, cfg, x32, carry=None):
    h = jnp.tanh(x32 @ p["router_hidden"]) if cfg.router_mlp else x32
    logits = h @ p["router"]
    return logits + carry @ p["gate_residual"] if cfg.gating_residual else logits


def gate_matrix(cfg, scores_NR, bias_R=None):
    """[N, R]: each token's gate on each router output (0 where not chosen)."""
    N, R = scores_NR.shape
    select = scores_NR if bias_R is None else scores_NR + bias_R
    groups = cfg.n_groups if cfg.router == "moge" else 1
    per, k = R // groups, cfg.top_k // groups
    chosen = jnp.zeros((N, R), bool)
    for g in range(groups):
        idx = jnp.argsort(-select[:, g * per:(g + 1) * per], axis=1, stable=True)[:, :k] + g * per
        chosen = chosen | jnp.any(jax.nn.one_hot(idx, R, dtype=bool), axis=1)
    gates = jnp.where(chosen, scores_NR, 0.0)
    return gates / gates.sum(1, keepdims=True) if cfg.router_renormalize else gates


def gates(p: dict, cfg, x_BTD, bias_R=None):
    """The [N, R] gate matrix of a token-choice router (concrete: for sequence_order_keep)."""
    logits = router_logits(p, cfg, x_BTD.reshape(-1, x_BTD.shape[-1]))
    return gate_matrix(cfg, jax.nn.softmax(logits, -1) if cfg.router_score == "softmax" else jax.nn.sigmoid(logits), bias_R)


def sequence_order_keep(expert_order_NK, n_experts, capacity, B, T):
    """Capacity drops by hand: walk each row's tokens in order, count per expert."""
    e = np.asarray(expert_order_NK).reshape(B, T, -1)
    keep = np.zeros(e.shape, bool)
    for b in range(B):
        used = np.zeros(n_experts, int)
        for t in range(T):
            for j in range(e.shape[2]):
                if e[b, t, j] < n_experts and used[e[b, t, j]] < capacity:
                    keep[b, t, j] = True
                    used[e[b, t, j]] += 1
    return keep.reshape(B * T, -1)


def choice_order(G_NR, k):
    """Each token's chosen router outputs, best first."""
    return jnp.argsort(-jnp.where(G_NR > 0, G_NR, -1.0), axis=1, stable=True)[:, :k]


def moe(p: dict, cfg, x_BTD, *, bias_R=None, carry=None, keep_NK=None):
    """The layer's output. p: its parameters by attribute name (shared experts as shared_gate/up/down)."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    logits = router_logits(p, cfg, x, None if carry is None else carry.reshape(B * T, -1))
    scores = jax.nn.softmax(logits, -1) if cfg.router_score == "softmax" else jax.nn.sigmoid(logits)
    E = cfg.n_experts
    if cfg.router == "expert_choice":
        C = -(-T * cfg.top_k // E)
        s = scores.reshape(B, T, E)
        rank = jnp.argsort(jnp.argsort(-s, axis=1, stable=True), axis=1)  # a token's rank among its row, per expert
        G = jnp.where(rank < C, s, 0.0).reshape(B * T, E)
    else:
        G = gate_matrix(cfg, scores, bias_R)
        if keep_NK is not None:  # capacity: which of each token's choices (best first) survived
            G = G * jnp.any(jax.nn.one_hot(choice_order(G, cfg.top_k), G.shape[1]) * keep_NK[..., None], axis=1)
    h = x @ p["bigmac_down"] if cfg.bigmac_dim else x
    y = sum(G[:, e:e + 1] * swiglu(h, p["expert_gate"][e], p["expert_up"][e], p["expert_down"][e]) for e in range(E))
    first_copy = E + cfg.n_zero_experts
    for c in range(cfg.n_copy_experts):
        y = y + G[:, first_copy + c:first_copy + c + 1] * h
    for j in range(cfg.n_constant_experts):
        mix = jax.nn.softmax(h @ p["constant_mix"][j], -1)
        col = first_copy + cfg.n_copy_experts + j
        y = y + G[:, col:col + 1] * (mix[:, :1] * h + mix[:, 1:] * p["constant_value"][j])
    if cfg.bigmac_dim:
        y = y @ p["bigmac_up"]
    if cfg.n_shared_experts:
        y = y + swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"])
    return y.reshape(B, T, D), logits.reshape(B, T, -1)


def params_of(layer) -> dict:
    """The layer's parameter values by name (shared experts flattened to shared_*)."""
    from flax import nnx

    out = {}
    for path, value in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        out["_".join(str(k) for k in path)] = value[...]
    return out
