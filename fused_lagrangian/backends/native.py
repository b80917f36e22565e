"""Native backend: the C++ (OpenMP) and CUDA kernels of ``fused_step`` built from ``csrc/``.

``setup.py`` compiles them into ``fused_lagrangian/_C*.so`` when the build can see torch, which
registers the operator ``torch.ops.fused_lagrangian.fused_step`` with one kernel per device type.  The
library is loaded on first use, never at import.  Without an install-time build, the first use compiles
the shipped sources (``native_build``; ``FUSED_LAGRANGIAN_JIT`` chooses when).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from typing import Optional

import torch

from ..contract import hparams_tensor
from ..ops import grouped_forward
from . import native_build
from .native_build import JIT_ENV  # noqa: F401  (part of this module's interface: bench/gpu_check.py)
from .registry import Backend, register

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_OP_NAME = "fused_lagrangian::fused_step"
_GROUPED_FORWARD = "fused_lagrangian::grouped_lagrangian_forward"


class _Library:
    """Loads the extension once; remembers where it came from or why it could not be loaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decided = False  # set last, once origin and error are final
        self.origin: Optional[str] = None
        self.error: Optional[str] = None

    def load(self) -> Optional[str]:
        """None once the operator is registered, else the reason it is not."""
        if self._decided:  # lock-free once decided: no lock for torch.compile to trace in the hot path
            return self.error
        with self._lock:
            if not self._decided:
                try:
                    prefer_sources = native_build.jit_mode() == "always"
                    built = None if prefer_sources else _load_built()
                    path, self.origin = (built, built) if built else native_build.compile_and_load() or (None, None)
                    if path is not None:
                        _register_fake()
                        _register_grouped_forward(path)
                except Exception as error:  # noqa: BLE001 - any load failure makes the backend unavailable
                    self.error = f"the native extension failed to load: {error}"
                    self.origin = None
                if self.origin is None and self.error is None:
                    self.error = native_build.not_built_reason()
                self._decided = True
        return self.error


_LIBRARY = _Library()


def built_library_path() -> Optional[str]:
    """The extension setup.py built into the package, if any."""
    candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")))
    return candidates[0] if candidates else None


def _load_built() -> Optional[str]:
    path = built_library_path()
    if path is None:
        return None
    torch.ops.load_library(path)
    return path


def _register_fake() -> None:
    """Shape function for torch.compile / FakeTensor tracing: the op returns (num_blocks, 3) statistics."""

    @torch.library.register_fake(_OP_NAME)
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags, algorithm,
          multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale=None, found_inf=None):
        device = multipliers[0].device if multipliers else torch.device("cpu")
        return torch.empty(len(multipliers), 3, dtype=torch.float32, device=device)


# Device types with a kernel of the grouped block forward, found at load (a set lookup traces in torch.compile).
_GROUPED_FORWARD_DEVICES: set[str] = set()


def _register_grouped_forward(library_path: str) -> None:
    """Shape function of the grouped block forward (absent from libraries built before it), and its eager
    CPU entry for ops/grouped_forward.py."""
    if not hasattr(torch.ops.fused_lagrangian, "grouped_lagrangian_forward"):
        return
    grouped_forward.register_eager_cpu(_pybind_export(library_path, _EAGER_CPU_SYMBOL))
    _GROUPED_FORWARD_DEVICES.update(name for name, key in _DISPATCH_KEYS.items()
                                    if torch._C._dispatch_has_kernel_for_dispatch_key(_GROUPED_FORWARD, key))
    if not _GROUPED_FORWARD_DEVICES:
        return

    @torch.library.register_fake(_GROUPED_FORWARD)
    def _(values, ids, dual_values, multipliers, bounds, bound, sign, to_overall):
        compute = torch.float64 if values.dtype == torch.float64 else torch.float32
        # 1-D ids: one entry per sample; (B, M) ids padded with -1: as many as the data has.
        entries = ids.shape[0] if ids.dim() == 1 else torch.library.get_ctx().new_dynamic_size()
        return (values.new_empty((), dtype=compute), values.new_empty(values.shape, dtype=compute),
                ids.new_empty((entries,), dtype=torch.int64), values.new_empty((entries,), dtype=torch.float32),
                values.new_empty((), dtype=torch.int32))

    # Autograd: the C++ kernel registered for the Autograd key (a Python one costs more than the kernel).


# An extern "C" function of csrc/grouped_forward_cpu.cpp that returns the pybind11 function of the CPU kernel:
# the library is loaded as a plain shared library (torch.ops.load_library), not as a Python module.
_EAGER_CPU_SYMBOL = "fused_lagrangian_grouped_forward_cpu_binding"


def _pybind_export(library_path: str, symbol: str):
    """The Python object the library's ``symbol`` returns, or None when the library has no such symbol."""
    try:
        export = getattr(ctypes.PyDLL(library_path), symbol)
    except (AttributeError, OSError):
        return None
    export.restype, export.argtypes = ctypes.py_object, []
    return export()


def has_grouped_forward(device_type: str) -> bool:
    """Whether the fused grouped block forward has a kernel for this device type (CPU only so far)."""
    return _LIBRARY.load() is None and device_type in _GROUPED_FORWARD_DEVICES


def has_kernel_for(device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and _LIBRARY.load() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        _OP_NAME, key)


def unavailable_reason(device_type: str) -> Optional[str]:
    reason = _LIBRARY.load()
    if reason is not None:
        return reason
    if not has_kernel_for(device_type):
        if device_type == "cuda":
            return "built without CUDA (torch had no CUDA or nvcc was not found when it was built)"
        return f"no native kernel for {device_type} tensors"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def build_status() -> str:
    """One line for `fused-lagrangian info`: what was built, from where, or why nothing is."""
    reason = _LIBRARY.load()
    if reason is not None:
        return reason
    kernels = [name for name in _DISPATCH_KEYS if has_kernel_for(name)]
    return f"kernels for {', '.join(kernels)} from {_LIBRARY.origin}"


def fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
               algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale=None,
               found_inf=None):
    if not params and not multipliers:
        return torch.zeros(0, 3, dtype=torch.float32)  # no tensor to dispatch on, nothing to do
    return torch.ops.fused_lagrangian.fused_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams_tensor(primal_hparams), primal_flags,
        int(algorithm), multipliers, dual_states, ids, violations, hparams_tensor(dual_hparams), dual_flags, grad_scale,
        found_inf)


def _load_fused_step():
    reason = _LIBRARY.load()
    if reason is not None:
        raise RuntimeError(f"native backend: {reason}")
    return fused_step


register(Backend("native", unavailable_reason, _load_fused_step, build_status))
