"""The drop-in classes on the triton backend, under the Triton interpreter on CPU tensors.

The other drop-in tests run on the ``backend`` fixture, which holds triton only when TRITON_INTERPRET=1
was set before the test session started; this file sets it at import (as test_triton.py does) and
replays a few of those tests and of the randomized cases with backend="triton".  The interpreter runs
programs one after another, so the cases stay few and tiny.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from fused_lagrangian.backends import triton_kernels  # noqa: E402

if type(triton_kernels.fused_step_kernel).__name__ != "InterpretedFunction":
    pytest.skip("the triton kernels were defined before TRITON_INTERPRET=1 was set", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dropin_cases  # noqa: E402
import test_dropin_checkpoints as checkpoint_tests  # noqa: E402  (modules, not test names: nothing re-collected)
import test_dropin_dtypes as dtype_tests  # noqa: E402
import test_dropin_grad_scaler as grad_scaler_tests  # noqa: E402
import test_dropin_layouts as layout_tests  # noqa: E402

BACKEND = "triton"
RANDOM_CASES = 24


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_random_cases_match_reference_and_torch_optim(seed):
    dropin_cases.run_case(seed, BACKEND)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_layouts(kind):
    layout_tests.test_einsum_gradient_with_other_size1_strides(BACKEND, kind)
    layout_tests.test_gradient_assigned_with_another_layout(BACKEND, kind, "transposed")
    layout_tests.test_gapped_parameter(BACKEND, kind)
    layout_tests.test_channels_last_after_state_exists(BACKEND, kind)
    layout_tests.test_parameter_listed_twice_in_a_group_is_updated_as_torch_does(BACKEND, kind)


def test_ids_views_and_pending_samples(monkeypatch):
    layout_tests.test_ids_of_any_layout_update_like_contiguous_ids(BACKEND, "grouped", "strided")
    layout_tests.test_ids_of_any_layout_update_like_contiguous_ids(BACKEND, "indexed", "expanded")
    layout_tests.test_pending_samples_survive_a_step_that_raises(BACKEND, monkeypatch)


def test_dtypes():
    kind, options = dtype_tests.OPTIONS[4]  # Adam with amsgrad, weight decay, maximize
    dtype_tests.run_against_torch(kind, BACKEND, options, [dtype_tests.torch.float32, dtype_tests.torch.float64,
                                                          dtype_tests.torch.complex64], steps=3)


def test_checkpoint_refusal_and_copies():
    saved = checkpoint_tests.checkpoint_of(BACKEND)
    checkpoint_tests.test_refused_checkpoint_changes_nothing_and_training_continues(BACKEND, saved,
                                                                                   "one_element_multipliers")
    checkpoint_tests.test_copies_step_on_their_own(BACKEND, "SGD", "deepcopy")


def test_grad_scaler_first_iteration_overflow():
    grad_scaler_tests.test_overflowing_iterations_match_torch(BACKEND, "SGD", (0,))
