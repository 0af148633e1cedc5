"""Logical-axis sharding: the model names axes (`batch`, `embed`, `heads`, ...); the rules table of
the active `nnx.logical_axis_rules(...)` context (built in train/mesh.py) maps them to mesh axes.

With no mesh or no rules active (plain CPU tests, single device) both helpers are no-ops, so
layers and models run unchanged from a unit test up to a multi-host mesh.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from flax.linen import logical_to_mesh_axes

LogicalAxes = Sequence[str | None]


def _mesh_is_set() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a mesh or rules.

    Mapping is flax's priority rule: the first rule whose mesh axes are still free wins, and a name
    with no free rule stays replicated. So with ("batch", ("data", "fsdp")) and ("embed", "fsdp"),
    an activation ("batch", "seq", "embed") becomes P(("data", "fsdp"), None, None): FSDP shards
    parameters over `embed` but activations only over the batch.
    """
    rules = core_spmd.get_logical_axis_rules()
    if not rules or not _mesh_is_set():
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {x.shape}")
    spec = logical_to_mesh_axes(tuple(logical_axes), rules)
    return jax.lax.with_sharding_constraint(x, spec)


def logical_init(init: Callable, logical_axes: LogicalAxes) -> Callable:
    """`nnx.with_partitioning(init, logical_axes)`, sharded eagerly only when a mesh is set.

    flax 0.12 shards annotated variables at creation (`flax_always_shard_variable`) and raises when
    no mesh is set; the shape-first init (eval_shape -> shardings -> jit with out_shardings) does not
    need that, and unit tests have no mesh. The names land in the variable's `out_sharding` metadata,
    which `nnx.get_partition_spec` maps through the active rules.
    """
    return nnx.with_partitioning(init, tuple(logical_axes), eager_sharding=_mesh_is_set())
