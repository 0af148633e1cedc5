"""LocalBackend: runs `effax train` commands as a pool of subprocesses on this machine.

    LocalBackend(concurrency=2, env={"XLA_FLAGS": "..."}).launch(specs, on_update=...)

One thread polls the pool (no worker threads: the parent-death signal below belongs to the thread
that forked the child). Each attempt appends to `<workdir>/train.log`, framed by the lines
store.ATTEMPT_START / ATTEMPT_END. Exit status → run status: 0 finished; 143/130 (or killed by
SIGTERM/SIGINT) interrupted; past its timeout timeout (SIGTERM, then SIGKILL after `grace_s`); anything
else failed. Failures and timeouts are retried up to `spec.retries` times — the same command, which
resumes from the run's latest checkpoint — except exit 2 (config error) and 3 (diverged), which would
only fail again.

Robustness to a launcher that dies (SIGKILL, a closed terminal):
  * children run in their own session (a Ctrl-C reaches only the launcher, which stops them with one
    SIGTERM) and, on Linux, get SIGTERM when the launcher dies (PR_SET_PDEATHSIG): an orphan saves a
    checkpoint and exits instead of training on unobserved;
  * each child holds an exclusive flock on `<workdir>/.sweep.lock` for its whole life, and a run is only
    started once its lock is free: a relaunch waits for an orphan to finish saving, and two processes
    never train one workdir at once.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import time

from effax.train.sweeps.launch import OnUpdate, RunResult, RunSpec, Status
from effax.train.sweeps.store import ATTEMPT_END, ATTEMPT_START, log_attempts

LOCK_NAME = ".sweep.lock"
NO_RETRY_EXIT = (2, 3)  # config error, diverged: deterministic, a retry would fail the same way
INTERRUPTED_EXIT = (143, 130, -signal.SIGTERM, -signal.SIGINT)

try:  # loaded in the parent: the pre-exec hook must not dlopen between fork and exec
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _libc = None


def _stop_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def try_lock(workdir: str) -> int | None:
    """An fd holding the run's exclusive lock, or None while another process holds it."""
    os.makedirs(workdir, exist_ok=True)
    return try_lock_file(os.path.join(workdir, LOCK_NAME))


