"""Moving tokens to their experts and back: the dropless and the capacity paths, with expert parallelism.

dropless(x_BTD, expert_BTK, gate_BTK, w)      every assignment is computed: sort the N k (token, expert)
    pairs by expert -> one grouped matmul per projection (kernels/gmm) -> unsort -> gate-weighted sum
    over the k. Expert ids >= E (MoE++'s zero-computation experts) are sorted past the groups and cost
    nothing.
capacity(x_BTD, token_BEC, gate_BEC, w)       slot form: expert e's slot c of row b holds token
    token_BEC[b, e, c] with weight gate_BEC[b, e, c] (0 for an empty slot); an [B, E, C, D] buffer and
    one batched matmul per projection. Token choice reaches it through `capacity_slots`, expert choice
    directly.

Experts are SwiGLU: down(silu(x gate_e) * (x up_e)).

Meshes. Routing happens outside, on global arrays (its statistics are global); the expert computation
runs inside `shard_map` over the mesh: each device takes its rows of the batch (split over the batch
axes data × fsdp × expert) and the experts of its `expert` shard, with FSDP-sharded weights gathered
and tensor-parallel expert widths summed (psum over `tensor`). With `expert` of size ep > 1 the
assignments travel to the devices holding their experts and back with `all_to_all` over `expert`:
  capacity:  [B, E, C, D] -> all_to_all (split E, stack rows) -> [ep B, E/ep, C, D] -> experts -> back.
  dropless:  assignments sorted by expert, so by destination; one [ep, A, D] send buffer (A = the
             device's N k assignments, row block s for shard s), padded to A per destination because
             every assignment may go to one shard (exactly dropless); the receiver sorts what it got by
             its local experts and runs the grouped matmul, whose tile loop skips the padding.
Capacity decisions are per sequence (C = ceil(T k factor / E) slots per expert and row), so no mesh
changes which tokens are dropped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd
from flax.linen import logical_to_mesh_axes
from jax.sharding import PartitionSpec as P

from effax.kernels.gmm import ops as gmm_ops


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    gate_EDF: jax.Array
    up_EDF: jax.Array
    down_EFD: jax.Array


jax.tree_util.register_dataclass(ExpertWeights, data_fields=["gate_EDF", "up_EDF", "down_EFD"], meta_fields=[])


# ---------------------------------------------------------------------------------------------------
# One device's work


def grouped_swiglu(x_MD, group_sizes_E, w: ExpertWeights, impl: str):
    """Rows sorted by expert -> each row through its expert; rows past the groups give 0."""
    h_MF = jax.nn.silu(gmm_ops.gmm(x_MD, w.gate_EDF, group_sizes_E, impl=impl)) * gmm_ops.gmm(x_MD, w.up_EDF, group_sizes_E, impl=impl)
    return gmm_ops.gmm(h_MF, w.down_EFD, group_sizes_E, impl=impl)


def grouped_ffn(x_ND, src_M, expert_M, n_experts: int, w: ExpertWeights, impl: str):
    """y_MD[m] = expert_M[m]'s FFN of x_ND[src_M[m]] (0 when expert_M[m] >= n_experts), via sort -> gmm -> unsort."""
    order_M = jnp.argsort(expert_M, stable=True)
    sizes_E = jnp.sum(jax.nn.one_hot(expert_M, n_experts, dtype=jnp.int32), axis=0)
    y_sorted_MD = grouped_swiglu(x_ND[src_M[order_M]], sizes_E, w, impl)
    return jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD, unique_indices=True)


