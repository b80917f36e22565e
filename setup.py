"""Build and install fused_lagrangian.

Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch already
installed (build isolation would download a CUDA build of torch of several GB).
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import extension_kwargs  # noqa: E402  (the native step's extension, if buildable)

setup(
    name="fused_lagrangian",
    version="0.1.0",
    description="Drop-in Lagrangian optimizers for constrained deep learning, fused into one step",
    packages=find_packages(include=["fused_lagrangian", "fused_lagrangian.*"]),
    package_data={"fused_lagrangian": ["data/adult/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "ninja", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "cooper-optim==1.0.1", "triton"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["fused-lagrangian=fused_lagrangian.cli:main"]},
    **extension_kwargs(),
)
