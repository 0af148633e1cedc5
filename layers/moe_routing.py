"""MoE routers and balancing, as pure functions of fp32 router logits (layers/moe.py calls them).

Token choice (each token picks k experts):
  scores = softmax(logits) or sigmoid(logits) over the router outputs; the top-k of scores + bias are
  chosen (the bias is the aux-loss-free balancing state, DeepSeek-V3: it steers selection only); gates are
  the unbiased scores of the chosen experts, optionally renormalised to sum to 1 over the k.
  MoGE (Pangu Pro MoE): the E experts form G contiguous groups and each token takes its top-(k/G) inside
  every group, so each group (one device under expert parallelism) gets exactly (tokens × k) / G assignments.
Expert choice (Zhou et al. 2022): each expert takes the top-C tokens of a sequence by softmax score.
Shapes: O router outputs (the experts, plus MoE++'s zero-computation ones), Z the k choices of a token.

Balancing: the Switch/GShard loss O Σᵢ fᵢ Pᵢ (fᵢ: share of the token choices that went to output i,
Pᵢ: mean router probability of i), the ST-MoE router z-loss mean(logsumexp(logits)²), and the
aux-loss-free bias update bᵢ += u sign(mean load − loadᵢ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scores(logits_BTO: jax.Array, score: str) -> jax.Array:
    if score == "softmax":
        return jax.nn.softmax(logits_BTO, axis=-1)
    if score == "sigmoid":
        return jax.nn.sigmoid(logits_BTO)
    raise ValueError(f"router score {score!r} is not softmax or sigmoid")


def token_choice(scores_BTO: jax.Array, k: int, *, renormalize: bool, bias_O: jax.Array | None = None,
                 n_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """-> (expert_BTZ int32, gate_BTZ fp32), Z = k. With n_groups > 1 (MoGE) the k choices are k / n_groups
    per group, listed group by group."""
    *lead, O = scores_BTO.shape
    select_BTO = scores_BTO if bias_O is None else scores_BTO + bias_O
    if n_groups == 1:
        _, expert_BTZ = jax.lax.top_k(select_BTO, k)
    else:
        per_group = O // n_groups
        _, local = jax.lax.top_k(select_BTO.reshape(*lead, n_groups, per_group), k // n_groups)  # [B, T, G, k/G]
        expert_BTZ = (local + per_group * jnp.arange(n_groups)[:, None]).reshape(*lead, k)
    gate_BTZ = jnp.take_along_axis(scores_BTO, expert_BTZ, axis=-1)
    if renormalize:
        gate_BTZ = gate_BTZ / jnp.sum(gate_BTZ, axis=-1, keepdims=True)
    return expert_BTZ.astype(jnp.int32), gate_BTZ


def expert_choice(scores_BTE: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each expert takes the `capacity` tokens of each sequence with the highest scores.
    -> (token_BEC int32: positions in the sequence, gate_BEC fp32: their scores)."""
    gate_BEC, token_BEC = jax.lax.top_k(jnp.swapaxes(scores_BTE, 1, 2), capacity)
    return token_BEC.astype(jnp.int32), gate_BEC


def assignment_counts(expert_BTZ: jax.Array, n_outputs: int) -> jax.Array:
    """Assignments per router output [O] (fp32); ids outside [0, O) count for none."""
    return jnp.sum(jax.nn.one_hot(expert_BTZ, n_outputs, dtype=jnp.float32), axis=tuple(range(expert_BTZ.ndim)))


def balance_loss(scores_BTO: jax.Array, expert_BTZ: jax.Array, score: str) -> jax.Array:
    """O Σᵢ fᵢ Pᵢ (Switch Transformer eq. 4 with fᵢ over the k choices): 1 when routing is uniform.
    Pᵢ is the mean router probability; sigmoid scores are first normalised to sum to 1 per token
    (as DeepSeek-V3's sequence-wise balance loss does)."""
    O = scores_BTO.shape[-1]
    f_O = assignment_counts(expert_BTZ, O) / expert_BTZ.size
    probs_BTO = scores_BTO if score == "softmax" else scores_BTO / jnp.sum(scores_BTO, axis=-1, keepdims=True)
    return O * jnp.sum(f_O * jnp.mean(probs_BTO.reshape(-1, O), axis=0))


def router_z_loss(logits_BTO: jax.Array) -> jax.Array:
    """ST-MoE: mean over tokens of logsumexp(logits)²."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_BTO, axis=-1)))


def aux_free_update(bias_O: jax.Array, load_O: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3: bᵢ += u · sign(mean load − loadᵢ): overloaded experts become less likely to be chosen."""
    return bias_O + rate * jnp.sign(jnp.mean(load_O) - load_O)


def max_violation(load_O: jax.Array) -> jax.Array:
    """MaxVio (Loss-Free Balancing paper): max load / mean load − 1 (0 when perfectly balanced)."""
    return jnp.max(load_O) / jnp.maximum(jnp.mean(load_O), 1e-9) - 1.0
