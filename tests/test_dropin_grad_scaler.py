"""GradScaler: iterations it skips leave what torch.optim leaves (no state created), with or without blocks."""

from __future__ import annotations

import math

import pytest
import torch

from dropin_support import PAIRS, assert_params_equal, assert_same, snapshot
from fused_lagrangian import LagrangianSGD, optim

OPTIONS = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.5),
    "SGD-nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, amsgrad=True),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def scaled_training(model, optimizer, scaler, steps, poisoned=()) -> None:
    for index in steps:
        generator = torch.Generator().manual_seed(index)
        x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if index in poisoned:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("poisoned", [(0,), (0, 1), (2,)], ids=["first", "first_two", "third"])
def test_overflowing_iterations_match_torch(backend, name, poisoned):
    """SGD with dampening seeds its buffer at the first step torch.optim actually runs, not a skipped one."""
    kind = name.split("-")[0]
    ours_model, torch_model = make_model(), make_model()
    ours = PAIRS[kind][0](ours_model.parameters(), backend=backend, **OPTIONS[name])
    theirs = PAIRS[kind][1](torch_model.parameters(), **OPTIONS[name])
    ours_scaler, torch_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    scaled_training(ours_model, ours, ours_scaler, range(1), poisoned)
    scaled_training(torch_model, theirs, torch_scaler, range(1), poisoned)
    if 0 in poisoned:  # the skipped first iteration created no state, as in torch
        assert all(not state for state in ours.state.values()) and not theirs.state
    scaled_training(ours_model, ours, ours_scaler, range(1, 8), poisoned)
    scaled_training(torch_model, theirs, torch_scaler, range(1, 8), poisoned)
    assert ours_scaler.get_scale() == torch_scaler.get_scale() < 2.0**10
    assert_params_equal(ours_model, torch_model, atol=1e-6)
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        assert ours.state[p].keys() == theirs.state[q].keys()
        for key, value in theirs.state[q].items():
            assert_same(ours.state[p][key], value, atol=0 if key == "step" else 1e-6)


def test_scaler_step_without_gradients_runs_the_pending_dual_update(backend):
    """No parameter has a gradient (GradScaler then hands found_inf=0, a Python int): the step still
    updates the block, and leaves the parameters alone.  (GradScaler.update() then refuses, as it does
    for any optimizer without gradients: nothing recorded an inf check.)"""
    model, other = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    optimizer = LagrangianSGD(model.parameters(), lr=0.1, backend=backend)
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    loss = other(torch.randn(2, 3)).sum() + block(torch.full((1,), 0.75) + 0 * other.bias)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    assert block.multipliers.item() == pytest.approx(0.375)
    assert not block.has_pending
    assert_params_equal(model.parameters(), before)


def test_dual_first_blocks_move_on_skipped_iterations_as_documented(backend):
    """A dual-first update happens at the block call, before GradScaler can know the iteration overflows."""
    assert "Dual-first blocks" in optim.__doc__ and "skipped iteration moves them" in optim.__doc__
    model = make_model()
    optimizer = LagrangianSGD(model.parameters(), lr=0.05, backend=backend)
    first = optimizer.add_constraint("first", num_constraints=1, dual_lr=0.5, ordering="dual_first", bound=-5.0)
    simultaneous = optimizer.add_constraint("simultaneous", num_constraints=1, dual_lr=0.5, bound=-5.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean()
    loss = loss + first(loss.unsqueeze(0)) + simultaneous(loss.unsqueeze(0))
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = math.inf
    before = snapshot(optimizer)
    scaler.step(optimizer)
    scaler.update()
    after = snapshot(optimizer)
    assert_same(after["params"], before["params"])
    assert_same(after["multipliers"]["simultaneous"], before["multipliers"]["simultaneous"])
    assert first.multipliers.item() > 0  # moved at the forward, inside the skipped iteration
