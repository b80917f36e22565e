"""Fixtures of the backend tests: one torch thread, and the CUDA kernel's source emulated on the CPU."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture
def one_thread():
    """Small tensors: on a busy machine torch's OpenMP regions spin far longer than they compute.
    The native kernel runs single-threaded below 65536 elements anyway; test_native.py's
    test_threads_do_not_change_results covers its parallel path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def emulated_cuda():
    """torch.ops.fused_lagrangian_emulated: fused_step (csrc's CUDA kernel on std::threads) and
    workspace_is_clean (see test_native_cuda_emulated.py)."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    cpp_extension.load(name="fused_lagrangian_cuda_emulation", sources=[os.path.join(HERE, "cuda_emulation.cpp")],
                       extra_include_paths=[SOURCES], extra_cflags=["-O2", "-fno-math-errno", "-ffp-contract=off"],
                       is_python_module=False)
    return torch.ops.fused_lagrangian_emulated
