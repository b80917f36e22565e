"""Compiling the native extension on first use, from the C++ sources shipped with the package.

pip's default (isolated) build cannot see the installed torch, so a wheel built that way carries no
compiled library.  It carries the sources instead (setup.py installs the checkout's ``csrc/`` as
``fused_lagrangian/csrc/``), and the first use of the native backend compiles them with
``torch.utils.cpp_extension`` into a cache directory, once per machine, torch version and source
version.  The environment variable ``FUSED_LAGRANGIAN_JIT`` chooses:

- unset (default): use the library built at install if there is one, else compile on first use;
- ``0``: never compile at run time (without an install-time build the reference backend runs, with a
  warning);
- ``1``: always compile the sources on first use, even when an install-time build exists (for work on
  ``csrc/`` in an editable checkout without reinstalling).

The cache lives in ``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/torch_extensions`` (as torch's own).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from typing import Optional

import torch

JIT_ENV = "FUSED_LAGRANGIAN_JIT"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed from a wheel: the sources sit inside the package; in a source checkout (editable install),
# beside it.
_SOURCE_CANDIDATES = (os.path.join(_PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"))
REINSTALL_HINT = "or reinstall with `pip install --no-build-isolation .` (needs a C++ compiler)"


def jit_mode() -> str:
    """"auto", "never" or "always", from FUSED_LAGRANGIAN_JIT (unset, "0", "1")."""
    value = os.environ.get(JIT_ENV, "")
    return {"": "auto", "0": "never", "1": "always"}.get(value, "auto")


def source_dir() -> Optional[str]:
    for candidate in _SOURCE_CANDIDATES:
        if os.path.isfile(os.path.join(candidate, "build_native.py")):
            return candidate
    return None


def not_built_reason() -> str:
    """Why there is no library when neither an install-time build nor a first-use build happened."""
    if jit_mode() == "never":
        return (f"not built at install, and {JIT_ENV}=0 forbids compiling it on first use: unset {JIT_ENV}, "
                + REINSTALL_HINT)
    return f"not built at install, and this installation has no C++ sources to compile: {REINSTALL_HINT}"


def _build_settings(directory: str):
    """build_native.py, the one place that lists the sources and compiler flags (setup.py uses it too)."""
    spec = importlib.util.spec_from_file_location("fused_lagrangian_build_native",
                                                  os.path.join(directory, "build_native.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cache_root() -> str:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torch_extensions")


def _build_name(directory: str, sources: list[str], flags: list[str]) -> str:
    """A name that changes with anything that changes the binary, so a stale build is never loaded."""
    digest = hashlib.sha256()
    for item in (sys.version, torch.__version__, str(torch.version.cuda), *flags, *sources):
        digest.update(item.encode())
    for file_name in sorted(os.listdir(directory)):  # headers too: torch's own versioning hashes sources only
        if file_name.endswith((".cpp", ".h", ".cu", ".cuh")):
            with open(os.path.join(directory, file_name), "rb") as source:
                digest.update(source.read())
    return f"fused_lagrangian_native_{digest.hexdigest()[:16]}"


def _short(error: Exception) -> str:
    """The compiler's first error line, not its pages of output."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first_error = next((line for line in lines[1:] if "error" in line.lower()), "")
    return "; ".join(filter(None, [lines[0] if lines else type(error).__name__, first_error]))[:500]


def compile_and_load() -> Optional[tuple[str, str]]:
    """Compiles (or finds in the cache) and loads the extension: (library path, where it came from), or None
    if not allowed here.

    Raises RuntimeError with a one-line reason when compiling fails."""
    directory = source_dir()
    if jit_mode() == "never" or directory is None:
        return None
    from torch.utils import cpp_extension

    settings = _build_settings(directory)
    with_cuda = bool(torch.version.cuda) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = settings.CPU_SOURCES + (settings.CUDA_SOURCES if with_cuda else [])
    flags = settings.CXX_FLAGS + (settings.NVCC_FLAGS if with_cuda else [])
    name = _build_name(directory, sources, flags)
    build_directory = os.path.join(_cache_root(), name)
    library = os.path.join(build_directory, f"{name}.so")
    fresh_build = not os.path.exists(library)
    if fresh_build:
        kernels = "CPU and CUDA kernels, a few minutes" if with_cuda else "CPU kernel, about a minute"
        print(f"fused_lagrangian: compiling the native extension on first use ({kernels}; cached in "
              f"{build_directory}; {JIT_ENV}=0 skips this)", file=sys.stderr, flush=True)
    os.makedirs(build_directory, exist_ok=True)
    started = time.perf_counter()
    try:
        cpp_extension.load(
            name=name,
            sources=[os.path.join(directory, s) for s in sources],
            extra_cflags=settings.CXX_FLAGS,
            extra_cuda_cflags=settings.NVCC_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=build_directory,
            with_cuda=with_cuda,
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 - a compiler, ninja or loader failure: one line says which
        raise RuntimeError(f"compiling it from {directory} failed: {_short(error)} (install a working C++ "
                           f"compiler and ninja, or set {JIT_ENV}=0 to stop trying)") from error
    how = f"compiled in {time.perf_counter() - started:.0f} s" if fresh_build else "cached"
    return library, f"first-use build of {directory} ({how}: {library})"