def try_lock_file(path: str) -> int | None:
    """An fd holding an exclusive flock on `path` (released when the process dies), or None if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def wait_until_unlocked(workdirs: list[str], poll_s: float = 0.5) -> None:
    """Blocks until no process (an orphan of a killed launcher) holds any of these runs' locks, so the
    caller then sees their final files: an orphan that went on to finish is not started again."""
    for wd in workdirs:
        if not os.path.exists(os.path.join(wd, LOCK_NAME)):
            continue
        told = False
        while (fd := try_lock(wd)) is None:
            if not told:
                print(f"effax sweep: waiting for an earlier process of {wd} to exit", file=sys.stderr)
                told = True
            time.sleep(poll_s)
        os.close(fd)


@dataclasses.dataclass
class _Attempt:
    index: int  # into the spec list
    number: int  # 1-based attempt of this launch
    label: int  # 1-based attempt of the run across launches (train.log)
    proc: subprocess.Popen
    log: object
    started: float
    term_sent: float | None = None  # when we sent SIGTERM (timeout or interrupt)
    timed_out: bool = False


class LocalBackend:
    name = "local"

    def __init__(self, concurrency: int = 1, *, env: dict[str, str] | None = None, command: list[str] | None = None,
                 grace_s: float = 60.0, poll_s: float = 0.2):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.env = dict(env or {})  # e.g. XLA_FLAGS, JAX_PLATFORMS; by default children inherit ours
        self.command = list(command or [sys.executable, "-m", "effax.cli", "train"])
        self.grace_s, self.poll_s = grace_s, poll_s

    # -----------------------------------------------------------------------------------------------
    def _start(self, spec: RunSpec, index: int, number: int, lock_fd: int) -> _Attempt:
        label = log_attempts(spec.workdir)[0] + 1  # the log numbers attempts across relaunches too
        log = open(os.path.join(spec.workdir, "train.log"), "a", buffering=1)
        cmd = [*self.command, *spec.argv]
        log.write(f"{ATTEMPT_START.format(attempt=label)} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(cmd)}\n")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, pass_fds=(lock_fd,), preexec_fn=_stop_with_parent)
        finally:
            os.close(lock_fd)  # the child's copy now holds the lock
        return _Attempt(index, number, label, proc, log, time.monotonic())

    @staticmethod
    def _signal(att: _Attempt, sig: int) -> None:
        try:
            os.killpg(att.proc.pid, sig)  # the child's session: it and anything it spawned
        except ProcessLookupError:
            pass

    @staticmethod
    def _status(att: _Attempt, rc: int) -> Status:
        if rc == 0:
            return "finished"
        if att.timed_out:
            return "timeout"
        return "interrupted" if rc in INTERRUPTED_EXIT else "failed"

    @staticmethod
    def _finish_log(att: _Attempt, status: Status, rc: int) -> None:
        att.log.write(f"{ATTEMPT_END.format(attempt=att.label, status=status)} (exit {rc}) after "
                      f"{time.monotonic() - att.started:.1f} s\n")
        att.log.close()

    # -----------------------------------------------------------------------------------------------
    def launch(self, runs: list[RunSpec], *, on_update: OnUpdate | None = None) -> list[RunResult]:
        notify = on_update or (lambda *a: None)
        queue = collections.deque((i, 1) for i in range(len(runs)))
        active: dict[int, _Attempt] = {}
        results: dict[int, RunResult] = {}
        waiting: set[int] = set()
        try:
            while queue or active:
                # Start what fits, skipping runs whose workdir is still held by an older process.
                for _ in range(len(queue)):
                    if len(active) >= self.concurrency:
                        break
                    i, number = queue.popleft()
                    fd = try_lock(runs[i].workdir)
                    if fd is None:
                        if i not in waiting:
                            waiting.add(i)
                            print(f"effax sweep: waiting for an earlier process of run {runs[i].run_id} to exit "
                                  f"(it holds {os.path.join(runs[i].workdir, LOCK_NAME)})", file=sys.stderr)
                        queue.append((i, number))
                        continue
                    active[i] = self._start(runs[i], i, number, fd)
                    notify(runs[i].run_id, "running", number)
                time.sleep(self.poll_s)
                now = time.monotonic()
                for i, att in list(active.items()):
                    spec, rc = runs[i], att.proc.poll()
                    if rc is None:
                        if spec.timeout_s is not None and att.term_sent is None and now - att.started > spec.timeout_s:
                            att.timed_out, att.term_sent = True, now
                            self._signal(att, signal.SIGTERM)  # effax train saves a checkpoint and exits
                        elif att.term_sent is not None and now - att.term_sent > self.grace_s:
                            self._signal(att, signal.SIGKILL)
                        continue
                    del active[i]
                    status = self._status(att, rc)
                    self._finish_log(att, status, rc)
                    notify(spec.run_id, status, att.number)
                    if status in ("failed", "timeout") and att.number <= spec.retries and rc not in NO_RETRY_EXIT:
                        queue.appendleft((i, att.number + 1))
                    else:
                        results[i] = RunResult(spec.run_id, status, rc, att.number, os.path.join(spec.workdir, "train.log"))
        except KeyboardInterrupt:
            self._interrupt(runs, active, notify)
            raise
        return [results[i] for i in range(len(runs))]

    def _interrupt(self, runs: list[RunSpec], active: dict[int, _Attempt], notify: OnUpdate) -> None:
        """SIGTERM to every child (each saves a checkpoint and exits 143), wait for them — SIGKILL after
        the grace period or on a second Ctrl-C — and mark them interrupted."""
        for att in active.values():
            self._signal(att, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        try:
            while any(att.proc.poll() is None for att in active.values()) and time.monotonic() < deadline:
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            pass
        for att in active.values():
            if att.proc.poll() is None:
                self._signal(att, signal.SIGKILL)
            rc = att.proc.wait()
            status = "finished" if rc == 0 else "interrupted"
            self._finish_log(att, status, rc)
            notify(runs[att.index].run_id, status, att.number)
