"""Watch mode: evaluate each new finished checkpoint of one run or of a sweep's runs as they train.

A checkpoint counts as evaluated when its result files exist (so a restarted watcher, or one-shot
`effax eval` runs, are not repeated). A checkpoint that cannot be restored (deleted by retention
meanwhile, or corrupt) is reported once and not retried.
"""

from __future__ import annotations

import logging
import time

from effax.eval.restore import RestoreError

log = logging.getLogger("effax")


def watch(find_runs, pending, evaluate_step, *, poll: float, timeout: float | None, until_step: int | None,
          checkpoint_steps) -> int:
    """Polls until interrupted, `timeout` seconds pass without a new checkpoint, or every run has a checkpoint
    at step >= `until_step` evaluated.

    find_runs() -> run folders; pending(run) -> its checkpoint steps without results;
    evaluate_step(run, step) evaluates and files one checkpoint; checkpoint_steps(run) -> all its steps.
    """
    failed: set[tuple[str, int]] = set()
    last_new = time.monotonic()
    while True:
        runs = find_runs()
        for run in runs:
            for step in pending(run):
                if (run, step) in failed:
                    continue
                try:
                    evaluate_step(run, step)
                except RestoreError as e:
                    log.warning("%s", e)
                    failed.add((run, step))
                last_new = time.monotonic()
        if until_step is not None and runs and all(_done_up_to(r, pending, checkpoint_steps, failed) >= until_step
                                                   for r in runs):
            return 0
        if timeout is not None and time.monotonic() - last_new >= timeout:
            log.warning("no new checkpoint for %.0f s; stopping", timeout)
            return 0
        wait = poll if timeout is None else min(poll, max(0.0, timeout - (time.monotonic() - last_new)))
        time.sleep(wait)


def _done_up_to(run: str, pending, checkpoint_steps, failed) -> int:
    """The highest step of `run` that is evaluated (or given up on); -1 if none."""
    todo = set(pending(run))
    return max((s for s in checkpoint_steps(run) if s not in todo or (run, s) in failed), default=-1)
