"""The life of a sweep root: which runs to launch, skip or resume, and the status each one reaches.

    launch = Launch(root, "exp.py:smoke", ["train.steps=50"], plan, "local")  # claims ROOT, indexes the plan
    launch.todo, launch.done                      # the runs to start (RunSpecs) and those already finished
    results = launch.run(LocalBackend(2))         # records every attempt's start and end in the index
    runs, launcher_alive = current_runs(open_store(root)[0])    # what `effax sweep status` shows

Statuses in ROOT/sweep.sqlite: pending → running → finished | failed | timeout | interrupted. A run whose
files show it finished is skipped; any other run is launched again and resumes from its checkpoints; a
"running" row left by a launcher that died is marked interrupted. One launcher per root (a flock on
ROOT/.launcher.lock), so two `effax sweep` commands never start the same run twice.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from effax.train.sweeps import spec as spec_lib
from effax.train.sweeps.launch import Backend, OnUpdate, RunResult, RunSpec, Status
from effax.train.sweeps.local import try_lock_file, wait_until_unlocked
from effax.train.sweeps.store import DB_NAME, Store, finished_on_disk


class SweepBusy(RuntimeError):
    """Another launcher holds the sweep root."""


def launcher_lock(root: str) -> int | None:
    """An fd holding ROOT/.launcher.lock, or None if another `effax sweep` holds it."""
    return try_lock_file(os.path.join(root, ".launcher.lock"))


def open_store(root: str, rebuild: bool = False) -> tuple[Store, int | None]:
    """The root's index and, if it was rebuilt from the run folders (asked for, or the index was lost),
    how many run folders it was rebuilt from."""
    fresh = not os.path.exists(os.path.join(root, DB_NAME))
    store = Store(root)
    return store, (store.rebuild() if fresh or rebuild else None)


def current_runs(store: Store) -> tuple[list[dict], bool]:
    """Every indexed run with its progress re-read from its files, and whether a launcher is running."""
    fd = launcher_lock(store.root)
    launcher_alive = fd is None
    if fd is not None:
        os.close(fd)
    local = store.meta().get("backend", "local") == "local"
    runs = []
    for r in store.runs():
        r = store.refresh(r["run_id"])
        # A local sweep's children stop with their launcher: its "running" rows are stale once it is gone.
        if r["status"] == "running" and not launcher_alive and local:
            store.update(r["run_id"], status="interrupted")
            r["status"] = "interrupted"
        runs.append(r)
    return runs, launcher_alive


class Launch:
    """One launch of a planned sweep into ROOT: claims the root, writes each run's sweep.json, indexes the
    runs, and splits them into finished (skipped) and to-do (started, or resumed from their checkpoints)."""

    def __init__(self, root: str, spec: str, overrides: Sequence[str], plan: Sequence[spec_lib.PlannedRun],
                 backend_name: str, *, nodes: int = 1, tasks_per_node: int = 1, timeout_s: float | None = None,
                 retries: int = 0):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.lock = launcher_lock(self.root)  # held until close() or the process ends
        if self.lock is None:
            raise SweepBusy(f"another `effax sweep` is already launching runs in {self.root}")
        self.store, _ = open_store(self.root)  # a root whose index was lost: statuses come back from the run folders
        self.store.set_meta(config=spec, overrides=list(overrides), backend=backend_name)
        if backend_name == "local":  # an orphan of a killed launcher may still be saving: see its final files
            wait_until_unlocked([os.path.join(self.root, r.run_id) for r in plan])
        self.todo: list[RunSpec] = []
        self.done = 0
        for position, run in enumerate(plan):
            workdir = os.path.join(self.root, run.run_id)
            spec_lib.write_sweep_json(workdir, {**run.sweep_json(spec, overrides), "position": position})
            self.store.add(run.run_id, position=position, arch=run.arch, overrides=list(run.overrides), workdir=workdir)
            if finished_on_disk(workdir):
                self.store.update(run.run_id, status="finished")
                self.store.refresh(run.run_id)
                self.done += 1
                continue
            if (self.store.get(run.run_id) or {}).get("status") in ("running", "finished"):
                self.store.update(run.run_id, status="interrupted")  # a dead launcher's run, or its files were lost
            self.todo.append(RunSpec(run.run_id, workdir, spec_lib.train_argv(spec, overrides, run, workdir),
                                     nodes=nodes, tasks_per_node=tasks_per_node, timeout_s=timeout_s, retries=retries))

    def run(self, backend: Backend, on_update: OnUpdate | None = None) -> list[RunResult]:
        """Runs the to-do list to end states on `backend`, indexing each attempt as it starts and ends
        (then calling `on_update`). A KeyboardInterrupt propagates once the backend has stopped the runs
        and they are indexed as interrupted."""
        base = {r.run_id: (self.store.get(r.run_id) or {}).get("attempts", 0) for r in self.todo}

        def record(run_id: str, status: Status, attempt: int) -> None:
            now = time.time()
            if status == "running":  # attempts count across launches
                self.store.update(run_id, status="running", attempts=base[run_id] + attempt, started=now, ended=None)
            else:
                self.store.update(run_id, status=status, ended=now)
                self.store.refresh(run_id)
            if on_update:
                on_update(run_id, status, attempt)

        try:
            results = backend.launch(self.todo, on_update=record)
        except KeyboardInterrupt:
            # A Ctrl-C can land inside `record`, between a status and its refresh: read every run's figures
            # back from its files, so the index never shows a finished run without its last step.
            for r in self.todo:
                self.store.refresh(r.run_id)
            raise
        for res in results:
            self.store.update(res.run_id, returncode=res.returncode, status=res.status)
            self.store.refresh(res.run_id)
        return results

    def close(self) -> None:
        """Releases the root for the next launcher."""
        self.store.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