def _exchange_and_compute(x_ND, token_A, expert_A, n_experts: int, w: ExpertWeights, impl: str, axis: str, ep: int):
    """grouped_ffn when the experts live on the `ep` devices of mesh axis `axis` (E/ep each)."""
    A, local = expert_A.shape[0], n_experts // ep
    order_A = jnp.argsort(expert_A, stable=True)
    expert_sorted_A = expert_A[order_A]
    dest_A = expert_sorted_A // local  # >= ep for ids past the experts: sent nowhere
    counts_S = jnp.sum(jax.nn.one_hot(dest_A, ep, dtype=jnp.int32), axis=0)
    offsets_S = jnp.cumsum(counts_S) - counts_S
    r_A = jnp.arange(A)
    valid_SA = r_A[None, :] < counts_S[:, None]
    pos_SA = jnp.minimum(offsets_S[:, None] + r_A[None, :], A - 1)
    send_x_SAD = jnp.where(valid_SA[..., None], x_ND[token_A[order_A][pos_SA]], 0)
    send_e_SA = jnp.where(valid_SA, expert_sorted_A[pos_SA] - local * jnp.arange(ep)[:, None], local)
    recv_x_SAD = jax.lax.all_to_all(send_x_SAD, axis, 0, 0, tiled=True)  # block s: what device s sent here
    recv_e_SA = jax.lax.all_to_all(send_e_SA, axis, 0, 0, tiled=True)
    M = ep * A
    y_MD = grouped_ffn(recv_x_SAD.reshape(M, -1), jnp.arange(M), recv_e_SA.reshape(M), local, w, impl)
    back_SAD = jax.lax.all_to_all(y_MD.reshape(ep, A, -1), axis, 0, 0, tiled=True)  # block s: from shard s
    sent_A = dest_A < ep
    dest_A = jnp.minimum(dest_A, ep - 1)
    y_sorted_AD = jnp.where(sent_A[:, None], back_SAD[dest_A, jnp.arange(A) - offsets_S[dest_A]], 0)
    return jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD, unique_indices=True)


def _dropless_shard(x_BTD, expert_BTK, gate_BTK, w, *, n_experts, impl, expert_axis, ep, mlp_axis):
    B, T, D = x_BTD.shape
    K = expert_BTK.shape[-1]
    x_ND = x_BTD.reshape(B * T, D)
    expert_A = expert_BTK.reshape(-1)
    token_A = jnp.arange(expert_A.shape[0]) // K
    if ep == 1:
        y_AD = grouped_ffn(x_ND, token_A, expert_A, n_experts, w, impl)
    else:
        y_AD = _exchange_and_compute(x_ND, token_A, expert_A, n_experts, w, impl, expert_axis, ep)
    y_ND = jnp.einsum("nkd,nk->nd", y_AD.reshape(B * T, K, D), gate_BTK.reshape(B * T, K).astype(y_AD.dtype),
                      preferred_element_type=jnp.float32)
    if mlp_axis is not None:
        y_ND = jax.lax.psum(y_ND, mlp_axis)
    return y_ND.astype(x_BTD.dtype).reshape(B, T, D)


def _capacity_shard(x_BTD, token_BEC, gate_BEC, w, *, expert_axis, ep, mlp_axis):
    x_BECD = jax.vmap(lambda x_TD, t_EC: x_TD[t_EC])(x_BTD, token_BEC)
    if ep > 1:
        x_BECD = jax.lax.all_to_all(x_BECD, expert_axis, 1, 0, tiled=True)  # [ep B, E/ep, C, D]
    h_BECF = jax.nn.silu(jnp.einsum("becd,edf->becf", x_BECD, w.gate_EDF)) * jnp.einsum("becd,edf->becf", x_BECD, w.up_EDF)
    y_BECD = jnp.einsum("becf,efd->becd", h_BECF, w.down_EFD)
    if ep > 1:
        y_BECD = jax.lax.all_to_all(y_BECD, expert_axis, 0, 1, tiled=True)
    weighted_BECD = y_BECD.astype(jnp.float32) * gate_BEC[..., None]
    y_BTD = jax.vmap(lambda t_EC, y_ECD: jnp.zeros(x_BTD.shape[1:], jnp.float32).at[t_EC].add(y_ECD))(token_BEC, weighted_BECD)
    if mlp_axis is not None:
        y_BTD = jax.lax.psum(y_BTD, mlp_axis)
    return y_BTD.astype(x_BTD.dtype)


# ---------------------------------------------------------------------------------------------------
# Entry points


