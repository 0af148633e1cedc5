"""eval/watch.py's polling loop with fake runs: a checkpoint that appears at any moment of a poll is
evaluated before --until-step lets the watcher stop."""

import pytest

from effax.eval import watch


@pytest.mark.parametrize("appears_after", [0, 1, 2, 3, 4])
def test_a_checkpoint_landing_mid_poll_is_still_evaluated(appears_after):
    calls, evaluated = [], []

    def checkpoint_steps(run):  # step 6 lands once `appears_after` listings have been taken
        calls.append(run)
        return [3, 6] if len(calls) > appears_after else [3]

    rc = watch.watch(lambda: ["run"], checkpoint_steps, lambda run, step: (run, step) in evaluated,
                     lambda run, step: evaluated.append((run, step)), poll=0.0, timeout=None, until_step=6)
    assert rc == 0 and evaluated == [("run", 3), ("run", 6)]
