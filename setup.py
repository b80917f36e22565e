"""Build and install fused_lagrangian.

Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch already
installed (build isolation would download a CUDA build of torch of several GB).
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import extension_kwargs  # noqa: E402  (the native step's extension, if buildable)

# What the demo, the examples and the benchmarks need beyond the library.
APPS = ["numpy", "tqdm", "matplotlib"]

setup(
    name="fused_lagrangian",
    version="0.1.0",
    description="Drop-in Lagrangian optimizers for constrained deep learning, fused into one step",
    # The library, and apart from it the applications built on it (demo, paper examples, data sets, CLI).
    packages=find_packages(include=["fused_lagrangian", "fused_lagrangian.*",
                                    "fused_lagrangian_apps", "fused_lagrangian_apps.*"]),
    package_data={"fused_lagrangian_apps": ["datasets/adult/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        "apps": APPS,
        "test": APPS + ["pytest", "pytest-benchmark", "cooper-optim==1.0.1", "triton"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["fused-lagrangian=fused_lagrangian_apps.cli:main"]},
    **extension_kwargs(),
)
