"""Launching runs: the small interface every backend implements (local process pool, Slurm).

A backend receives fully resolved runs — each one an `effax train` command line and its workdir — and
reports each run's outcome. It knows nothing of sweep specs, fits or the run index (spec.py, runner.py
and store.py beside it do). Every run is resumable (its workdir holds its checkpoints), so a retry or a
relaunch simply runs the same command again.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Protocol

Status = Literal["pending", "running", "finished", "failed", "interrupted", "timeout"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    run_id: str  # hash of the resolved config (train/sweeps/spec.py)
    workdir: str  # absolute; `effax train` resumes from it
    argv: tuple[str, ...]  # arguments after `effax train`: CONFIG[:VARIANT] --workdir DIR --set ...
    nodes: int = 1  # multi-host: nodes × tasks_per_node processes, jax.distributed under Slurm
    tasks_per_node: int = 1
    timeout_s: float | None = None  # per attempt
    retries: int = 0  # extra attempts after a failure or timeout (each resumes from the last checkpoint)


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_id: str
    status: Status
    returncode: int | None
    attempts: int
    log_path: str | None = None  # where the run's stdout/stderr went


OnUpdate = Callable[[str, Status, int], None]  # (run_id, status, attempt): called as runs start and end


class Backend(Protocol):
    name: str

    def launch(self, runs: list[RunSpec], *, on_update: OnUpdate | None = None) -> list[RunResult]:
        """Runs every spec to an end state (concurrency per the backend's own settings) and returns one
        result per spec, in order. On KeyboardInterrupt: stop the children so they save a checkpoint
        (SIGTERM; `effax train` exits 143 after saving), mark them interrupted, and re-raise."""
        ...
