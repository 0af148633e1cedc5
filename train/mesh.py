"""The device mesh (axes data, fsdp, tensor, expert), logical-axis rules, and shape-first init.

Parameters and activations name logical axes (batch, seq, embed, heads, kv_heads, head_dim, mlp,
vocab, experts, layers); one rules table per preset maps them onto mesh axes. The mesh uses Auto axis
types (GSPMD propagation): the model code needs no sharding-in-types annotations, and constraints on
the residual stream (layers/sharding.py) pin the layout where it matters.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from effax.models import registry
from effax.models.registry import ConfigError
from effax.train import config as config_lib

AXES = ("data", "fsdp", "tensor", "expert")
# The batch splits over every axis but tensor: with experts sharded over `expert`, the devices of that axis
# are data parallel for everything else (as in MaxText and DeepSpeed-MoE), so none repeats another's work.
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis → mesh axes. FSDP (ZeRO-3): the embed dimension of every weight is split over fsdp, so
# parameters and the AdamW moments (which take the parameters' shardings) are sharded; the batch is
# split over data × fsdp × expert. Tensor parallel splits heads and MLP width (Megatron column/row pairs).
RULES = {
    "default": (
        ("batch", BATCH_AXES),
        ("seq", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("experts", "expert"),
        ("layers", None),
    ),
}


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 filled in; raises ConfigError when they do not fit `n_devices`."""
    sizes = {a: getattr(mesh_cfg, a) for a in AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [a for a, s in sizes.items() if s == -1]
    desc = " × ".join(f"{a}={s}" for a, s in sizes.items())
    if fill:
        if n_devices % fixed:
            raise ConfigError(f"mesh {desc}: the fixed axes ({fixed} devices) do not divide the {n_devices} devices; "
                              f"valid products are divisors of {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh {desc} uses {fixed} devices but {n_devices} are available; "
                          f"make the product equal {n_devices} or set one axis to -1")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    sizes = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices)


def rules(mesh_cfg) -> tuple:
    return RULES[mesh_cfg.rules]


def batch_ways(mesh) -> int:
    """How many ways the batch is split: the product of BATCH_AXES. `mesh` is a jax Mesh, or a
    MeshConfig whose -1 (fill) axis counts as 1 (the least it can be)."""
    sizes = mesh.shape if isinstance(mesh, jax.sharding.Mesh) else {a: max(getattr(mesh, a), 1) for a in AXES}
    return math.prod(sizes[a] for a in BATCH_AXES)


def check_divisibility(cfg, mesh: jax.sharding.Mesh) -> None:
    """Batch and head counts against the mesh, before anything compiles."""
    ways = batch_ways(mesh)
    axes = "mesh.data × mesh.fsdp" + (" × mesh.expert" if mesh.shape["expert"] > 1 else "")
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % ways:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (÷ train.microbatches={cfg.train.microbatches} = {micro} per "
            f"micro-batch) is not divisible by the data axes {axes} = {ways}; "
            f"use a multiple of {ways * cfg.train.microbatches}")
    if micro % jax.process_count():
        raise ConfigError(f"the micro-batch of {micro} sequences does not split over {jax.process_count()} processes")
    eval_batch = config_lib.eval_batch_size(cfg)
    if eval_batch % ways or eval_batch % jax.process_count():
        raise ConfigError(f"eval.batch_size={eval_batch} is not divisible by the data axes {axes} = "
                          f"{ways} and the {jax.process_count()} processes")
    tp = mesh.shape["tensor"]
    for key, heads in (("model.n_heads", cfg.model.n_heads), ("model.n_kv_heads", cfg.model.kv_heads)):
        if heads % tp:
            raise ConfigError(f"{key}={heads} is not divisible by mesh.tensor={tp} (tensor parallelism splits heads)")


def batch_sharding(mesh: jax.sharding.Mesh, rule_table) -> NamedSharding:
    """Sharding of a [batch, seq] input array."""
    return NamedSharding(mesh, logical_spec(("batch", "seq"), rule_table))


def logical_spec(names, rule_table) -> PartitionSpec:
    table = dict(rule_table)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def abstract_model(model_cfg: registry.ModelConfig, mesh, rule_table, seed: int):
    """Shape-only model under the mesh: (graphdef, abstract state, state shardings). Nothing is allocated."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rule_table):
        abstract = nnx.eval_shape(lambda: registry.build(model_cfg, rngs=nnx.Rngs(seed)))
        graphdef, state = nnx.split(abstract)
        shardings = nnx.get_named_sharding(state, mesh)
    check_param_shardings(state, shardings)
    return graphdef, state, shardings


def check_param_shardings(abstract_state, shardings) -> None:
    """Every sharded dimension must divide by its mesh axes; say which parameter and axis when not."""
    flat_state = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    flat_shard = jax.tree.leaves(shardings)
    for (path, leaf), sharding in zip(flat_state, flat_shard):
        for dim, axes in zip(leaf.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % ways:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(f"parameter {name} of shape {leaf.shape} cannot be split {ways} ways over mesh axes "
                                  f"{axes}: its size {dim} is not divisible by {ways}; change the model width or the "
                                  f"mesh (mesh.fsdp / mesh.tensor)")
