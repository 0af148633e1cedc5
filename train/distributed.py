"""Multi-process JAX: connect the processes of one run before JAX touches a device.

    effax train ... --coordinator HOST:PORT --num-processes N --process-id I   explicit (any launcher)
    srun -n N effax train ...                                                  Slurm: found in the environment

Every process runs the same `effax train` command; after `initialize` each sees all devices of the run
(`jax.devices()`) and its own (`jax.local_devices()`), and the loop gives each process its rows of the
global batch. It must run before any JAX computation or device query: the backends read the
distributed client when they are created.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

import jax


class DistributedError(RuntimeError):
    """Bad multi-process flags, or `jax.distributed.initialize` failed."""


def slurm_step_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """The number of tasks of the Slurm job step this process belongs to (0 outside a step).

    SLURM_STEP_NUM_TASKS is set by `srun` for the processes it starts. SLURM_NTASKS alone is not
    enough: it is also set in the batch script of a many-task job, which is a single process and would
    wait forever for peers that never come."""
    if "SLURM_JOB_ID" not in environ:
        return 0
    try:
        return int(environ.get("SLURM_STEP_NUM_TASKS", "0"))
    except ValueError:
        return 0


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, environ: Mapping[str, str] = os.environ, timeout_s: int = 300) -> bool:
    """Starts jax.distributed if this is a multi-process run; returns whether it did.

    Explicit flags win (all three together). Without them, a Slurm step with several tasks initializes
    from Slurm's environment; otherwise this is a single-process run and nothing happens."""
    explicit = [coordinator, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise DistributedError("--coordinator, --num-processes and --process-id go together; got "
                                   f"coordinator={coordinator} num_processes={num_processes} process_id={process_id}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process-id {process_id} is not in [0, --num-processes {num_processes})")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        where = f"coordinator {coordinator}"
    elif slurm_step_tasks(environ) > 1:
        # jax reads the coordinator (first node of the step, a port derived from the job id) from Slurm.
        # The counts are taken from the step rather than the job (jax uses SLURM_NTASKS), so an
        # `srun -n 2` inside a larger allocation still agrees on the number of processes.
        kwargs = dict(num_processes=slurm_step_tasks(environ), process_id=int(environ["SLURM_PROCID"]))
        where = f"Slurm job {environ['SLURM_JOB_ID']}"
    else:
        return False
    # CPU processes exchange collectives through gloo (jax 0.10's default; set explicitly because
    # without a CPU collectives implementation a multi-process CPU computation fails at run time).
    # The setting only concerns the CPU backend, so it is harmless on GPU and TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
        raise DistributedError(f"jax.distributed.initialize failed ({where}, {kwargs}): {type(e).__name__}: {e}") from e
    # One line per process (the loop's own output comes from process 0 only): proves who joined.
    print(f"effax: process {jax.process_index()} of {jax.process_count()} ({where}), "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices", file=sys.stderr, flush=True)
    return True
