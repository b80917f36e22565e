"""The native CUDA kernel's source, run on the CPU (cuda_emulation.cpp): what the conformance suite does not say.

There is no GPU here, and nvcc only proves that the kernel compiles.  The emulation (the
``emulated_cuda`` fixture of conftest.py) runs the very device code of csrc/fused_step_cuda_kernel.cuh
with std::threads for a block's threads (8 of them, so sample chunks are 32 samples and blocks straddle
several chunks) and blocks one after another.  test_conformance.py holds it to the reference over the
conformance cases (descriptor table, chunk ownership, hash-table scatter with duplicates, the last-block
finalisation, statistics, step counts, found_inf / grad_scale) and checks that every call leaves the
workspace clean for the next, with the hyperparameters copied into the descriptor table and read from
their tensors; here: a dual-only call with int32 ids, and what a CUDA graph replay of a capturable step
computes.  bench/gpu_check.py runs the real kernel on a GPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from fused_lagrangian.backends import reference
from fused_lagrangian.contract import (DUAL_HPARAMS, PRIMAL_HPARAMS, Algorithm, DualFlag, DualSlot, FusedStepArguments,
                                       PrimalFlag, PrimalSlot, hparams_tensor)
from fused_lagrangian.testing import conformance

GRADS, STEPS = FusedStepArguments._fields.index("grads"), FusedStepArguments._fields.index("steps")
PRIMAL_HPARAMS_ARG = FusedStepArguments._fields.index("primal_hparams")
DUAL_HPARAMS_ARG = FusedStepArguments._fields.index("dual_hparams")


def test_cuda_kernel_dual_only_call_with_int32_ids(emulated_cuda):
    lam = torch.zeros(10)
    ids = torch.tensor([1, 9, 1, 0], dtype=torch.int32)
    violations = torch.tensor([1.0, 2.0, 3.0, -1.0])
    stats = emulated_cuda.fused_step([], [], [], [], [], [], hparams_tensor([]), [], 1, [lam], [torch.empty(0)],
                                     [ids], [violations], hparams_tensor([0.1, 0, 1, 0, 0, 0, math.inf, 0]), [0])
    assert lam[0].item() == 0.0 and lam[1].item() == pytest.approx(0.4) and lam[9].item() == pytest.approx(0.2)
    assert stats.tolist() == [[3.0, pytest.approx(4.0), 2.0]]
    assert emulated_cuda.workspace_is_clean()


def _capturable_step_call() -> list:
    """An Adam step (amsgrad, three tensors) with a nuPI block and a running-estimate block, its hyperparameters
    in tensors of their own: the optimizer's capturable step keeps them on the device and updates them in place."""
    gen = torch.Generator().manual_seed(11)
    primal = conformance.primal_args(gen, Algorithm.ADAM, sizes=(70, 33, 5), flags=int(PrimalFlag.AMSGRAD))
    dual = conformance.dual_args([conformance.constraint_block(gen, 40, 90, DualFlag.NUPI),
                                  conformance.constraint_block(gen, 25, 60, DualFlag.RUNNING | DualFlag.MEAN)])
    args = conformance.contract_call(primal, Algorithm.ADAM, dual)
    for index in (PRIMAL_HPARAMS_ARG, DUAL_HPARAMS_ARG):
        args[index] = args[index].clone()  # not contract.py's shared table of float values: updated in place below
    return args


def _next_step_in_place(args: list, step: int) -> None:
    """What changes between two replays of a captured training step, all in place: a scheduler's lr and dual_lr,
    the gradients, the batch's ids and violations."""
    gen = torch.Generator().manual_seed(100 + step)
    args[PRIMAL_HPARAMS_ARG].view(-1, PRIMAL_HPARAMS)[:, PrimalSlot.LR].mul_(0.5)
    args[DUAL_HPARAMS_ARG].view(-1, DUAL_HPARAMS)[:, DualSlot.LR].mul_(3.0)
    for grad in args[GRADS]:
        grad.copy_(torch.randn(grad.shape, generator=gen))
    for ids, violations, lam in zip(args[conformance.IDS], args[conformance.VIOLATIONS], args[conformance.MULTIPLIERS]):
        ids.copy_(torch.randint(0, lam.numel(), ids.shape, generator=gen))
        violations.copy_(torch.randn(violations.shape, generator=gen))


