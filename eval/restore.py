"""Restore any checkpoint of a run onto this machine's mesh, parameters only.

    ctx = restore("runs/quickstart", step="latest")          # or "best", or an int
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):   # the model's sharding constraints
        logits_BTV, _ = nnx.jit(lambda m, x: m(x))(ctx.model, tokens_BT)

The run's `config.json` rebuilds the model shape-first for *this* mesh (by default every device on the
data axis, whatever mesh the run trained on), and orbax reads each array straight into its new shards.
Only the "params" and "other" parts of the saved train state are read: orbax's partial restore leaves
the optimizer moments (twice the parameters' size with AdamW) on disk.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from effax.eval.context import EvalContext
from effax.train import config as config_lib
from effax.train import data as data_lib
from effax.train import mesh as mesh_lib
from effax.train import metrics as metrics_lib

log = logging.getLogger("effax")


class RestoreError(RuntimeError):
    """No usable run or checkpoint; the message names the workdir or step and what exists."""


def load_config(workdir: str) -> config_lib.Config:
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise RestoreError(f"workdir {workdir!r} does not exist")
    if not os.path.isfile(path):
        raise RestoreError(f"{workdir!r} has no config.json: is it the --workdir of an `effax train` run?")
    try:
        return config_lib.from_json(path)
    except (ValueError, TypeError, KeyError) as e:
        raise RestoreError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _manager(workdir: str) -> ocp.CheckpointManager:
    # Not read_only (orbax then logs a warning per open); with no saves, no max_to_keep and create=False
    # this manager never writes or deletes anything.
    options = ocp.CheckpointManagerOptions(create=False, max_to_keep=None, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps with a finished checkpoint (orbax renames a step's folder into place only once complete)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    manager = _manager(workdir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def best_step(workdir: str, steps: list[int]) -> int:
    """The checkpointed step with the lowest validation loss in metrics.jsonl."""
    val = {r["step"]: r["loss"] for r in metrics_lib.read(workdir, "val") if isinstance(r.get("loss"), float)}
    scored = [(val[s], s) for s in steps if s in val and math.isfinite(val[s])]
    if not scored:
        raise RestoreError(f"--step best: no checkpoint of {workdir} (steps {steps}) has a val loss in metrics.jsonl")
    return min(scored)[1]


def _mesh_for(mesh, cfg) -> tuple[jax.sharding.Mesh, tuple]:
    """None → every device on the data axis; a MeshConfig → built here; a Mesh → used as it is."""
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh, mesh_lib.rules(cfg.mesh)
    mesh_cfg = mesh if mesh is not None else config_lib.MeshConfig(data=-1, rules=cfg.mesh.rules)
    return mesh_lib.make_mesh(mesh_cfg), mesh_lib.rules(mesh_cfg)


def restore(workdir: str, step: str | int = "latest", mesh=None) -> EvalContext:
    """The model of `workdir` at `step` ("latest", "best" or a step number), sharded over `mesh`
    (None, an effax MeshConfig or a jax Mesh). "latest" falls back past steps that fail to restore."""
    workdir = os.path.abspath(workdir)
    cfg = load_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise RestoreError(f"{workdir} has no finished checkpoint under checkpoints/")
    if step == "best":
        candidates = [best_step(workdir, steps)]
    elif step == "latest":
        candidates = steps[::-1]
    else:
        try:
            step = int(step)
        except ValueError:
            raise RestoreError(f"step must be latest, best or a number, got {step!r}") from None
        if step not in steps:
            raise RestoreError(f"{workdir} has no checkpoint at step {step}; available steps: {steps}")
        candidates = [step]

    mesh, rules = _mesh_for(mesh, cfg)
    graphdef, abstract, shardings = mesh_lib.abstract_model(cfg.model, mesh, rules, cfg.train.seed)
    params, other = nnx.split_state(abstract, nnx.Param, ...)
    p_shard, o_shard = nnx.split_state(shardings, nnx.Param, ...)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          {"params": params, "other": other}, {"params": p_shard, "other": o_shard})
    manager = _manager(workdir)
    try:
        for i, s in enumerate(candidates):
            try:
                state = _restore_params(manager, s, target)
                break
            except Exception as e:  # orbax raises many types for missing or truncated files
                where = os.path.join(workdir, "checkpoints", str(s))
                if step != "latest":
                    raise RestoreError(f"checkpoint step {s} of {workdir} cannot be restored ({where}): "
                                       f"{type(e).__name__}: {e}") from e
                if i == len(candidates) - 1:
                    raise RestoreError(f"no checkpoint of {workdir} can be restored (tried steps {candidates}); "
                                       f"step {s}: {type(e).__name__}: {e}") from e
                log.warning("checkpoint step %d (%s) cannot be restored (%s: %s); skipping it for step %d",
                            s, where, type(e).__name__, str(e)[:300], candidates[i + 1])
    finally:
        manager.close()
    with jax.set_mesh(mesh):
        model = nnx.merge(graphdef, state["params"], state["other"])
    return EvalContext(cfg=cfg, model=model, tokenizer=data_lib.tokenizer_for(cfg.data), mesh=mesh, rules=rules,
                       step=s, workdir=workdir)


def _restore_params(manager: ocp.CheckpointManager, step: int, target) -> dict:
    """Reads only the leaves in `target` ({"params", "other"}) of the saved train state: with
    partial_restore orbax trims the on-disk tree to the target, so "opt", "step" and "rng" are never read."""
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]
