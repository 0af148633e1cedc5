"""Shared test set-up. 8 fake CPU devices for the sharding tests and XLA's fast compile (tests/xla_testing.py):
XLA reads the flags when jax first initialises its backend, so they are set here, before any test imports jax."""

import os
import tempfile

from xla_testing import xla_flags

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith(("--xla_force_host_platform_device_count", "--xla_backend_optimization_level"))
) + " " + xla_flags(8)

# One persistent compilation cache for the whole run, shared by the xdist workers and every process a test
# starts (they inherit the variable, which the first conftest import sets): the suite compiles the same
# smoke programs in many processes. A fresh directory per run, so nothing carries over between runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="effax-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> pathlib.Path:
    return REPO