@pytest.mark.parametrize("hparams_on_device", [True, False], ids=["hparams-on-device", "hparams-in-table"])
def test_graph_replay_reads_the_current_hyperparameters_when_they_are_on_the_device(emulated_cuda, hparams_on_device):
    """A replay reruns the captured launch (same descriptor table) while lr, dual_lr, step counts and data change
    in place.  With the hyperparameters read from their tensors it equals eager reference steps with the new
    values; copied into the table (CPU hparams tensors), it keeps the captured ones, which the comparison sees."""
    args = _capturable_step_call()
    expected = copy.deepcopy(args)
    launch = emulated_cuda.fused_step_hparams_on_device if hparams_on_device else emulated_cuda.fused_step
    stats = launch(*args)
    expected_stats = reference.fused_step(*expected)
    conformance.assert_same_results(args, expected, stats, expected_stats)
    for step in range(3):
        _next_step_in_place(args, step)
        _next_step_in_place(expected, step)
        stats = emulated_cuda.replay()
        expected_stats = reference.fused_step(*expected)
        assert emulated_cuda.workspace_is_clean()
        if hparams_on_device:
            conformance.assert_same_results(args, expected, stats, expected_stats)
    assert [step.item() for step in args[STEPS]] == [7.0] * 3  # from 3, one count per launch, replays included
    if not hparams_on_device:
        with pytest.raises(AssertionError):
            conformance.assert_same_results(args, expected, stats, expected_stats)


def _capturable_training(emulated_cuda, capturable: bool, float64_group: bool) -> tuple[list, list]:
    """Eight steps of LagrangianAdam on the emulated CUDA kernel, lr and dual_lr tensors driven by schedulers:
    (final parameters and multipliers, the (primal, dual) hparams tensors the kernel got at each step).  With
    ``float64_group``, a float64 parameter in a group of its own takes layouts.py's mixed path."""
    from fused_lagrangian import LagrangianAdam, layouts
    from fused_lagrangian.schedules import DualLearningRates

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    groups = [{"params": model.parameters()}]
    if float64_group:
        groups.append({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], "lr": 0.05})
    optimizer = LagrangianAdam(groups, lr=torch.tensor(1e-2), capturable=capturable, backend="reference")
    rows = optimizer.add_constraint("rows", kind="indexed", num_constraints=16, dual_lr=torch.tensor(0.1), bound=0.1)
    groups_block = optimizer.add_constraint("groups", kind="grouped", num_constraints=3, dual_lr=0.2, bound=-0.05)
    schedules = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7),
                 torch.optim.lr_scheduler.StepLR(DualLearningRates(optimizer), step_size=2, gamma=2.0))
    hparams_seen = []
    kernel = emulated_cuda.fused_step_hparams_on_device if capturable else emulated_cuda.fused_step

    def spy(*args):
        hparams_seen.append((args[PRIMAL_HPARAMS_ARG], args[DUAL_HPARAMS_ARG]))
        return kernel(*args)

    on_emulated_kernel = ("reference", layouts.normalising(spy))  # "reference": the blocks' forward stays torch's
    optimizer._resolved = lambda device: on_emulated_kernel
    for step in range(8):
        generator = torch.Generator().manual_seed(step)
        out = model(torch.randn(8, 4, generator=generator)).flatten()
        extra = sum(p.sum() for p in optimizer.param_groups[1]["params"]) if float64_group else 0.0
        loss = out.pow(2).mean() + extra + rows(out, ids=torch.randint(0, 16, (8,), generator=generator)) + \
            groups_block(torch.sigmoid(out), ids=torch.randint(0, 3, (8,), generator=generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dual schedule's optimizer has nothing to step
            for schedule in schedules:
                schedule.step()
    state = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    return state + [b.multipliers.clone() for b in optimizer.constraints.values()], hparams_seen


@pytest.mark.parametrize("float64_group", [False, True], ids=["kernel-dtypes", "with-a-float64-group"])
def test_capturable_adam_keeps_its_hyperparameters_on_the_device_updated_in_place(emulated_cuda, monkeypatch,
                                                                                  float64_group):
    """The optimizer's side of capturable steps (on the CPU, standing in for CUDA): the kernel gets the same
    hparams tensors at every step (what a captured graph reads), holding the schedulers' current lr and dual_lr,
    and the training equals the one with hyperparameters read on the host."""
    from fused_lagrangian import optim

    monkeypatch.setattr(optim, "HPARAMS_ON_DEVICE", frozenset({"cpu"}))
    expected, _ = _capturable_training(emulated_cuda, capturable=False, float64_group=float64_group)
    actual, seen = _capturable_training(emulated_cuda, capturable=True, float64_group=float64_group)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the emulation's threads sum duplicates in any order
    primal, dual = seen[-1]
    assert dual.data_ptr() == seen[0][1].data_ptr() and all(d is dual for _, d in seen)
    assert dual.view(-1, DUAL_HPARAMS)[:, DualSlot.LR].tolist() == [pytest.approx(0.1 * 2.0**3), 0.2 * 2.0**3]
    if not float64_group:  # (else layouts.py gathers the kernel's rows, less the float64 one's, at each step)
        assert all(p is primal for p, _ in seen)
    assert primal.view(-1, PRIMAL_HPARAMS)[:, PrimalSlot.LR].tolist() == [pytest.approx(1e-2 * 0.7**7)] * 2
