"""The Slurm backend: each run is a Slurm job submitted through submitit; runs with the same shape
(nodes, tasks per node, time limit) go in one job array, capped at `max_parallel` running at once.

Every task of a job runs `python -m effax.cli train ARGV` as a child process. With several tasks the
children find each other through Slurm's environment (train/distributed.py), so a multi-node run needs
nothing more than `RunSpec(nodes=…, tasks_per_node=…)`.

Ends of a run, and how they map to statuses:
  exit 0 in every task                           finished
  exit 143 (SIGTERM: the time limit came, or a   timeout   Slurm sends SIGTERM `term_grace_s` before the
  preemption; the run saved a checkpoint)                  limit (sbatch --signal), so the run saves first
  Slurm state TIMEOUT                            timeout   (killed before it could save)
  anything else                                  failed
A failed or timed-out run is submitted again, up to `retries` times; `effax train` resumes from its last
checkpoint. Ctrl-C cancels every job (scancel: Slurm sends SIGTERM, the runs save and exit 143), marks
the runs interrupted and re-raises.

State comes from `squeue` (accounting with `sacct` is often absent on small clusters) and exit
statuses from submitit's result files. Logs: `<folder>/<job id>/*_log.out`, one per task, with a
`slurm-<job id>.out` link to task 0's log in the run's workdir.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Mapping

from effax.train.sweeps.launch import OnUpdate, RunResult, RunSpec, Status

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
SIGTERM_EXIT = 143


class SlurmError(RuntimeError):
    """Slurm's commands are missing or refused a submission."""


def run_task(argv: list[str], cwd: str, env: Mapping[str, str]) -> int:
    """Runs in every task of a job: `effax train ARGV` in a child process; returns its exit status.

    A child rather than a call: it gets a fresh JAX (jax.distributed is initialized once per process)
    and its own signal handlers. SIGTERM is forwarded to it, in case Slurm signals only this process
    (submitit's own handler would merely log it)."""
    child = subprocess.Popen([sys.executable, "-m", "effax.cli", "train", *argv], cwd=cwd, env={**os.environ, **env})
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    return child.wait()


@dataclasses.dataclass
class _Run:
    index: int
    spec: RunSpec
    attempts: int = 0
    job: Any = None  # the current submitit job
    status: Status = "pending"
    returncode: int | None = None
    log_path: str | None = None


