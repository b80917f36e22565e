"""Parity with cooper-optim 1.0.1, the library users would pick today.

Each problem is stated once (objective and constraint measurements as functions of the parameters) and
solved twice: by our optimizer with constraint blocks, and by Cooper's SimultaneousOptimizer (torch
primal optimizer; SGD(maximize=True) or nuPI(init ZEROS) dual; DenseMultiplier for dense and grouped
constraints, IndexedMultiplier for per-sample ones).  The Cooper side builds its violations with its
own code below (per-group means by hand), so the two sides share only the problem statement.
Parameter and multiplier trajectories must agree within 1e-5 at every one of 150 steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import cooper
import pytest
import torch
import torch.nn.functional as F
from cooper.optim.torch_optimizers.nupi_optimizer import nuPI, nuPIInitType

from fused_lagrangian import LagrangianAdam, LagrangianSGD

STEPS = 150
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # inside cooper's sparse nuPI
SIGN = {"<=": 1.0, ">=": -1.0, "==": 1.0}


@dataclasses.dataclass
class ConstraintDef:
    name: str
    kind: str  # dense | indexed | grouped
    num_constraints: int
    sense: str
    bound: object
    # (theta, step) -> (values, ids or None, dual_values or None)
    measure: Callable
    dual_lr: float = 0.1
    nupi: Optional[dict] = None  # kp, ki, nu
    to_overall: bool = False


@dataclasses.dataclass
class Problem:
    theta0: torch.Tensor
    objective: Callable  # (theta, step) -> scalar loss
    constraints: list
    primal: str  # "adam" | "sgd"
    primal_options: dict


def pool(seed: int, rows: int, columns: int) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def batch_ids(step: int, size: int, high: int) -> torch.Tensor:
    return torch.randint(0, high, (size,), generator=torch.Generator().manual_seed(10_000 + step))


# --------------------------------------------------------------------------------------------------
# Problems


def regression_problem(dual_rule: str, primal: str) -> Problem:
    """Least squares with 3 linear inequalities (one never active) and one equality, all dense."""
    features, targets = pool(0, 64, 5), pool(1, 64, 1).flatten()
    weights = pool(2, 3, 5)

    def objective(theta, step):
        rows = batch_ids(step, 8, 64)
        return ((features[rows] @ theta - targets[rows]) ** 2).mean()

    nupi = dict(kp=5.0, ki=1.0, nu=0.5) if dual_rule == "nupi" else None
    return Problem(
        theta0=torch.tensor([0.5, -0.3, 0.8, 0.1, -0.6]),
        objective=objective,
        constraints=[
            ConstraintDef("ineq", "dense", 3, "<=", torch.tensor([0.2, -0.1, 50.0]),
                          lambda theta, step: (weights @ theta, None, None), dual_lr=0.1, nupi=nupi),
            ConstraintDef("eq", "dense", 1, "==", 1.0,
                          lambda theta, step: (theta.sum().reshape(1), None, None), dual_lr=0.05, nupi=nupi),
        ],
        primal=primal,
        primal_options=dict(lr=1e-2) if primal == "adam" else dict(lr=1e-2, momentum=0.9),
    )


def per_sample_problem(dual_rule: str) -> Problem:
    """Feasible learning: every sample's squared error <= 0.05; batches with repeated sample ids."""
    features = pool(3, 12, 3)
    targets = features @ torch.tensor([1.0, -0.5, 0.5]) + 0.1 * pool(4, 12, 1).flatten()  # feasible

    def per_sample_loss(theta, step):
        ids = batch_ids(step, 6, 12)
        ids[5] = ids[0]  # a duplicate in every batch
        return (features[ids] @ theta - targets[ids]) ** 2, ids, None

    nupi = dict(kp=2.0, ki=1.0, nu=0.3) if dual_rule == "nupi" else None
    return Problem(
        theta0=torch.tensor([0.3, 0.2, -0.1]),
        objective=lambda theta, step: 1e-2 * (theta * theta).sum(),
        constraints=[ConstraintDef("rows", "indexed", 12, "<=", 0.05, per_sample_loss, dual_lr=0.05, nupi=nupi)],
        primal="sgd",
        primal_options=dict(lr=1e-2, momentum=0.9),
    )


