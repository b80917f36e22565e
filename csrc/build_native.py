"""setup.py's half for the native step: the extension to build, or none when this machine cannot.

The CPU kernel needs a C++ compiler; the CUDA kernel also needs a CUDA build of torch and nvcc.  A
failed build is reported and skipped: the package installs, and its first use of the native backend
compiles these sources (fused_lagrangian/backends/native_build.py, which reads the lists and flags
below) or, failing that, runs the reference backend with a warning that says why.
"""

from __future__ import annotations

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "fused_lagrangian._C"
CPU_SOURCES = ["fused_step.cpp", "fused_step_cpu.cpp", "grouped_forward_cpu.cpp"]
CUDA_SOURCES = ["fused_step_cuda.cu"]
# -fno-math-errno lets GCC vectorise sqrt; no contraction keeps the rounding of every operation (and
# so the results) the same whatever instruction set the loops are compiled for; -g0 overrides
# Python's -g, which only slows the build.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-g0"]
# IEEE division and square root (nvcc's defaults) and no contraction, as on the CPU.
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _relative(name: str) -> str:
    # setuptools wants source paths relative to setup.py.
    return os.path.relpath(os.path.join(HERE, name), os.getcwd())


def _cuda_toolkit_usable() -> bool:
    import torch
    from torch.utils import cpp_extension

    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or {} when the extension cannot be built here."""
    if os.environ.get("FUSED_LAGRANGIAN_NO_NATIVE") == "1":
        print("fused_lagrangian: FUSED_LAGRANGIAN_NO_NATIVE=1, not building the native extension")
        return {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("fused_lagrangian: no C++ compiler found, not building the native extension")
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError as error:
        print(f"fused_lagrangian: torch is not importable here ({error}), as in pip's isolated build: the "
              "package compiles its C++ sources on first use instead (--no-build-isolation builds them now)")
        return {}
    sources = [_relative(s) for s in CPU_SOURCES]
    kwargs = dict(extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=["-fopenmp"])
    if _cuda_toolkit_usable():
        sources += [_relative(s) for s in CUDA_SOURCES]
        extension = cpp_extension.CUDAExtension(EXTENSION_NAME, sources, **kwargs)
    else:
        print("fused_lagrangian: torch has no CUDA or nvcc is missing: building the CPU kernel only")
        extension = cpp_extension.CppExtension(EXTENSION_NAME, sources, **kwargs)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": _optional_build_ext(cpp_extension)}}


def _optional_build_ext(cpp_extension):
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExtension(base):
        """Builds the extension; if that fails, says so and lets the install go on without it."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any build failure leaves the reference backend
                print(f"fused_lagrangian: building the native extension failed ({error}); "
                      "its first use will try to compile it again", file=sys.stderr)

    return OptionalBuildExtension
