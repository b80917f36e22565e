"""The conformance suite (fused_lagrangian.testing.conformance) for every backend the CPU runs here.

"reference" against itself checks the suite; "native" is the C++ kernel; "cuda-emulated" is the CUDA
kernel's device code on std::threads (tests/backends/cuda_emulation.cpp), which must also leave its
workspace clean after every call, with the hyperparameters in its descriptor table (CPU hparams
tensors) and, as "cuda-emulated-hparams-on-device", read from their tensors (device hparams tensors,
capturable steps; fp32 only: the dtype does not change how hyperparameters are read).  Triton runs
the same cases under its interpreter in test_triton.py (TRITON_INTERPRET must be set before its
kernels are defined, so not from this module); bench/gpu_check.py runs them on CUDA tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from fused_lagrangian import backends
from fused_lagrangian.contract import DualFlag
from fused_lagrangian.testing import conformance


@dataclasses.dataclass
class Candidate:
    fused_step: Callable
    steps: int  # per case: the emulation runs a block's threads one after another, so it gets fewer
    dtypes: tuple
    after_call: Callable[[], None] = lambda: None
    tolerance: dict = dataclasses.field(default_factory=lambda: conformance.TOLERANCE)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["reference", "native", "cuda-emulated", "cuda-emulated-hparams-on-device"])
def candidate(request) -> Candidate:
    name = request.param
    if name.startswith("cuda-emulated"):
        emulated = request.getfixturevalue("emulated_cuda")

        def workspace_left_clean():
            assert emulated.workspace_is_clean(), "the finishing block must clear the hash table and the ticket"

        if name == "cuda-emulated":
            return Candidate(emulated.fused_step, 5, conformance.DTYPES, workspace_left_clean,
                             conformance.UNORDERED_SUM_TOLERANCE)
        return Candidate(emulated.fused_step_hparams_on_device, 5, (torch.float32,), workspace_left_clean,
                         conformance.UNORDERED_SUM_TOLERANCE)
    reason = backends.unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.skip(f"{name} backend: {reason}")
    # The reference against itself is a check of the suite: a few steps say as much as twenty.
    return Candidate(backends.fused_step_of(name), 20 if name != "reference" else 3, conformance.DTYPES)


@pytest.mark.parametrize("dtype", conformance.DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(conformance.CASES)))
def test_matches_reference(candidate, case, dtype):
    if dtype not in candidate.dtypes:
        pytest.skip(f"{dtype} is not run for this backend")
    conformance.compare_with_reference(candidate.fused_step, case, dtype, steps=candidate.steps,
                                       after_step=candidate.after_call, tolerance=candidate.tolerance)


def test_found_inf_skips_everything_and_grad_scale_divides(candidate):
    conformance.check_found_inf_and_grad_scale(candidate.fused_step, after_call=candidate.after_call)


@pytest.mark.parametrize("rule", range(len(conformance.DUAL_RULES)))
def test_dual_rule_matches_reference(candidate, rule):
    actual, expected, stats, expected_stats = conformance.run_both(candidate.fused_step,
                                                                   conformance.dual_rule_call(rule), steps=2)
    candidate.after_call()
    conformance.assert_same_results(actual, expected, stats, expected_stats, candidate.tolerance)


def test_several_blocks_with_empty_and_untouched_ones(candidate):
    conformance.check_several_blocks(candidate.fused_step, candidate.tolerance)
    candidate.after_call()


def test_dual_only_call(candidate):
    actual, expected, stats, expected_stats = conformance.run_both(candidate.fused_step,
                                                                   conformance.dual_only_call(), steps=3)
    candidate.after_call()
    conformance.assert_same_results(actual, expected, stats, expected_stats, candidate.tolerance)


def test_cases_reach_every_dual_flag():
    assert conformance.flags_covered() == DualFlag(sum(DualFlag))
