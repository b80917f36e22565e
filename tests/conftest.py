"""Shared fixtures: the backends that can run on this machine's CPU."""

from __future__ import annotations

import os

import pytest

from fused_lagrangian import backends


def cpu_backends() -> list[str]:
    """"reference", plus "native" when built, plus "triton" when its interpreter is switched on."""
    names = ["reference"]
    if "native" in backends.names() and backends.unavailable_reason("native", "cpu") is None:
        names.append("native")
    if (os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends.names()
            and backends.unavailable_reason("triton", "cpu") is None):
        names.append("triton")
    return names


CPU_BACKENDS = cpu_backends()
# The Triton interpreter runs kernel programs one after another (~1-2 ms each): fine for unit tests,
# too slow for the examples' 10,000-step training runs.
TRAINING_BACKENDS = [name for name in CPU_BACKENDS if name != "triton"]


# Module scope: a module's tests can share expensive setup per backend (e.g. a reference training run).
@pytest.fixture(scope="module", params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=TRAINING_BACKENDS)
def training_backend(request) -> str:
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "install: builds and installs a wheel in a fresh virtual environment "
                                       "(1-2 minutes); deselect with -m 'not install'")
