"""Semantics of constraint blocks, each checked against a closed form worked out by hand here.

Every test drives the public API (``add_constraint``, calling the block, ``step``) and compares the
multipliers, the dual state or the primal gradient with arithmetic written out in the test.
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_lagrangian import LagrangianSGD


def optimizer_with_param(backend: str, lr: float = 0.1):
    param = torch.zeros(3, requires_grad=True)
    return LagrangianSGD([param], lr=lr, backend=backend), param


def step(optimizer, param, *terms_fns) -> None:
    """One training step whose loss is a task loss plus the given block terms (called inside)."""
    loss = param.sum()
    for term in terms_fns:
        loss = loss + term()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# The grouped blocks' old defaults (this step's group means, plain projected ascent), for tests of those
# semantics; the defaults themselves are tested in test_dual_defaults.py.
BATCH_ASCENT = dict(estimator="batch", dual_rule="ascent")


def ascent(lam: list[float], g: list[float], lr: float, lower: float = 0.0, upper: float = math.inf) -> list[float]:
    return [min(max(lam_k + lr * g_k, lower), upper) for lam_k, g_k in zip(lam, g)]


# --------------------------------------------------------------------------------------------------
# Kinds


def test_indexed_untouched_multipliers_and_state_are_bitwise_unchanged(backend):
    optimizer, param = optimizer_with_param(backend)
    k = 1000
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=k, sense="==", dual_lr=0.05,
                                     dual_rule="nupi", kp=1.0, ki=1.0, nu=0.3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):  # give every constraint a nonzero multiplier and state first
        ids = torch.randint(0, k, (800,), generator=generator)
        step(optimizer, param, lambda: block(torch.randn(800, generator=generator), ids=ids))
    assert (block.multipliers != 0).sum() > 900 and (block.dual_state != 0).sum() > 900
    multipliers, state = block.multipliers.clone(), block.dual_state.clone()

    touched = torch.tensor([0, 3, 3, 17, 998, 999, 17, 3])
    for _ in range(3):
        step(optimizer, param, lambda: block(torch.rand(touched.numel(), generator=generator) + 0.5, ids=touched))

    untouched = torch.ones(k, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(block.multipliers[untouched], multipliers[untouched])
    assert torch.equal(block.dual_state[untouched], state[untouched])
    assert (block.multipliers[touched] != multipliers[touched]).all()
    assert (block.dual_state[touched] != state[touched]).all()


def test_indexed_duplicates_are_summed_for_the_dual_and_each_gets_its_multiplier_in_the_gradient(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=5, sense="<=", bound=0.5, dual_lr=0.1)
    ids = torch.tensor([2, 2, 4])
    step(optimizer, param, lambda: block(torch.tensor([1.0, 2.0, 3.0]), ids=ids))
    # g_2 = (1 - 0.5) + (2 - 0.5) = 2.0, g_4 = 3 - 0.5 = 2.5
    torch.testing.assert_close(block.multipliers, torch.tensor([0.0, 0.0, 0.1 * 2.0, 0.0, 0.1 * 2.5]))

    values = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    block(values, ids=ids).backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.2, 0.2, 0.25]))


def test_grouped_is_the_group_mean_minus_a_per_group_bound(backend):
    optimizer, param = optimizer_with_param(backend)
    bound = torch.tensor([0.1, 0.2, 0.3, 0.4])
    block = optimizer.add_constraint("groups", kind="grouped", num_constraints=4, bound=bound, dual_lr=0.5,
                                     **BATCH_ASCENT)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 2])
    step(optimizer, param, lambda: block(values, ids=ids))
    # group 0: mean(1, 2) - 0.1; group 1: 3 - 0.2; group 2: mean(4, 5) - 0.3; group 3 not observed
    expected = torch.tensor([0.5 * (1.5 - 0.1), 0.5 * (3.0 - 0.2), 0.5 * (4.5 - 0.3), 0.0])
    torch.testing.assert_close(block.multipliers, expected)

    values.grad = None
    block(values, ids=ids).backward()
    # d/dv_i of sum_k lambda_k * mean_k = lambda_{c(i)} / n_{c(i)}
    lam = expected
    torch.testing.assert_close(values.grad, torch.stack([lam[0] / 2, lam[0] / 2, lam[1], lam[2] / 2, lam[2] / 2]))


def test_grouped_to_overall_measures_each_group_against_the_batch_mean(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("parity", kind="grouped", num_constraints=3, sense="==", dual_lr=1.0,
                                     to_overall=True, **BATCH_ASCENT)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 2])
    step(optimizer, param, lambda: block(values, ids=ids))
    # batch mean 3: group means minus it are -1.5, 0, +1.5
    lam = torch.tensor([-1.5, 0.0, 1.5])
    torch.testing.assert_close(block.multipliers, lam)

    values.grad = None
    block(values, ids=ids).backward()
    # sum_k lambda_k (mean_k - mean_all): d/dv_i = lambda_{c(i)} / n_{c(i)} - sum_k lambda_k / B
    counts = torch.tensor([2.0, 2.0, 1.0, 2.0, 2.0])
    torch.testing.assert_close(values.grad, lam[ids] / counts - lam.sum() / 5)


@pytest.mark.parametrize("sense", ["<=", ">=", "=="])
def test_dense_senses(backend, sense):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("c", num_constraints=3, sense=sense, bound=0.1, dual_lr=0.5)
    values = [0.3, -0.2, 0.5]
    step(optimizer, param, lambda: block(torch.tensor(values)))
    violation = [(b - 0.1) if sense != ">=" else (0.1 - b) for b in values]
    lower = -math.inf if sense == "==" else 0.0
    torch.testing.assert_close(block.multipliers, torch.tensor(ascent([0, 0, 0], violation, 0.5, lower)))


# --------------------------------------------------------------------------------------------------
# Projection and the optional dual controls


def test_inequality_multipliers_are_projected_onto_nonnegative_values(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.1)
    step(optimizer, param, lambda: block(torch.tensor([1.0])))
    torch.testing.assert_close(block.multipliers, torch.tensor([0.1]))
    step(optimizer, param, lambda: block(torch.tensor([-5.0])))
    assert block.multipliers.item() == 0.0  # 0.1 - 0.5 projected to 0, not negative


@pytest.mark.parametrize("sense, value, expected", [("<=", 10.0, 0.3), ("==", -10.0, -0.3), ("==", 10.0, 0.3)])
def test_multiplier_cap(backend, sense, value, expected):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("c", num_constraints=1, sense=sense, dual_lr=1.0, max_multiplier=0.3)
    step(optimizer, param, lambda: block(torch.tensor([value])))
    torch.testing.assert_close(block.multipliers, torch.tensor([expected]))


def test_damping_pulls_the_multiplier_towards_zero(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.1, damping=0.5, init=1.0)
    step(optimizer, param, lambda: block(torch.tensor([0.2])))
    torch.testing.assert_close(block.multipliers, torch.tensor([1.0 + 0.1 * (0.2 - 0.5 * 1.0)]))


@pytest.mark.parametrize("violation, expected", [(-0.01, 0.0), (0.0, 0.0), (0.2, 1.0 + 0.1 * 0.2)])
def test_restart_on_feasibility(backend, violation, expected):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.1, init=1.0, restart_on_feasible=True)
    step(optimizer, param, lambda: block(torch.tensor([violation])))
    torch.testing.assert_close(block.multipliers, torch.tensor([expected]))


def test_nupi_first_steps_follow_the_zeros_convention(backend):
    optimizer, param = optimizer_with_param(backend)
    kp, ki, nu, lr = 2.0, 1.0, 0.5, 0.1
    block = optimizer.add_constraint("c", num_constraints=1, dual_lr=lr, dual_rule="nupi", kp=kp, ki=ki, nu=nu)
    # xi_{-1} = 0;  xi_t = nu xi_{t-1} + (1 - nu) e_t;  lambda += lr (ki e_t + kp (xi_t - xi_{t-1}))
    # e = 1:    xi = 0.5,  lambda = 0    + 0.1 * (1    + 2 * (0.5 - 0))   = 0.2
    # e = 0.3:  xi = 0.4,  lambda = 0.2  + 0.1 * (0.3  + 2 * (0.4 - 0.5)) = 0.21
    # e = -0.2: xi = 0.1,  lambda = 0.21 + 0.1 * (-0.2 + 2 * (0.1 - 0.4)) = 0.13
    for error, xi, lam in [(1.0, 0.5, 0.2), (0.3, 0.4, 0.21), (-0.2, 0.1, 0.13)]:
        step(optimizer, param, lambda: block(torch.tensor([error])))
        torch.testing.assert_close(block.dual_state, torch.tensor([xi]))
        torch.testing.assert_close(block.multipliers, torch.tensor([lam]))


# --------------------------------------------------------------------------------------------------
# Formulations


@pytest.mark.parametrize("sense", ["<=", "=="])
def test_augmented_lagrangian_gradient_and_dual_update(backend, sense):
    optimizer, param = optimizer_with_param(backend)
    c = 2.0
    block = optimizer.add_constraint("c", num_constraints=3, sense=sense, dual_lr=0.1, formulation="augmented",
                                     penalty=c)
    lam = torch.tensor([0.5, 0.0, 1.0])
    block.multipliers.copy_(lam)
    values = torch.tensor([0.1, 0.3, -1.0], requires_grad=True)
    block(values).backward()
    if sense == "<=":  # d/dg of (relu(lambda + c g)^2 - lambda^2) / (2c) = relu(lambda + c g)
        expected = torch.relu(lam + c * values.detach())
    else:  # d/dh of lambda h + c/2 h^2
        expected = lam + c * values.detach()
    torch.testing.assert_close(values.grad, expected)

    optimizer.zero_grad()
    step(optimizer, param, lambda: block(values.detach()))
    lower = 0.0 if sense == "<=" else -math.inf
    # the pending values of the first call above are consumed by this step too (dense: their mean)
    torch.testing.assert_close(block.multipliers, torch.tensor(ascent(lam.tolist(), values.tolist(), 0.1, lower)))


@pytest.mark.parametrize("formulation", ["penalty", "quadratic"])
@pytest.mark.parametrize("sense", ["<=", "=="])
def test_penalty_formulations_freeze_the_multipliers(backend, formulation, sense):
    optimizer, param = optimizer_with_param(backend)
    c = 3.0
    block = optimizer.add_constraint("c", num_constraints=3, sense=sense, dual_lr=0.5, formulation=formulation,
                                     penalty=c, init=0.25)
    values = torch.tensor([0.4, -0.2, 0.1], requires_grad=True)
    for _ in range(3):
        values.grad = None
        step(optimizer, param, lambda: block(values))
    torch.testing.assert_close(block.multipliers, torch.full((3,), 0.25))
    if formulation == "penalty":  # c * g
        expected = torch.full((3,), c)
    elif sense == "<=":  # c/2 relu(g)^2
        expected = c * torch.relu(values.detach())
    else:  # c/2 h^2
        expected = c * values.detach()
    torch.testing.assert_close(values.grad, expected)


# --------------------------------------------------------------------------------------------------
# Orderings, proxies, accumulation


@pytest.mark.parametrize("ordering", ["simultaneous", "dual_first"])
def test_orderings(backend, ordering):
    # min theta^2 / 2  s.t.  theta <= 1, from theta = 2: SGD lr 0.1, dual lr 0.5
    theta = torch.tensor([2.0], requires_grad=True)
    optimizer = LagrangianSGD([theta], lr=0.1, backend=backend)
    block = optimizer.add_constraint("c", num_constraints=1, bound=1.0, dual_lr=0.5, ordering=ordering)
    t, lam = 2.0, 0.0
    for _ in range(4):
        loss = 0.5 * (theta * theta).sum() + block(theta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if ordering == "simultaneous":  # both updates read (theta_t, lambda_t)
            t, lam = t - 0.1 * (t + lam), max(0.0, lam + 0.5 * (t - 1))
        else:  # lambda_{t+1} first, then the primal step sees it
            lam = max(0.0, lam + 0.5 * (t - 1))
            t = t - 0.1 * (t + lam)
        torch.testing.assert_close(theta, torch.tensor([t]))
        torch.testing.assert_close(block.multipliers, torch.tensor([lam]))


def test_dual_values_drive_the_dual_and_values_drive_the_gradient(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("rate", num_constraints=2, bound=0.5, dual_lr=1.0)
    values = torch.tensor([0.2, 0.4], requires_grad=True)
    hard = torch.tensor([1.0, 0.0])
    step(optimizer, param, lambda: block(values, dual_values=hard))
    # the dual reads hard - 0.5 = (0.5, -0.5); the values alone would leave both multipliers at 0
    torch.testing.assert_close(block.multipliers, torch.tensor([0.5, 0.0]))
    values.grad = None
    block(values, dual_values=hard).backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.5, 0.0]))


def test_observe_records_like_a_call_and_adds_nothing_to_the_loss(backend):
    optimizer, param = optimizer_with_param(backend)
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=5, bound=0.5, dual_lr=0.1)
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert block.observe(values, ids=torch.tensor([2, 2, 4])) is None
    assert values.grad is None and block.has_pending
    step(optimizer, param)
    # the same closed form as a call: g_2 = 0.5 + 1.5, g_4 = 2.5
    torch.testing.assert_close(block.multipliers, torch.tensor([0.0, 0.0, 0.1 * 2.0, 0.0, 0.1 * 2.5]))
    torch.testing.assert_close(param.detach(), torch.full((3,), -0.1))  # the task loss's gradient alone

    with torch.no_grad():  # unlike a call (evaluation), observe records under no_grad
        block(torch.tensor([9.0]), ids=torch.tensor([0]))
        assert not block.has_pending
        block.observe(torch.tensor([9.0]), ids=torch.tensor([0]))
    step(optimizer, param)
    assert block.multipliers[0].item() == pytest.approx(0.1 * 8.5)


def _indexed_model_run(backend, batches: list[list[torch.Tensor]]):
    """SGD on w with an indexed block on v_i = w . x_i; each step accumulates over its list of micro-batches."""
    w = torch.tensor([0.3, -0.2], requires_grad=True)
    optimizer = LagrangianSGD([w], lr=0.05, backend=backend)
    rows = optimizer.add_constraint("rows", kind="indexed", num_constraints=6, bound=0.1, dual_lr=0.5)
    groups = optimizer.add_constraint("groups", kind="grouped", num_constraints=3, sense=">=", dual_lr=0.5)
    for micro_batches in batches:
        for x, ids in micro_batches:
            v = x @ w
            loss = (v * v).sum() + rows(v, ids=ids)
            loss.backward()
            groups(v.detach(), ids=ids % 3)  # dual side only: no gradient flows from a detached input
        optimizer.step()
        optimizer.zero_grad()
    return w.detach(), rows.multipliers, groups.multipliers


def test_gradient_accumulation_over_two_backward_calls_equals_one_call_on_the_concatenated_batch(backend):
    generator = torch.Generator().manual_seed(1)
    whole, halves = [], []
    for _ in range(5):
        x = torch.randn(8, 2, generator=generator)
        ids = torch.randint(0, 6, (8,), generator=generator)
        whole.append([(x, ids)])
        halves.append([(x[:5], ids[:5]), (x[5:], ids[5:])])
    for accumulated, single in zip(_indexed_model_run(backend, halves), _indexed_model_run(backend, whole)):
        torch.testing.assert_close(accumulated, single, rtol=1e-6, atol=1e-7)
    assert (single != 0).any()


# --------------------------------------------------------------------------------------------------
# report()


def test_report_fields(backend):
    optimizer, param = optimizer_with_param(backend)
    ineq = optimizer.add_constraint("ineq", kind="indexed", num_constraints=10, dual_lr=1.0)
    eq = optimizer.add_constraint("eq", num_constraints=3, sense="==", dual_lr=1.0)
    step(optimizer, param,
         lambda: ineq(torch.tensor([0.5, -0.25, 0.75, 0.25]), ids=torch.tensor([1, 4, 7, 1])),
         lambda: eq(torch.tensor([0.5, -2.0, 0.0])))
    report = optimizer.report()
    # ineq: g_1 = 0.5 + 0.25, g_4 = -0.25, g_7 = 0.75
    assert report["ineq"] == pytest.approx({
        "kind": "indexed", "num_constraints": 10, "observed": 3, "max_violation": 0.75, "num_violated": 2,
        "multiplier_mean": 1.5 / 10, "multiplier_max": 0.75, "multiplier_nonzero": 2, "nonfinite_skipped": 0,
    })
    # eq: |h| = 0.5, 2, 0
    assert report["eq"] == pytest.approx({
        "kind": "dense", "num_constraints": 3, "observed": 3, "max_violation": 2.0, "num_violated": 2,
        "multiplier_mean": -1.5 / 3, "multiplier_max": 2.0, "multiplier_nonzero": 2, "nonfinite_skipped": 0,
    })
    step(optimizer, param)  # a step that observes nothing
    assert optimizer.report()["ineq"]["observed"] == 0
