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


def watch(find_runs, checkpoint_steps, is_done, evaluate_step, *, poll: float, timeout: float | None,
          until_step: int | None) -> int:
    """Polls until interrupted, `timeout` seconds pass without a new checkpoint, or every run has a checkpoint
    at step >= `until_step` evaluated.

    find_runs() -> run folders; checkpoint_steps(run) -> its finished checkpoint steps; is_done(run, step)
    -> whether that step's results exist; evaluate_step(run, step) evaluates and files one checkpoint.
    A run's steps are listed once per poll and both the work and the --until-step check come from that
    one listing: a checkpoint that lands between two listings must not count as done unevaluated.
    """
    failed: set[tuple[str, int]] = set()
    last_new = time.monotonic()
    while True:
        runs = find_runs()
        done_up_to = {}
        for run in runs:
            done_up_to[run] = -1
            for step in checkpoint_steps(run):
                if (run, step) not in failed and not is_done(run, step):
                    try:
                        evaluate_step(run, step)
                    except RestoreError as e:
                        log.warning("%s", e)
                        failed.add((run, step))
                    last_new = time.monotonic()
                done_up_to[run] = step  # evaluated now, before, or given up on
        if until_step is not None and runs and all(d >= until_step for d in done_up_to.values()):
            return 0
        if timeout is not None and time.monotonic() - last_new >= timeout:
            log.warning("no new checkpoint for %.0f s; stopping", timeout)
            return 0
        wait = poll if timeout is None else min(poll, max(0.0, timeout - (time.monotonic() - last_new)))
        time.sleep(wait)
