"""Build and install fused_lagrangian.

Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch already
installed (build isolation would download a CUDA build of torch of several GB).
"""

from setuptools import find_packages, setup

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
)
