"""The native CUDA kernel's source, run on the CPU (cuda_emulation.cpp): what the conformance suite does not say.

There is no GPU here, and nvcc only proves that the kernel compiles.  The emulation (the
``emulated_cuda`` fixture of conftest.py) runs the very device code of csrc/fused_step_cuda_kernel.cuh
with std::threads for a block's threads (8 of them, so sample chunks are 32 samples and blocks straddle
several chunks) and blocks one after another.  test_conformance.py holds it to the reference over the
conformance cases (descriptor table, chunk ownership, hash-table scatter with duplicates, the last-block
finalisation, statistics, step counts, found_inf / grad_scale) and checks that every call leaves the
workspace clean for the next; here: a dual-only call with int32 ids.  bench/gpu_check.py runs the real
kernel on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_lagrangian.contract import hparams_tensor


def test_cuda_kernel_dual_only_call_with_int32_ids(emulated_cuda):
    lam = torch.zeros(10)
    ids = torch.tensor([1, 9, 1, 0], dtype=torch.int32)
    violations = torch.tensor([1.0, 2.0, 3.0, -1.0])
    stats = emulated_cuda.fused_step([], [], [], [], [], [], hparams_tensor([]), [], 1, [lam], [torch.empty(0)],
                                     [ids], [violations], hparams_tensor([0.1, 0, 1, 0, 0, 0, math.inf, 0]), [0])
    assert lam[0].item() == 0.0 and lam[1].item() == pytest.approx(0.4) and lam[9].item() == pytest.approx(0.2)
    assert stats.tolist() == [[3.0, pytest.approx(4.0), 2.0]]
    assert emulated_cuda.workspace_is_clean()
