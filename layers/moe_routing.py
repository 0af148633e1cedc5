"""MoE routers and balancing, as pure functions of fp32 router logits (layers/moe.py calls them).

Token choice (each token picks k experts):
  scores_NE = softmax(logits) or sigmoid(logits); the top-k of scores + bias are chosen (the bias is the
  aux-loss-free balancing state, DeepSeek-V3: it steers selection only); gates are the unbiased scores of
  the chosen experts, optionally renormalised to sum to 1 over the k.
  MoGE (Pangu Pro MoE): the E experts form G contiguous groups and each token takes its top-(k/G) inside
  every group, so each group (one device under expert parallelism) gets exactly N k / G assignments.
Expert choice (Zhou et al. 2022): each expert takes the top-C tokens of a sequence by softmax score.

Balancing: the Switch/GShard loss E Σᵢ fᵢ Pᵢ (fᵢ: share of the N k assignments that went to expert i,
Pᵢ: mean router probability of i), the ST-MoE router z-loss mean(logsumexp(logits)²), and the
aux-loss-free bias update bᵢ += u sign(mean load − loadᵢ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scores(logits_NE: jax.Array, score: str) -> jax.Array:
    if score == "softmax":
        return jax.nn.softmax(logits_NE, axis=-1)
    if score == "sigmoid":
        return jax.nn.sigmoid(logits_NE)
    raise ValueError(f"router score {score!r} is not softmax or sigmoid")


def token_choice(scores_NE: jax.Array, k: int, *, renormalize: bool, bias_E: jax.Array | None = None,
                 n_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """-> (expert_NK int32, gate_NK fp32). With n_groups > 1 (MoGE) the k choices are k / n_groups per group,
    listed group by group."""
    N, E = scores_NE.shape
    select_NE = scores_NE if bias_E is None else scores_NE + bias_E
    if n_groups == 1:
        _, expert_NK = jax.lax.top_k(select_NE, k)
    else:
        per_group = E // n_groups
        _, local_NGk = jax.lax.top_k(select_NE.reshape(N, n_groups, per_group), k // n_groups)
        expert_NK = (local_NGk + per_group * jnp.arange(n_groups)[None, :, None]).reshape(N, k)
    gate_NK = jnp.take_along_axis(scores_NE, expert_NK, axis=-1)
    if renormalize:
        gate_NK = gate_NK / jnp.sum(gate_NK, axis=-1, keepdims=True)
    return expert_NK.astype(jnp.int32), gate_NK


def expert_choice(scores_BTE: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each expert takes the `capacity` tokens of each sequence with the highest scores.
    -> (token_BEC int32: positions in the sequence, gate_BEC fp32: their scores)."""
    gate_BEC, token_BEC = jax.lax.top_k(jnp.swapaxes(scores_BTE, 1, 2), capacity)
    return token_BEC.astype(jnp.int32), gate_BEC


def assignment_counts(expert_NK: jax.Array, n_experts: int) -> jax.Array:
    """Assignments per expert [E] (fp32); ids outside [0, E) count for none."""
    return jnp.sum(jax.nn.one_hot(expert_NK, n_experts, dtype=jnp.float32), axis=(0, 1))


def balance_loss(scores_NE: jax.Array, expert_NK: jax.Array, score: str) -> jax.Array:
    """E Σᵢ fᵢ Pᵢ (Switch Transformer eq. 4 with fᵢ over the k choices): 1 when routing is uniform.
    Pᵢ is the mean router probability; sigmoid scores are first normalised to sum to 1 per token
    (as DeepSeek-V3's sequence-wise balance loss does)."""
    N, E = scores_NE.shape
    f_E = assignment_counts(expert_NK, E) / expert_NK.size
    probs_NE = scores_NE if score == "softmax" else scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
    return E * jnp.sum(f_E * jnp.mean(probs_NE, axis=0))


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    """ST-MoE: mean over tokens of logsumexp(logits)²."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))


def aux_free_update(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3: bᵢ += u · sign(mean load − loadᵢ): overloaded experts become less likely to be chosen."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def max_violation(load_E: jax.Array) -> jax.Array:
    """MaxVio (Loss-Free Balancing paper): max load / mean load − 1 (0 when perfectly balanced)."""
    return jnp.max(load_E) / jnp.maximum(jnp.mean(load_E), 1e-9) - 1.0