class SlurmBackend:
    name = "slurm"

    def __init__(self, folder: str | None = None, *, partition: str | None = None, account: str | None = None,
                 cpus_per_task: int | None = None, mem_gb: float | None = None, gres: str | None = None,
                 max_parallel: int = 256, sbatch_args: Mapping[str, Any] | None = None,
                 setup: list[str] | None = None, env: Mapping[str, str] | None = None,
                 term_grace_s: int = 120, poll_s: float = 5.0):
        """folder: submitit's folder (pickles and logs; default `<parent of the workdirs>/slurm`).
        partition, account, cpus_per_task, mem_gb (per node), gres (e.g. "gpu:8"): sbatch options.
        max_parallel: how many jobs of one array run at once. sbatch_args: any other sbatch option
        ({"qos": "high", "constraint": "h100"}). setup: shell lines run before the tasks (module load …).
        env: variables set for `effax train` in every task. term_grace_s: SIGTERM this long before
        the time limit so the run saves a checkpoint."""
        self.folder = folder
        mem = None if mem_gb is None else f"{math.ceil(mem_gb * 1024)}MB"
        self.options = {k: v for k, v in dict(partition=partition, account=account, cpus_per_task=cpus_per_task,
                                              mem=mem, gres=gres, setup=setup).items() if v is not None}
        self.max_parallel = max_parallel
        self.sbatch_args = dict(sbatch_args or {})
        self.env = dict(env or {})
        self.term_grace_s = term_grace_s
        self.poll_s = poll_s

    # -- submission ------------------------------------------------------------------------------

    def _executor(self, folder: str, spec: RunSpec):
        import submitit

        minutes = None if spec.timeout_s is None else max(1, math.ceil(spec.timeout_s / 60))
        grace = self.term_grace_s if minutes is None else min(self.term_grace_s, minutes * 30)
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        ex.update_parameters(
            job_name="effax", nodes=spec.nodes, ntasks_per_node=spec.tasks_per_node, time=minutes,
            array_parallelism=self.max_parallel, stderr_to_stdout=True,
            # submitit's default --signal is USR2, which would kill `effax train` without a checkpoint.
            additional_parameters={"signal": f"TERM@{grace}", **self.sbatch_args},
            **self.options,
        )
        return ex

    def _submit(self, runs: list[_Run], folder: str, on_update: OnUpdate | None) -> None:
        """One array per shape: submitit's batch() turns the submissions into a single sbatch --array."""
        groups: dict[tuple, list[_Run]] = {}
        for r in runs:
            groups.setdefault((r.spec.nodes, r.spec.tasks_per_node, r.spec.timeout_s), []).append(r)
        cwd = os.getcwd()  # experiment paths in argv are relative to it
        for group in groups.values():
            ex = self._executor(folder, group[0].spec)
            try:
                with ex.batch():
                    jobs = [ex.submit(run_task, list(r.spec.argv), cwd, self.env) for r in group]
            except Exception as e:  # noqa: BLE001 - sbatch's own message says what is wrong
                raise SlurmError(f"sbatch refused the submission: {e}") from e
            for r, job in zip(group, jobs):
                r.job, r.attempts, r.status, r.returncode = job, r.attempts + 1, "pending", None
                r.log_path = str(job.paths.stdout)
                os.makedirs(r.spec.workdir, exist_ok=True)
                link = os.path.join(r.spec.workdir, f"slurm-{job.job_id}.out")
                if not os.path.lexists(link):
                    os.symlink(r.log_path, link)
                if on_update:
                    on_update(r.spec.run_id, "pending", r.attempts)

    # -- state -----------------------------------------------------------------------------------

    @staticmethod
    def _squeue() -> dict[str, str] | None:
        """Slurm state per job id ("123", or "123_4" for an array element) of this user's jobs; ended
        jobs stay listed for MinJobAge (5 min by default). None when squeue fails (try again later)."""
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", str(os.getuid()), "-o", "%i %T"],
                             capture_output=True, text=True)
        if out.returncode:
            return None
        return dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())

    @staticmethod
    def _outcome(job, state: str | None) -> tuple[Status, int | None]:
        """The status of an ended job from its tasks' exit statuses (submitit's result files)."""
        codes: list[int | None] = []
        for k in range(job.num_tasks):
            task = job.task(k) if job.num_tasks > 1 else job
            if not task.paths.result_pickle.exists():
                codes.append(None)  # killed before it could report
                continue
            try:
                codes.append(int(task.result()))
            except Exception:  # noqa: BLE001 - the job's log holds the traceback
                codes.append(None)
        rc = next((c for c in codes if c != 0), 0)
        if rc == 0:
            return "finished", 0
        if state == "TIMEOUT" or rc == SIGTERM_EXIT:
            return "timeout", rc
        return "failed", rc

    # -- the launch loop -------------------------------------------------------------------------

    def launch(self, runs: list[RunSpec], *, on_update: OnUpdate | None = None) -> list[RunResult]:
        try:
            import submitit  # noqa: F401
        except ImportError as e:
            raise SlurmError("submitit is not installed: pip install 'effax[slurm]'") from e
        for tool in ("sbatch", "squeue", "scancel"):
            if shutil.which(tool) is None:
                raise SlurmError(f"{tool} not found: install slurm-client, or run on a Slurm login node")
        if not runs:
            return []
        folder = self.folder or os.path.join(os.path.commonpath([os.path.dirname(r.workdir) for r in runs]), "slurm")
        folder = os.path.join(folder, "%j")
        state = [_Run(i, spec) for i, spec in enumerate(runs)]
        self._submit(state, folder, on_update)
        try:
            while live := [r for r in state if r.status in ("pending", "running")]:
                time.sleep(self.poll_s)
                slurm = self._squeue()
                if slurm is None:
                    continue
                retry = []
                for r in live:
                    s = slurm.get(r.job.job_id)  # None: ended and aged out of squeue
                    if s in ACTIVE:
                        if s == "RUNNING" and r.status == "pending":
                            r.status = "running"
                            if on_update:
                                on_update(r.spec.run_id, "running", r.attempts)
                        continue
                    r.status, r.returncode = self._outcome(r.job, s)
                    if on_update:
                        on_update(r.spec.run_id, r.status, r.attempts)
                    if r.status in ("failed", "timeout") and r.attempts <= r.spec.retries:
                        retry.append(r)
                if retry:
                    self._submit(retry, folder, on_update)
        except KeyboardInterrupt:
            live = [r for r in state if r.status in ("pending", "running")]
            if live:
                subprocess.run(["scancel", *[r.job.job_id for r in live]], capture_output=True)
            for r in live:
                r.status = "interrupted"
                if on_update:
                    on_update(r.spec.run_id, "interrupted", r.attempts)
            raise
        return [RunResult(r.spec.run_id, r.status, r.returncode, r.attempts, r.log_path) for r in state]
