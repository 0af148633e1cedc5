"""Shared test set-up. 8 fake CPU devices for the sharding tests and XLA's fast compile (tests/xla_testing.py):
XLA reads the flags when jax first initialises its backend, so they are set here, before any test imports jax."""

import os

from xla_testing import xla_flags

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith(("--xla_force_host_platform_device_count", "--xla_backend_optimization_level"))
) + " " + xla_flags(8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> pathlib.Path:
    return REPO