def groups_problem(to_overall: bool) -> Problem:
    """Logistic regression; each group's positive rate (sigmoid for the primal, hard for the dual) bounded."""
    features = torch.cat([pool(5, 256, 3), torch.ones(256, 1)], dim=1)
    labels = (pool(6, 256, 1).flatten() + features[:, 0] > 0).float()

    def batch(step):
        rows = batch_ids(step, 32, 256)
        groups = torch.randperm(32, generator=torch.Generator().manual_seed(step)) % 4  # every group present
        return rows, groups

    def objective(theta, step):
        rows, _ = batch(step)
        return F.binary_cross_entropy_with_logits(features[rows] @ theta, labels[rows])

    def rates(theta, step):
        rows, groups = batch(step)
        logits = features[rows] @ theta
        return torch.sigmoid(logits), groups, (logits > 0).float()

    bound = 0.05 if to_overall else torch.tensor([0.3, 0.4, 0.5, 0.35])
    return Problem(
        theta0=torch.tensor([1.0, -0.5, 0.25, 0.5]),
        objective=objective,
        constraints=[ConstraintDef("rates", "grouped", 4, "<=", bound, rates, dual_lr=0.5, to_overall=to_overall)],
        primal="adam",
        primal_options=dict(lr=5e-2),
    )


PROBLEMS = {
    "dense-sgd-dual-adam-primal": lambda: regression_problem("ascent", "adam"),
    "dense-sgd-dual-sgd-primal": lambda: regression_problem("ascent", "sgd"),
    "dense-nupi-dual": lambda: regression_problem("nupi", "adam"),
    "indexed-duplicates": lambda: per_sample_problem("ascent"),
    "indexed-nupi-dual": lambda: per_sample_problem("nupi"),
    "grouped-proxy-rates": lambda: groups_problem(to_overall=False),
    "grouped-to-overall": lambda: groups_problem(to_overall=True),
}


# --------------------------------------------------------------------------------------------------
# Ours


def run_ours(problem: Problem, backend: str) -> list:
    theta = problem.theta0.clone().requires_grad_()
    optimizer_cls = LagrangianAdam if problem.primal == "adam" else LagrangianSGD
    optimizer = optimizer_cls([theta], backend=backend, **problem.primal_options)
    blocks = {}
    for c in problem.constraints:
        # Cooper updates multipliers with this step's estimates: the batch estimator, whatever the kind's default.
        rule = dict(dual_rule="nupi", **c.nupi) if c.nupi else dict(dual_rule="ascent")
        rule["estimator"] = "batch"
        blocks[c.name] = optimizer.add_constraint(c.name, kind=c.kind, num_constraints=c.num_constraints,
                                                  sense=c.sense, bound=c.bound, dual_lr=c.dual_lr,
                                                  to_overall=c.to_overall, **rule)
    trajectory = []
    for step in range(STEPS):
        loss = problem.objective(theta, step)
        for c in problem.constraints:
            values, ids, dual_values = c.measure(theta, step)
            loss = loss + blocks[c.name](values, ids=ids, dual_values=dual_values)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append([theta.detach().clone()] + [blocks[c.name].multipliers.clone() for c in problem.constraints])
    return trajectory


# --------------------------------------------------------------------------------------------------
# Cooper


