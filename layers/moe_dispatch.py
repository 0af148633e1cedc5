"""Moving tokens to their experts and back: the dropless and the capacity paths, with expert parallelism.

dropless(x_BTD, expert_BTZ, gate_BTZ, w)      every assignment is computed: sort the B T k (token, expert)
    pairs (A, the assignments) by expert -> one grouped matmul per projection (kernels/gmm) -> unsort ->
    gate-weighted sum over the k choices (Z). Expert ids >= E (MoE++'s zero-computation experts) are sorted past the groups and cost
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
             device's assignments, row block s for shard s), padded to A per destination because
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


def grouped_ffn(source, src_M, expert_M, n_experts: int, w: ExpertWeights, impl: str):
    """y_MD[m] = expert_M[m]'s FFN of source[src_M[m]] (0 when expert_M[m] >= n_experts): sort -> gmm -> unsort.
    source: [rows, D], the tokens (or received rows) the assignments read."""
    order_M = jnp.argsort(expert_M, stable=True)
    sizes_E = jnp.sum(jax.nn.one_hot(expert_M, n_experts, dtype=jnp.int32), axis=0)
    y_sorted_MD = grouped_swiglu(source[src_M[order_M]], sizes_E, w, impl)
    return jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD, unique_indices=True)


def _exchange_and_compute(source, token_A, expert_A, n_experts: int, w: ExpertWeights, impl: str, axis: str, ep: int):
    """grouped_ffn when the experts live on the `ep` devices of mesh axis `axis` (E/ep each). The send,
    receive and return buffers are [ep, A, D]: row block s goes to (comes from) shard s."""
    A, local = expert_A.shape[0], n_experts // ep
    order_A = jnp.argsort(expert_A, stable=True)
    expert_sorted_A = expert_A[order_A]
    dest_A = expert_sorted_A // local  # >= ep for ids past the experts: sent nowhere
    shard_counts = jnp.sum(jax.nn.one_hot(dest_A, ep, dtype=jnp.int32), axis=0)  # [ep]
    shard_offsets = jnp.cumsum(shard_counts) - shard_counts
    r_A = jnp.arange(A)
    valid = r_A[None, :] < shard_counts[:, None]  # [ep, A]
    pos = jnp.minimum(shard_offsets[:, None] + r_A[None, :], A - 1)  # [ep, A]: positions in the sorted order
    send_x = jnp.where(valid[..., None], source[token_A[order_A][pos]], 0)
    send_expert = jnp.where(valid, expert_sorted_A[pos] - local * jnp.arange(ep)[:, None], local)  # local ids
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)
    recv_expert = jax.lax.all_to_all(send_expert, axis, 0, 0, tiled=True)
    M = ep * A
    y_MD = grouped_ffn(recv_x.reshape(M, -1), jnp.arange(M), recv_expert.reshape(M), local, w, impl)
    back = jax.lax.all_to_all(y_MD.reshape(ep, A, -1), axis, 0, 0, tiled=True)
    sent_A = dest_A < ep
    dest_A = jnp.minimum(dest_A, ep - 1)
    y_sorted_AD = jnp.where(sent_A[:, None], back[dest_A, r_A - shard_offsets[dest_A]], 0)
    return jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD, unique_indices=True)


def _dropless_shard(x_BTD, expert_BTZ, gate_BTZ, w, *, n_experts, impl, expert_axis, ep, mlp_axis):
    B, T, D = x_BTD.shape
    Z = expert_BTZ.shape[-1]
    expert_A = expert_BTZ.reshape(-1)
    token_A = jnp.arange(expert_A.shape[0]) // Z  # flat token index of each assignment
    if ep == 1:
        y_AD = grouped_ffn(x_BTD.reshape(B * T, D), token_A, expert_A, n_experts, w, impl)
    else:
        y_AD = _exchange_and_compute(x_BTD.reshape(B * T, D), token_A, expert_A, n_experts, w, impl, expert_axis, ep)
    y_BTD = jnp.einsum("btzd,btz->btd", y_AD.reshape(B, T, Z, D), gate_BTZ.astype(y_AD.dtype),
                       preferred_element_type=jnp.float32)
    if mlp_axis is not None:
        y_BTD = jax.lax.psum(y_BTD, mlp_axis)
    return y_BTD.astype(x_BTD.dtype)


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


def dropless(x_BTD, expert_BTZ, gate_BTZ, w: ExpertWeights, *, impl: str = "auto"):
    n_experts = w.gate_EDF.shape[0]
    return _on_mesh(functools.partial(_dropless_shard, n_experts=n_experts, impl=impl), x_BTD, expert_BTZ, gate_BTZ, w)


def capacity(x_BTD, token_BEC, gate_BEC, w: ExpertWeights):
    return _on_mesh(_capacity_shard, x_BTD, token_BEC, gate_BEC, w)


def capacity_slots(expert_BTZ, gate_BTZ, n_experts: int, capacity: int):
    """Token-choice assignments -> slot form, per sequence. Priority is sequence order: an assignment past
    its expert's `capacity` is dropped (the token keeps its residual). GShard instead serves every first
    choice before any second one, which in a decoder lets later tokens decide whether an earlier token's
    second choice is dropped (a leak from the future); in sequence order a drop depends on the past only.
    -> (token_BEC, gate_BEC, kept assignments, FFN assignments)."""
    B, T, Z = expert_BTZ.shape
    expert_BA = expert_BTZ.reshape(B, T * Z)
    gate_BA = gate_BTZ.reshape(B, T * Z)
    onehot_BAE = jax.nn.one_hot(expert_BA, n_experts, dtype=jnp.int32)
    pos_BA = jnp.sum((jnp.cumsum(onehot_BAE, axis=1) - 1) * onehot_BAE, axis=-1)
    routed_BA = expert_BA < n_experts
    kept_BA = routed_BA & (pos_BA < capacity)
    target_BA = jnp.where(kept_BA, expert_BA, n_experts)  # out of range: dropped by the scatter
    token_BA = jnp.broadcast_to(jnp.repeat(jnp.arange(T, dtype=jnp.int32), Z), (B, T * Z))
    b_BA = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T * Z))
    token_BEC = jnp.zeros((B, n_experts, capacity), jnp.int32).at[b_BA, target_BA, pos_BA].set(token_BA, mode="drop")
    gate_BEC = jnp.zeros((B, n_experts, capacity), gate_BTZ.dtype).at[b_BA, target_BA, pos_BA].set(gate_BA, mode="drop")
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