def dropless(x_BTD, expert_BTK, gate_BTK, w: ExpertWeights, *, impl: str = "auto"):
    n_experts = w.gate_EDF.shape[0]
    return _on_mesh(functools.partial(_dropless_shard, n_experts=n_experts, impl=impl), x_BTD, expert_BTK, gate_BTK, w)


def capacity(x_BTD, token_BEC, gate_BEC, w: ExpertWeights):
    return _on_mesh(_capacity_shard, x_BTD, token_BEC, gate_BEC, w)


def capacity_slots(expert_BTK, gate_BTK, n_experts: int, capacity: int):
    """Token-choice assignments -> slot form, per sequence. Priority is sequence order: an assignment past
    its expert's `capacity` is dropped (the token keeps its residual). GShard instead serves every first
    choice before any second one, which in a decoder lets later tokens decide whether an earlier token's
    second choice is dropped (a leak from the future); in sequence order a drop depends on the past only.
    -> (token_BEC, gate_BEC, kept assignments, FFN assignments)."""
    B, T, K = expert_BTK.shape
    expert_BA = expert_BTK.reshape(B, T * K)
    gate_BA = gate_BTK.reshape(B, T * K)
    onehot_BAE = jax.nn.one_hot(expert_BA, n_experts, dtype=jnp.int32)
    pos_BA = jnp.sum((jnp.cumsum(onehot_BAE, axis=1) - 1) * onehot_BAE, axis=-1)
    routed_BA = expert_BA < n_experts
    kept_BA = routed_BA & (pos_BA < capacity)
    target_BA = jnp.where(kept_BA, expert_BA, n_experts)  # out of range: dropped by the scatter
    token_BA = jnp.broadcast_to(jnp.repeat(jnp.arange(T, dtype=jnp.int32), K), (B, T * K))
    b_BA = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T * K))
    token_BEC = jnp.zeros((B, n_experts, capacity), jnp.int32).at[b_BA, target_BA, pos_BA].set(token_BA, mode="drop")
    gate_BEC = jnp.zeros((B, n_experts, capacity), gate_BTK.dtype).at[b_BA, target_BA, pos_BA].set(gate_BA, mode="drop")
    return token_BEC, gate_BEC, jnp.sum(kept_BA), jnp.sum(routed_BA)


def _mesh_axes(batch: int, n_experts: int):
    """(batch mesh axes, expert axis, its size, tensor axis or None) under the active mesh and rules, or
    None when there is none (or the batch does not split over it, e.g. a one-row decode: GSPMD then)."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    (batch_axes,), (expert_axis,), (mlp_axis,) = (logical_to_mesh_axes((name,), rules) for name in ("batch", "experts", "mlp"))
    names = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))  # noqa: E731
    ways = 1
    for a in names(batch_axes):
        ways *= mesh.shape[a]
    ep = 1
    for a in names(expert_axis):
        ep *= mesh.shape[a]
    if batch % ways or n_experts % ep:
        return None
    tensor = 1
    for a in names(mlp_axis):
        tensor *= mesh.shape[a]
    return batch_axes, expert_axis, ep, (mlp_axis if tensor > 1 else None)


def _on_mesh(shard_fn, x_BTD, route_a, route_b, w: ExpertWeights):
    axes = _mesh_axes(x_BTD.shape[0], w.gate_EDF.shape[0])
    if axes is None:
        return shard_fn(x_BTD, route_a, route_b, w, expert_axis=None, ep=1, mlp_axis=None)
    batch_axes, expert_axis, ep, mlp_axis = axes
    row = P(batch_axes)
    # FSDP shards the experts' D; inside the map each device holds whole experts of its `expert` shard
    # (the gather is the usual FSDP all-gather) and its `tensor` slice of the width F.
    w_spec = ExpertWeights(P(expert_axis, None, mlp_axis), P(expert_axis, None, mlp_axis), P(expert_axis, mlp_axis, None))
    fn = functools.partial(shard_fn, expert_axis=expert_axis, ep=ep, mlp_axis=mlp_axis)
    return jax.shard_map(fn, in_specs=(row, row, row, w_spec), out_specs=row)(x_BTD, route_a, route_b, w)
