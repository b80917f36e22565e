"""Native backend: the C++ (OpenMP) and CUDA kernels of ``fused_step`` built from ``csrc/``.

``setup.py`` compiles them into ``fused_lagrangian/_C*.so``, which registers the operator
``torch.ops.fused_lagrangian.fused_step`` with one kernel per device type.  The library is loaded on
first use, never at import.  Without a built library the backend is unavailable (and says why),
unless ``FUSED_LAGRANGIAN_JIT=1`` asks to compile it from a source checkout on first use.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import threading
from typing import Optional

import torch

from .registry import Backend, register

JIT_ENV = "FUSED_LAGRANGIAN_JIT"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_OP_NAME = "fused_lagrangian::fused_step"


class _Library:
    """Loads the extension once; remembers where it came from or why it could not be loaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempted = False
        self.origin: Optional[str] = None
        self.error: Optional[str] = None

    def load(self) -> Optional[str]:
        """None once the operator is registered, else the reason it is not."""
        with self._lock:
            if not self._attempted:
                self._attempted = True
                try:
                    self.origin = _load_built() or _load_jit()
                    if self.origin is not None:
                        _register_fake()
                except Exception as error:  # noqa: BLE001 - any load failure makes the backend unavailable
                    self.error = f"the native extension failed to load: {error}"
                    self.origin = None
                if self.origin is None and self.error is None:
                    self.error = ("not built: install with `pip install --no-build-isolation -e .` (needs a C++ "
                                  f"compiler), or set {JIT_ENV}=1 to compile it from csrc/ on first use")
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


def _build_settings():
    """csrc/build_native.py, the one place that lists the sources and compiler flags."""
    spec = importlib.util.spec_from_file_location("build_native", os.path.join(_SOURCE_DIR, "build_native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_jit() -> Optional[str]:
    if os.environ.get(JIT_ENV) != "1":
        return None
    if not os.path.isdir(_SOURCE_DIR):
        raise RuntimeError(f"{JIT_ENV}=1 but the sources are not here ({_SOURCE_DIR}): JIT needs a source checkout")
    from torch.utils import cpp_extension

    settings = _build_settings()
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = settings.CPU_SOURCES + (settings.CUDA_SOURCES if with_cuda else [])
    cpp_extension.load(
        name="fused_lagrangian_native",
        sources=[os.path.join(_SOURCE_DIR, s) for s in sources],
        extra_cflags=settings.CXX_FLAGS,
        extra_cuda_cflags=settings.NVCC_FLAGS,
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        is_python_module=False,
    )
    return f"JIT build of {_SOURCE_DIR}"


def _register_fake() -> None:
    """Shape function for torch.compile / FakeTensor tracing: the op returns (num_blocks, 3) statistics."""

    @torch.library.register_fake(_OP_NAME)
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags, algorithm,
          multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale=None, found_inf=None):
        device = multipliers[0].device if multipliers else torch.device("cpu")
        return torch.empty(len(multipliers), 3, dtype=torch.float32, device=device)


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
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags, int(algorithm),
        multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale, found_inf)


def _load_fused_step():
    reason = _LIBRARY.load()
    if reason is not None:
        raise RuntimeError(f"native backend: {reason}")
    return fused_step


register(Backend("native", unavailable_reason, _load_fused_step, build_status))
