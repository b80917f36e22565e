"""The table of backends: each backend module registers a ``Backend`` entry here, and ``resolve`` is the
one place that decides which backend runs on a device (for the step and for the loss-term ops alike).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

# Preference order of the "auto" choice, per device type: the first available backend wins.
AUTO_PREFERENCE = {
    "cuda": ("triton", "native", "reference"),
    "cpu": ("native", "reference"),
}


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    # Returns None when the backend can run on this device type, else the reason it cannot.
    unavailable_reason: Callable[[str], Optional[str]]
    # Resolved lazily so that importing the package never builds or compiles anything.
    load_fused_step: Callable[[], Callable]
    # Human-readable build/installation status for `fused-lagrangian info` ("" when nothing to say).
    build_status: Callable[[], str] = lambda: ""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def names() -> list[str]:
    return list(_REGISTRY)


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    if name not in _REGISTRY:
        return f"unknown backend {name!r}; known: {', '.join(_REGISTRY)}"
    return _REGISTRY[name].unavailable_reason(device_type)


_RESOLVED: dict[tuple[str, str], str] = {}


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend name for ``name`` ("auto" or a backend) on ``device``; raises if it cannot run.

    Decided once per (name, device type): the probes load libraries and cost more than a small step.
    """
    key = (name, device.type)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(name, device)
    return resolved


def _resolve(name: str, device: torch.device) -> str:
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, ("reference",)):
            if candidate in _REGISTRY and unavailable_reason(candidate, device.type) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device.type)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device.type}: {reason}")
    return name


def build_status(name: str) -> str:
    return _REGISTRY[name].build_status()


def fused_step_of(name: str) -> Callable:
    return _REGISTRY[name].load_fused_step()


