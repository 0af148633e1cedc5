"""Checkpoints with orbax: the train state (params, other model state, optimizer, RNG), the data
iterator's state, and a JSON record (step, config). Saves are asynchronous; orbax writes each step to a
temporary folder and renames it when complete, so a kill mid-save leaves the previous steps intact.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("effax")


@functools.cache  # once per process
def _write_arrays_whole_on_one_process() -> None:
    """With one process, every array is written whole by it: orbax's default (replica-parallel saving, which
    splits a replicated array between the replicas that may be on different hosts) slices each replicated
    array on device first, a jitted slice per array shape and sharding: 64 compiles, ~2.6 s of a 2-core CPU
    at the first save of the quickstart smoke model on 8 devices, for nothing on one host. Multi-host runs
    keep the default."""
    if jax.process_count() == 1:
        absl_log = logging.getLogger("absl")  # quiet its warning that the default handler is overridden
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        finally:
            absl_log.setLevel(level)


class Checkpoints:
    def __init__(self, directory: str, ckpt_cfg=None, *, read_only: bool = False):
        keep_last = ckpt_cfg.keep_last if ckpt_cfg else None
        keep_every = (ckpt_cfg.keep_every or None) if ckpt_cfg else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            keep_period=keep_every,  # steps divisible by it are never deleted
            enable_async_checkpointing=bool(ckpt_cfg.async_save) if ckpt_cfg else False,
            create=not read_only,
            read_only=read_only,
        )
        self.directory = os.path.abspath(directory)
        _write_arrays_whole_on_one_process()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, record: dict) -> None:
        """Starts an async save; the device-to-host copy happens before this returns, so the caller may
        donate `state`'s buffers right after."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                record=ocp.args.JsonSave(record),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state):
        """Restores `step` into `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                record=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["record"]

    def restore_latest(self, abstract_state):
        """The newest step that restores cleanly, falling back past broken ones; None if there is none."""
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # a partial or corrupt step: say so and try the one before
                log.warning("checkpoint step %d could not be restored (%s: %s); trying an older one",
                            step, type(e).__name__, e)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
