"""The native CUDA kernel's source, run on the CPU (cuda_emulation.cpp), against the reference.

There is no GPU here, and nvcc only proves that the kernel compiles.  The emulation runs the very
device code of csrc/fused_step_cuda_kernel.cuh with std::threads for a block's threads (8 of them,
so sample chunks are 32 samples and blocks straddle several chunks) and blocks one after another.
It checks the logic: descriptor table, chunk ownership, hash-table scatter with duplicates, the
last-block finalisation, statistics, step counts, found_inf / grad_scale, and that every step leaves
the workspace clean for the next.  bench/gpu_check.py runs the real kernel on a GPU.
"""

from __future__ import annotations

import copy
import math
import os
import shutil

import pytest
import torch

from fused_lagrangian.contract import hparams_tensor
from test_native import ADAM_OPTIONS, CASES, Algorithm, compare_with_reference, random_problem, tensors_of

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulated():
    from torch.utils import cpp_extension

    cpp_extension.load(name="fused_lagrangian_cuda_emulation", sources=[os.path.join(HERE, "cuda_emulation.cpp")],
                       extra_include_paths=[SOURCES], extra_cflags=["-O2", "-fno-math-errno", "-ffp-contract=off"],
                       is_python_module=False)
    return torch.ops.fused_lagrangian_emulated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_kernel_logic_matches_reference(emulated, case, dtype):
    def workspace_left_clean():
        assert emulated.workspace_is_clean(), "the finishing block must clear the hash table and the ticket"

    compare_with_reference(emulated.fused_step, case, dtype, steps=5, after_step=workspace_left_clean)


def test_cuda_kernel_found_inf_and_grad_scale(emulated):
    problem = random_problem(1, Algorithm.ADAM, torch.float32, 0, ADAM_OPTIONS[0][1])
    scaled = copy.deepcopy(problem)
    before = [t.clone() for t in tensors_of(scaled)]
    args = list(scaled.args)
    args[15], args[16] = torch.tensor([4.0]), torch.tensor([1.0])
    assert emulated.fused_step(*args).eq(0).all()
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(scaled), before))
    assert emulated.workspace_is_clean()

    # Scaling by a power of two is exact: unscaling must give bitwise the unscaled step.
    for grad in scaled.grads:
        grad.mul_(4.0)
    args[16] = torch.tensor([0.0])
    emulated.fused_step(*args)
    emulated.fused_step(*problem.args)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(scaled), tensors_of(problem)))


def test_cuda_kernel_dual_only_call_with_int32_ids(emulated):
    lam = torch.zeros(10)
    ids = torch.tensor([1, 9, 1, 0], dtype=torch.int32)
    violations = torch.tensor([1.0, 2.0, 3.0, -1.0])
    stats = emulated.fused_step([], [], [], [], [], [], hparams_tensor([]), [], 1, [lam], [torch.empty(0)], [ids],
                                [violations], hparams_tensor([0.1, 0, 1, 0, 0, 0, math.inf, 0]), [0])
    assert lam[0].item() == 0.0 and lam[1].item() == pytest.approx(0.4) and lam[9].item() == pytest.approx(0.2)
    assert stats.tolist() == [[3.0, pytest.approx(4.0), 2.0]]
    assert emulated.workspace_is_clean()
