"""The Slurm backend against a real single-node Slurm started by the test (tests/train/sweeps/slurm_fixture.py):
a capped job array of two runs, a 2-task multi-host run, and Ctrl-C cancelling the jobs."""

import os
import re
import subprocess
import time

import numpy as np
import pytest
import slurm_fixture
import submitit

from effax.train import metrics as metrics_lib
from effax.train.sweeps.launch import RunSpec
from effax.train.sweeps.slurm import SlurmBackend
from xla_testing import xla_flags

SMOKE = "experiments/quickstart.py:smoke"
SETS = ["mesh.data=-1", "logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def slurm_env():
    """A running Slurm, or a clear failure in CI (never a silent skip there). Elsewhere, a machine where
    `make test` could not install Slurm (no root or sudo, no apt) skips these tests, saying why."""
    try:
        with slurm_fixture.local_slurm() as env:
            yield env
    except slurm_fixture.SlurmUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"no Slurm for the Slurm backend tests: {e}")
        pytest.skip(f"no local Slurm could be started (make test installs it where root or sudo may): {e}")


@pytest.fixture
def backend(slurm_env, repo, monkeypatch):
    monkeypatch.chdir(repo)  # the runs' argv name the experiment relative to the checkout
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    # Jobs inherit this process's environment; give them one fake device each, not the suite's 8.
    return SlurmBackend(cpus_per_task=1, max_parallel=2, poll_s=1.0,
                        env={"XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"})


def spec(tmp_path, name, sets, **kw) -> RunSpec:
    workdir = str(tmp_path / name)
    return RunSpec(run_id=name, workdir=workdir, argv=(SMOKE, "--workdir", workdir, "--set", *SETS, *sets), **kw)


def train_losses(workdir) -> np.ndarray:
    return np.array([r["loss"] for r in metrics_lib.read(str(workdir), "train")])


def test_array_of_two_runs_finishes(backend, tmp_path):
    runs = [spec(tmp_path, f"run{i}", ["train.steps=4", "checkpoint.every=2", f"train.seed={i}"]) for i in range(2)]
    updates = []
    results = backend.launch(runs, on_update=lambda *u: updates.append(u))
    for r, s in zip(results, runs):
        assert r.status == "finished" and r.returncode == 0 and r.attempts == 1, (r, open(r.log_path).read()[-3000:])
        assert len(train_losses(s.workdir)) == 4
        assert sorted(os.listdir(os.path.join(s.workdir, "checkpoints"))) == ["2", "4"]
        assert any(f.startswith("slurm-") for f in os.listdir(s.workdir))  # the log link
    job_ids = {os.path.basename(os.path.dirname(r.log_path)) for r in results}
    assert len({j.split("_")[0] for j in job_ids}) == 1, job_ids  # one array, not two jobs
    assert [u for u in updates if u[1] == "finished"] and ("run0", "pending", 1) in updates


@pytest.mark.slow  # ~55 s: two tasks through Slurm; the default suite runs Slurm arrays, retries and Ctrl-C
def test_two_task_run_is_one_multihost_training(backend, tmp_path):
    run = spec(tmp_path, "multi", ["train.steps=4"], nodes=1, tasks_per_node=2)
    (result,) = backend.launch([run])
    log = open(result.log_path).read()
    assert result.status == "finished", log[-3000:]
    task1_log = result.log_path.replace("_0_log.out", "_1_log.out")
    # Each task printed its place in the run: Slurm's environment gave them distinct ids and one count.
    assert "effax: process 0 of 2" in log and "effax: process 1 of 2" in open(task1_log).read()
    # One training (tests/train/test_multihost.py checks such a run against one process to 1e-5), and
    # only process 0 wrote metrics: each step once.
    assert [r["step"] for r in metrics_lib.read(run.workdir, "train")] == [1, 2, 3, 4]

