"""Shared test set-up. 8 fake CPU devices for the sharding tests: XLA reads the flag when jax first
initialises its backend, so it is set here, before any test imports jax."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
) + " --xla_force_host_platform_device_count=8"

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> pathlib.Path:
    return REPO
