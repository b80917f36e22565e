"""backend="auto" falling back to the reference says so once per process, with the reason and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch

from fused_lagrangian import backends
from fused_lagrangian.backends import native_build, registry

CPU = torch.device("cpu")


@pytest.fixture
def native_missing(monkeypatch):
    """The native backend unavailable with a known reason, and no fallback warned about yet."""
    missing = backends.Backend("native", lambda device_type: "not built (test)", lambda: None)
    monkeypatch.setitem(registry._REGISTRY, "native", missing)
    monkeypatch.setattr(registry, "_WARNED_FALLBACK", set())
    monkeypatch.setattr(registry, "_RESOLVED", {})  # resolve() decides once per process: forget its decisions


def test_auto_fallback_warns_once_with_the_reason(native_missing):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picks = [backends.resolve("auto", CPU) for _ in range(3)]
    assert picks == ["reference"] * 3
    assert len(caught) == 1 and caught[0].category is backends.BackendFallbackWarning
    message = str(caught[0].message)
    assert "native: not built (test)" in message and "fused-lagrangian info" in message


def test_asking_for_the_reference_never_warns(native_missing):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("reference", CPU) == "reference"


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("", "auto"), ("0", "never"), ("1", "always")])
def test_jit_environment_variable(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv(native_build.JIT_ENV, raising=False)
    else:
        monkeypatch.setenv(native_build.JIT_ENV, value)
    assert native_build.jit_mode() == mode


def test_compiling_is_skipped_when_forbidden(monkeypatch):
    monkeypatch.setenv(native_build.JIT_ENV, "0")
    assert native_build.compile_and_load() is None
    assert "FUSED_LAGRANGIAN_JIT=0 forbids" in native_build.not_built_reason()


def test_the_sources_are_found_beside_the_package():
    # A source checkout (this test run): csrc/ next to the package, with the build settings setup.py uses.
    assert native_build.source_dir() is not None
