"""Library utilities around the dual: best-iterate selection, parameter averaging, dual LR schedules."""

from __future__ import annotations

import warnings

import pytest
import torch

from fused_lagrangian import BestIterate, DualLearningRates, LagrangianAdam, LagrangianSGD, ParameterAverage


def model_and_optimizer(backend="reference"):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = LagrangianSGD(model.parameters(), lr=0.1, backend=backend)
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.5)
    return model, optimizer, block


# --------------------------------------------------------------------------------------------------
# BestIterate


def test_best_iterate_keeps_the_best_feasible_copy_and_restores_it_with_multipliers():
    model, optimizer, block = model_and_optimizer()
    # Scripted evaluations: (metric, max violation) at steps 1..5; step 4 is the best feasible one.
    script = iter([(0.9, 0.3), (0.5, 0.0), (0.7, 0.01), (0.8, -0.1), (0.95, 0.2)])
    best = BestIterate(lambda m: next(script), tolerance=0.0)
    kept = {}
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(step))
        block.multipliers.fill_(step / 10)
        if best.update(step, model, optimizer):
            kept[step] = True
    assert sorted(kept) == [1, 2, 4]  # first (infeasible) iterate, then feasible ones improving the metric
    assert best.best.step == 4 and best.best.feasible and best.best.metric == 0.8
    assert [h[0] for h in best.history] == [1, 2, 3, 4, 5]
    restored = best.load_into(model, optimizer)
    assert restored.step == 4
    assert torch.equal(model.weight, torch.full((1, 2), 4.0))
    assert block.multipliers.item() == pytest.approx(0.4)


def test_best_iterate_without_feasible_iterates_keeps_the_least_violating_and_follows_its_schedule():
    model, _, _ = model_and_optimizer()
    violations = iter([0.3, 0.1, 0.2])
    best = BestIterate(lambda m: (0.0, next(violations)), tolerance=0.01, every=10, higher_is_better=False)
    for step in range(1, 31):
        best.update(step, model)
    assert [h[0] for h in best.history] == [10, 20, 30]
    assert best.best.step == 20 and not best.best.feasible and best.best.constraints is None
    with pytest.raises(ValueError):
        BestIterate(lambda m: (0, 0), every=0)


def test_best_iterate_copies_are_independent_of_later_training_and_eval_mode_is_restored():
    model, optimizer, block = model_and_optimizer()
    modes = []

    def evaluate(m):
        modes.append(m.training)
        return 1.0, 0.0

    best = BestIterate(evaluate)
    best.update(1, model, optimizer)
    snapshot = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    block.multipliers.add_(1.0)
    assert torch.equal(best.best.model_state["weight"], snapshot)
    assert best.best.constraints["c"]["multipliers"].item() == 0.0
    assert modes == [False] and model.training


# --------------------------------------------------------------------------------------------------
# ParameterAverage


@pytest.mark.parametrize("decay", [None, 0.5])
def test_parameter_average_is_the_uniform_or_exponential_average(decay):
    model = torch.nn.Linear(1, 1, bias=False)
    average = ParameterAverage(model, decay=decay)
    values = [1.0, 3.0, 8.0]
    for value in values:
        with torch.no_grad():
            model.weight.fill_(value)
        average.update()
    if decay is None:
        expected = sum(values) / len(values)
    else:
        expected = values[0]
        for value in values[1:]:
            expected = decay * expected + (1 - decay) * value
    assert average.module.weight.item() == pytest.approx(expected)
    assert model.weight.item() == 8.0
    with pytest.raises(ValueError):
        ParameterAverage(model, decay=1.0)


# --------------------------------------------------------------------------------------------------
# Dual learning-rate schedules


def test_step_lr_drives_each_blocks_dual_lr_and_the_step_uses_it():
    model, optimizer, block = model_and_optimizer()
    other = optimizer.add_constraint("d", num_constraints=1, dual_lr=2.0)
    dual_lrs = DualLearningRates(optimizer)
    assert [g["name"] for g in dual_lrs.param_groups] == ["c", "d"]
    scheduler = torch.optim.lr_scheduler.StepLR(dual_lrs, step_size=2, gamma=0.1)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for _ in range(4):
            seen.append((block.spec.dual_lr, other.spec.dual_lr))
            block(torch.tensor([1.0]))  # violation 1 every step: the multiplier grows by dual_lr
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    assert seen == [(0.5, 2.0), (0.5, 2.0), pytest.approx((0.05, 0.2)), pytest.approx((0.05, 0.2))]
    assert block.multipliers.item() == pytest.approx(0.5 + 0.5 + 0.05 + 0.05)


def test_lambda_lr_on_selected_blocks_and_resume_from_state_dict():
    model = torch.nn.Linear(2, 1)
    optimizer = LagrangianAdam(model.parameters(), backend="reference")
    optimizer.add_constraint("a", num_constraints=1, dual_lr=1.0)
    optimizer.add_constraint("b", num_constraints=1, dual_lr=1.0)
    dual_lrs = DualLearningRates(optimizer, blocks=["b"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(dual_lrs, lambda epoch: 1.0 / (1 + epoch))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.constraints["a"].spec.dual_lr == 1.0
    assert optimizer.constraints["b"].spec.dual_lr == pytest.approx(0.25)
    state = (dual_lrs.state_dict(), scheduler.state_dict())

    resumed_optimizer = LagrangianAdam(model.parameters(), backend="reference")
    resumed_optimizer.add_constraint("a", num_constraints=1, dual_lr=1.0)
    resumed = resumed_optimizer.add_constraint("b", num_constraints=1, dual_lr=1.0)
    resumed_lrs = DualLearningRates(resumed_optimizer, blocks=["b"])
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_lrs, lambda epoch: 1.0 / (1 + epoch))
    resumed_lrs.load_state_dict(state[0])
    resumed_scheduler.load_state_dict(state[1])
    assert resumed.spec.dual_lr == pytest.approx(0.25)
    resumed_optimizer.step()
    resumed_scheduler.step()
    assert resumed.spec.dual_lr == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no constraint block"):
        DualLearningRates(optimizer, blocks=["nope"])
