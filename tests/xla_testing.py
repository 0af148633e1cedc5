"""XLA flags for the test processes and the subprocesses they start (effax train / sweep / bench children).

XLA's backend (LLVM) optimisation is off: the suite's programs are tiny, so on 2 cores it pays for compiling,
not for running (off halves the CPU time of tests/models/test_dense.py + tests/layers/test_moe.py). The
HLO-level program is the same, and every process of a test gets the same flags, so bit-for-bit comparisons
across processes (kill and resume, meshes) still compare like with like."""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
