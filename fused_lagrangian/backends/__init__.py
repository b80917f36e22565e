"""Backend registry: which implementations of ``fused_step`` exist here, and which one "auto" picks.

Each backend module registers a ``Backend`` entry (``registry.py``): its name, a probe that says whether
it can run on a device (and why not), and its ``fused_step``.  Dispatch is a table lookup by device
type, never a chain of special cases in the optimizer.
"""

from __future__ import annotations

# Each backend module registers itself and loads nothing until used; this order is the listing order.
from . import reference  # noqa: F401,I001
from . import native  # noqa: F401
from . import triton_backend  # noqa: F401
from .registry import (AUTO_PREFERENCE, Backend, build_status, fused_step_of, names, register, resolve,
                       unavailable_reason)

__all__ = ["AUTO_PREFERENCE", "Backend", "build_status", "fused_step_of", "names", "register", "resolve",
           "unavailable_reason"]
