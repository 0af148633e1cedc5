"""A real single-node Slurm for the tests (shared/notes/local-slurm.md): munged, slurmctld and slurmd
from Debian's packages, started with a config in a temporary folder and stopped by their pid files.

If `sinfo` already answers (a real cluster, or a Slurm someone started), it is used as it is and left
alone. pytest-xdist workers share one cluster: a lock file and a user count make the first user start
it and the last one stop it, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

STATE = os.path.join(tempfile.gettempdir(), "effax-test-slurm")  # shared by the xdist workers
PACKAGES = "slurmctld slurmd slurm-client munge"


class SlurmUnavailable(RuntimeError):
    pass


def _answers(env=None) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _check_installed() -> None:
    missing = [b for b in ("sinfo", "sbatch", "srun", "slurmctld", "slurmd", "munged")
               if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found: install the Debian packages ({PACKAGES}), "
                               f"e.g. `apt-get update && apt-get install -y {PACKAGES}` (.ci/run does this)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting a local Slurm needs root (slurmd runs jobs as any user)")


def _config(folder: str) -> str:
    host = socket.gethostname().split(".")[0]
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    cpus = max(2, os.cpu_count() or 1)  # the multi-host test needs 2 tasks on the one node
    return f"""\
ClusterName=effaxtest
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ReturnToService=2
# The node is described, not probed: a 1-CPU runner must not drain it for having fewer CPUs.
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=30
NodeName={host} CPUs={cpus} RealMemory={int(mem_mb * 0.8)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: str) -> int | None:
    try:
        return int(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(pid_files: list[str]) -> None:
    for path in pid_files:
        pid = _pid(path)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _munge_works() -> bool:
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


def _start(folder: str) -> dict:
    """Starts the daemons; returns what to stop later."""
    _check_installed()
    os.makedirs(f"{folder}/state", exist_ok=True)
    os.makedirs(f"{folder}/spool", exist_ok=True)
    conf = f"{folder}/slurm.conf"
    with open(conf, "w") as f:
        f.write(_config(folder))
    started = {"conf": conf, "pid_files": [], "folder": folder}
    if not _munge_works():
        munge = pwd.getpwnam("munge")
        os.makedirs("/run/munge", exist_ok=True)
        os.chown("/run/munge", munge.pw_uid, munge.pw_gid)
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "-c"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        started["pid_files"].append("/run/munge/munged.pid")
    env = dict(os.environ, SLURM_CONF=conf)
    for daemon in ("slurmctld", "slurmd"):
        r = subprocess.run([f"/usr/sbin/{daemon}", "-f", conf], env=env, capture_output=True, text=True)
        started["pid_files"].insert(0, f"{folder}/{daemon}.pid")  # stopped in reverse order
        if r.returncode:
            _stop(started["pid_files"])
            raise SlurmUnavailable(f"{daemon} failed to start ({r.returncode}): {r.stderr}")
    deadline = time.time() + 60
    while time.time() < deadline:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == "idle":
            return started
        time.sleep(0.5)
    logs = "".join(open(f"{folder}/{d}.log").read()[-1500:] for d in ("slurmctld", "slurmd")
                   if os.path.exists(f"{folder}/{d}.log"))
    _stop(started["pid_files"])
    raise SlurmUnavailable(f"the local Slurm node did not become idle in 60 s; logs:\n{logs}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@contextlib.contextmanager
def _locked():
    """The shared state under an exclusive lock. Users are pids, so a crashed test run cannot keep a
    cluster alive: its pid is pruned, and a cluster left without users is stopped."""
    os.makedirs(STATE, exist_ok=True)
    with open(f"{STATE}/lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = f"{STATE}/users.json"
        state = json.load(open(path)) if os.path.exists(path) else {"users": [], "started": None}
        state["users"] = [p for p in state["users"] if _alive(p)]
        yield state
        if not state["users"] and state["started"]:
            _stop(state["started"]["pid_files"])
            shutil.rmtree(state["started"]["folder"], ignore_errors=True)
            state["started"] = None
        with open(path, "w") as f:
            json.dump(state, f)


@contextlib.contextmanager
def local_slurm():
    """Yields the environment in which Slurm's commands reach the cluster (SLURM_CONF set if started here)."""
    with _locked() as state:
        if state["started"] and not state["users"]:  # left by a crashed run: stop it, start afresh
            _stop(state["started"]["pid_files"])
            state["started"] = None
        if not state["started"] and not _answers():
            state["started"] = _start(tempfile.mkdtemp(prefix="slurm-", dir=STATE))
        state["users"].append(os.getpid())
        started = state["started"]
    env = {"SLURM_CONF": started["conf"]} if started else {}
    try:
        yield env
    finally:
        with _locked() as state:
            state["users"] = [p for p in state["users"] if p != os.getpid()]