def test_ctrl_c_cancels_the_jobs_and_they_save(backend, tmp_path):
    run = spec(tmp_path, "long", ["train.steps=100000", "checkpoint.every=0"])
    seen = []

    def interrupt_once_training(run_id, status, attempt):
        seen.append(status)
        if status == "running":  # wait for the first logged step: the run's SIGTERM handler is in place
            metrics = os.path.join(run.workdir, "metrics.jsonl")
            deadline = time.time() + 120
            while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
                time.sleep(0.5)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backend.launch([run], on_update=interrupt_once_training)
    assert seen == ["pending", "running", "interrupted"]
    link = next(f for f in os.listdir(run.workdir) if f.startswith("slurm-"))
    job = submitit.SlurmJob(os.path.dirname(os.path.realpath(os.path.join(run.workdir, link))), link[6:-4])
    deadline = time.time() + 90  # KillWait is 30 s: the run must save and exit before SIGKILL
    while not job.paths.result_pickle.exists() and time.time() < deadline:
        time.sleep(1)
    log = open(job.paths.stdout).read()
    assert job.paths.result_pickle.exists(), f"the cancelled task never reported:\n{log[-3000:]}"
    # scancel sent SIGTERM: `effax train` saved where it was, said so and exited 143.
    assert job.result() == 143, log[-3000:]
    assert "stopped by signal 15" in log, log[-3000:]
    assert os.listdir(os.path.join(run.workdir, "checkpoints")), "the cancelled run saved no checkpoint"
    state = subprocess.run(["squeue", "-h", "-t", "all", "-j", job.job_id, "-o", "%T"], capture_output=True,
                           text=True).stdout.strip()
    assert state in ("CANCELLED", "COMPLETING"), state

@pytest.mark.slow  # about a minute per attempt: Slurm time limits are whole minutes
def test_time_limit_stops_with_a_checkpoint_and_the_retry_resumes(backend, tmp_path):
    """timeout_s=60 becomes --time=1 with --signal=TERM@10: Slurm's SIGTERM reaches `effax train`, which
    saves and exits 143 (outcome timeout); the resubmitted attempt resumes from that checkpoint. Slurm may
    send the signal up to one check period (~30 s) early: a 10 s grace keeps it after the run's start-up."""
    backend.term_grace_s = 10
    run = spec(tmp_path, "limited", ["train.steps=10000000", "checkpoint.every=0"], timeout_s=60, retries=1)
    (result,) = backend.launch([run])
    links = sorted((f for f in os.listdir(run.workdir) if f.startswith("slurm-")), key=lambda f: int(f[6:-4].split("_")[0]))
    logs = [open(os.path.join(run.workdir, f)).read() for f in links]
    assert (result.status, result.returncode, result.attempts) == ("timeout", 143, 2), (result, logs[-1][-3000:])
    stops = [int(re.search(r"stopped by signal 15 at step (\d+); checkpoint saved", log).group(1)) for log in logs]
    assert f"resumed from step {stops[0]} of" in logs[1], logs[1][-3000:]
    assert 0 < stops[0] < stops[1]
    steps = [r["step"] for r in metrics_lib.read(run.workdir, "train")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the retry went on; nothing was repeated


def test_failed_run_is_resubmitted_then_reported(backend, tmp_path):
    run = spec(tmp_path, "bad", ["no.such_key=1"], retries=1)  # effax train exits 2 before compiling
    (result,) = backend.launch([run])
    assert (result.status, result.returncode, result.attempts) == ("failed", 2, 2), result
    assert len([f for f in os.listdir(run.workdir) if f.startswith("slurm-")]) == 2  # two jobs, two logs


class FakeTask:
    def __init__(self, rc, tmp_path, k):
        self.rc, self.paths = rc, type("P", (), {"result_pickle": tmp_path / f"{k}.pkl"})()
        if rc is not None:
            self.paths.result_pickle.write_text("")

    def result(self):
        return self.rc


class FakeJob:
    def __init__(self, rcs, tmp_path):
        self.tasks = [FakeTask(rc, tmp_path, k) for k, rc in enumerate(rcs)]
        self.num_tasks = len(rcs)
        self.paths = self.tasks[0].paths

    def task(self, k):
        return self.tasks[k]

    def result(self):
        return self.tasks[0].rc


@pytest.mark.parametrize("rcs, state, expected", [
    ([0, 0], "COMPLETED", ("finished", 0)),
    ([0, 143], "COMPLETED", ("timeout", 143)),  # SIGTERM before the time limit: saved, resumable
    ([None], "TIMEOUT", ("timeout", None)),  # killed at the limit before reporting
    ([0, 1], "COMPLETED", ("failed", 1)),
    ([None], None, ("failed", None)),  # gone from squeue without a result: killed
])
def test_outcome_of_an_ended_job(tmp_path, rcs, state, expected):
    assert SlurmBackend._outcome(FakeJob(rcs, tmp_path), state) == expected
