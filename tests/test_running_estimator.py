"""The running (exponentially weighted ratio) estimate of each constraint, through the public API.

Closed forms worked out by hand: S_k <- decay * S_k + sum of the step's violations of group k,
N_k <- decay * N_k + their number, g_k = S_k / N_k, for touched groups only.  Every CPU backend runs
them (backend fixture); the random-problem harnesses of tests/backends compare the kernels with the
reference for every flag combination.
"""

from __future__ import annotations

import pytest
import torch

from fused_lagrangian import LagrangianSGD
from fused_lagrangian.constraints import DUAL_DEFAULTS, ConstraintSpec


def optimizer_with_param(backend: str):
    param = torch.zeros(3, requires_grad=True)
    return LagrangianSGD([param], lr=0.1, backend=backend), param


def step(optimizer, param, term) -> None:
    (param.sum() + term()).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_running_estimate_pools_a_groups_samples_over_steps(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("groups", kind="grouped", num_constraints=3, dual_lr=0.1, dual_rule="ascent",
                                     estimator="running", estimate_decay=0.5)
    # step 1: group 0 sees 1, 2 (S = 3, N = 2, g = 1.5); group 1 sees -1 (S = -1, N = 1, g = -1)
    step(optimizer, param, lambda: block(torch.tensor([1.0, 2.0, -1.0]), ids=torch.tensor([0, 0, 1])))
    torch.testing.assert_close(block.dual_state, torch.tensor([[3.0, -1.0, 0.0], [2.0, 1.0, 0.0]]))
    torch.testing.assert_close(block.multipliers, torch.tensor([0.15, 0.0, 0.0]))
    # step 2: group 0 sees 4 (S = 0.5 * 3 + 4 = 5.5, N = 0.5 * 2 + 1 = 2, g = 2.75); group 1 untouched
    step(optimizer, param, lambda: block(torch.tensor([4.0]), ids=torch.tensor([0])))
    torch.testing.assert_close(block.dual_state, torch.tensor([[5.5, -1.0, 0.0], [2.0, 1.0, 0.0]]))
    torch.testing.assert_close(block.multipliers, torch.tensor([0.15 + 0.1 * 2.75, 0.0, 0.0]))
    assert block.report()["max_violation"] == pytest.approx(2.75)  # statistics measure the estimate used


def test_running_estimate_with_nupi_keeps_xi_in_the_first_row(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.1, dual_rule="nupi", kp=2.0, nu=0.0,
                                     estimator="running", estimate_decay=0.5)
    assert block.dual_state.shape == (3, 1)
    # e = 1: S = 1, N = 1, g = 1, xi = 1, lambda = 0.1 * (1 + 2 * 1) = 0.3
    # e = 0: S = 0.5, N = 1.5, g = 1/3, xi = 1/3, lambda = 0.3 + 0.1 * (1/3 + 2 * (1/3 - 1)) = 0.3 - 0.1
    for error, xi, lam in [(1.0, 1.0, 0.3), (0.0, 1 / 3, 0.2)]:
        step(optimizer, param, lambda: block(torch.tensor([error])))
        torch.testing.assert_close(block.dual_state[0], torch.tensor([xi]))
        torch.testing.assert_close(block.multipliers, torch.tensor([lam]))


def test_untouched_groups_keep_their_running_state_bitwise(backend):
    optimizer, param = optimizer_with_param(backend)
    k = 500
    block = optimizer.add_constraint("groups", kind="grouped", num_constraints=k, dual_lr=0.05)  # the defaults
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, k, (2000,), generator=generator)
        step(optimizer, param, lambda: block(torch.randn(2000, generator=generator), ids=ids))
    before = (block.multipliers.clone(), block.dual_state.clone())
    touched = torch.tensor([3, 3, 7, 499])
    step(optimizer, param, lambda: block(torch.rand(4, generator=generator) + 1.0, ids=touched))
    untouched = torch.ones(k, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(block.multipliers[untouched], before[0][untouched])
    assert torch.equal(block.dual_state[:, untouched], before[1][:, untouched])
    assert (block.dual_state[:, touched] != before[1][:, touched]).all()


def test_defaults_by_kind_and_explicit_options_win():
    grouped = ConstraintSpec("g", "grouped", 4)
    assert (grouped.estimator, grouped.dual_rule, grouped.kp, grouped.estimate_decay) == ("running", "nupi", 20.0, 0.9)
    for kind in ("dense", "indexed"):
        spec = ConstraintSpec("d", kind, 4)
        assert (spec.estimator, spec.dual_rule, spec.kp) == ("batch", "ascent", 0.0)
    old = ConstraintSpec("g", "grouped", 4, estimator="batch", dual_rule="ascent")
    assert old.dual_flags == ConstraintSpec("d", "dense", 4).dual_flags  # MEAN only: the old grouped default
    assert ConstraintSpec("g", "grouped", 4, dual_rule="nupi", kp=1.0).kp == 1.0
    assert set(DUAL_DEFAULTS) == {"dense", "indexed", "grouped"}


@pytest.mark.parametrize("options, message", [
    (dict(estimator="median"), "estimator must be one of"),
    (dict(estimate_decay=1.0), "estimate_decay must be in"),
    (dict(estimate_decay=-0.1), "estimate_decay must be in"),
    (dict(kind="indexed", estimator="running"), "so they take estimator='batch'"),
])
def test_bad_estimator_options_raise(options, message):
    options = {"kind": "grouped", **options}
    with pytest.raises(ValueError, match=message):
        ConstraintSpec("block", num_constraints=3, **options)


def test_penalty_formulations_keep_no_running_state():
    spec = ConstraintSpec("p", "grouped", 4, formulation="quadratic", penalty=2.0)
    optimizer, _ = optimizer_with_param("reference")
    block = optimizer.add_constraint("p", kind="grouped", num_constraints=4, formulation="quadratic", penalty=2.0,
                                     dual_rule="ascent")
    assert block.dual_state.numel() == 0 and spec.dual_flags & 16 == 0


# --------------------------------------------------------------------------------------------------
# Checkpoints from before the running estimator


def old_checkpoint(state_shape, multipliers=(0.5, 0.25)):
    return {"kind": "grouped", "num_constraints": 2, "multipliers": torch.tensor(multipliers),
            "dual_state": torch.arange(1.0, 1.0 + torch.Size(state_shape).numel()).view(state_shape),
            "nonfinite_skipped": 0}


def test_old_nupi_checkpoint_fills_xi_and_starts_an_empty_running_estimate():
    optimizer, _ = optimizer_with_param("reference")
    block = optimizer.add_constraint("g", kind="grouped", num_constraints=2)  # defaults: nuPI + running
    block.load_state_dict(old_checkpoint((2,)))  # (K,) xi of a pre-running nuPI block
    torch.testing.assert_close(block.dual_state, torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(block.multipliers, torch.tensor([0.5, 0.25]))


def test_old_ascent_checkpoint_loads_into_a_running_block_and_mismatches_raise():
    optimizer, _ = optimizer_with_param("reference")
    block = optimizer.add_constraint("g", kind="grouped", num_constraints=2)
    block.load_state_dict(old_checkpoint((0,)))
    assert not block.dual_state.any() and block.multipliers.tolist() == [0.5, 0.25]
    batch = optimizer.add_constraint("b", kind="grouped", num_constraints=2, estimator="batch", dual_rule="ascent")
    with pytest.raises(ValueError, match="dual_state has shape"):
        batch.load_state_dict(old_checkpoint((2,)))
    block.load_state_dict(block.state_dict())  # the current layout round-trips
