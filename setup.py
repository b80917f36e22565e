"""Build and install fused_lagrangian.

Every install route ends with the native extension, now or on first use:
- ``pip install --no-build-isolation [-e] .``: the build sees the installed torch and compiles the
  extension into the package (a failed compile is reported and skipped);
- ``pip install [-e] .`` and wheels from ``pip wheel .``: pip's isolated build has no torch (listing it as
  a build requirement would download a CUDA build of several GB), so nothing is compiled at install; the
  C++ sources ship inside the package (``fused_lagrangian/csrc/``) and the first use of the native
  backend compiles them into a cache (fused_lagrangian/backends/native_build.py).
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import extension_kwargs  # noqa: E402  (the native step's extension, if buildable)

# A data-only package (no __init__.py): the native extension's sources and build settings.
SHIPPED_SOURCES = "fused_lagrangian.csrc"
# What the demo, the examples and the benchmarks need beyond the library.
APPS = ["numpy", "tqdm", "matplotlib"]

setup(
    name="fused_lagrangian",
    version="0.1.0",
    description="Drop-in Lagrangian optimizers for constrained deep learning, fused into one step",
    # The library, and apart from it the applications built on it (demo, paper examples, data sets, CLI).
    packages=find_packages(include=["fused_lagrangian", "fused_lagrangian.*",
                                    "fused_lagrangian_apps", "fused_lagrangian_apps.*"]) + [SHIPPED_SOURCES],
    # The checkout's csrc/ is installed as fused_lagrangian/csrc/: the sources of a first-use build.
    package_dir={SHIPPED_SOURCES: "csrc"},
    package_data={"fused_lagrangian_apps": ["datasets/adult/*"],
                  SHIPPED_SOURCES: ["*.cpp", "*.h", "*.cu", "*.cuh"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        "apps": APPS,
        # lightning, transformers and accelerate: the guide's recipes for their trainers (tests/test_docs.py).
        "test": APPS + ["pytest", "pytest-benchmark", "cooper-optim==1.0.1", "triton", "lightning", "transformers",
                        "accelerate"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["fused-lagrangian=fused_lagrangian_apps.cli:main"]},
    **extension_kwargs(),
)