def cooper_violation(c: ConstraintDef, values: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    if c.to_overall:
        values = values - values.mean()
    if c.kind == "grouped":  # per-group means, every group present in the batch
        sums = torch.zeros(c.num_constraints, dtype=values.dtype).index_add(0, ids, values)
        counts = torch.zeros(c.num_constraints, dtype=values.dtype).index_add(0, ids, torch.ones_like(values))
        values = sums / counts
        bound = c.bound
    else:
        bound = c.bound[ids] if isinstance(c.bound, torch.Tensor) and ids is not None else c.bound
    return SIGN[c.sense] * (values - bound)


class CooperProblem(cooper.ConstrainedMinimizationProblem):
    def __init__(self, problem: Problem, theta: torch.Tensor):
        super().__init__()
        self.problem, self.theta = problem, theta
        self.cooper_constraints = {}
        for c in problem.constraints:
            multipliers = cooper.multipliers
            multiplier_cls = multipliers.IndexedMultiplier if c.kind == "indexed" else multipliers.DenseMultiplier
            constraint_type = cooper.ConstraintType.EQUALITY if c.sense == "==" else cooper.ConstraintType.INEQUALITY
            constraint = cooper.Constraint(constraint_type=constraint_type,
                                           multiplier=multiplier_cls(num_constraints=c.num_constraints))
            setattr(self, c.name, constraint)
            self.cooper_constraints[c.name] = constraint

    def compute_cmp_state(self, step: int) -> cooper.CMPState:
        observed = {}
        for c in self.problem.constraints:
            values, ids, dual_values = c.measure(self.theta, step)
            violation = cooper_violation(c, values, ids)
            strict = None if dual_values is None else cooper_violation(c, dual_values, ids)
            features = ids if c.kind == "indexed" else None
            observed[self.cooper_constraints[c.name]] = cooper.ConstraintState(
                violation=violation, constraint_features=features, strict_violation=strict,
                strict_constraint_features=features if strict is not None else None)
        return cooper.CMPState(loss=self.problem.objective(self.theta, step), observed_constraints=observed)


def run_cooper(problem: Problem) -> list:
    theta = problem.theta0.clone().requires_grad_()
    cmp = CooperProblem(problem, theta)
    primal_cls = torch.optim.Adam if problem.primal == "adam" else torch.optim.SGD
    primal = primal_cls([theta], foreach=False, **problem.primal_options)
    duals = []
    for c in problem.constraints:
        params = cmp.cooper_constraints[c.name].multiplier.parameters()
        if c.nupi:
            duals.append(nuPI(params, lr=c.dual_lr, Kp=c.nupi["kp"], Ki=c.nupi["ki"], ema_nu=c.nupi["nu"],
                              init_type=nuPIInitType.ZEROS, maximize=True))
        else:
            duals.append(torch.optim.SGD(params, lr=c.dual_lr, maximize=True))
    optimizer = cooper.optim.SimultaneousOptimizer(cmp=cmp, primal_optimizers=primal, dual_optimizers=duals)
    trajectory = []
    for step in range(STEPS):
        optimizer.roll(compute_cmp_state_kwargs={"step": step})
        multipliers = [cmp.cooper_constraints[c.name].multiplier.weight.detach().flatten().clone()
                       for c in problem.constraints]
        trajectory.append([theta.detach().clone()] + multipliers)
    return trajectory


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_trajectories_match_cooper(backend, name):
    problem = PROBLEMS[name]()
    ours, theirs = run_ours(problem, backend), run_cooper(problem)
    for step, (our_state, their_state) in enumerate(zip(ours, theirs)):
        for ours_tensor, their_tensor in zip(our_state, their_state):
            torch.testing.assert_close(ours_tensor, their_tensor, rtol=0, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    # The constraints did something: some multiplier is positive at the end.
    final_multipliers = torch.cat(ours[-1][1:])
    assert (final_multipliers.abs() > 1e-3).any()


def test_projection_is_exercised_in_the_dense_problem(backend):
    ours = run_ours(regression_problem("ascent", "adam"), backend)
    ineq = torch.stack([state[1] for state in ours])
    assert (ineq[:, 2] == 0).all()  # never active: without the projection it would go negative
    assert ineq[:, 1].max() > 1.0 and ineq[-1, 1] == 0  # active, then satisfied: clipped at zero
