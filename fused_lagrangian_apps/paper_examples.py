"""The position paper's two examples (Ramirez et al., arXiv 2505.20628, appendix and code): where a fixed penalty fails and a constraint does not.

Both run through the package's real optimizer step, so they double as end-to-end oracles for the tests
and as the ``fused-lagrangian examples`` table.

Concave example: ``min (1+y²) cos x  s.t.  (1+y²) sin x = ε``, x in [0, π/2].  The solution is
x* = arcsin ε, y* = 0, λ* = ε/√(1−ε²).  The objective is concave in x, so ``f + c·h`` is minimised at an
end of the interval for every coefficient c: no fixed penalty finds x*, the Lagrangian method does.

Rate example: a linear classifier on four Gaussian clusters must predict class 0 for at least 70% of the
points.  A sigmoid surrogate of the rate drives the parameters, the hard rate drives the multiplier
(proxy constraint).  The Lagrangian run lands at 70%; no coefficient of the penalty grid does.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_lagrangian import LagrangianSGD

CONCAVE_EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# Both sides of the switching coefficient tan(0.5) ≈ 0.55 of the starting point x = 0.5.
CONCAVE_PENALTIES = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)

RATE_TARGET = 0.7
# The position paper's grid: 0 and 19 log-spaced coefficients from 1e-4 to 1e2.
RATE_PENALTIES = (0.0,) + tuple(float(c) for c in torch.logspace(-4, 2, 19, dtype=torch.float64))


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Thousands of steps on tensors of a few hundred elements: intra-op threads only add synchronisation
    (4x slower on this busy 2-core machine), so the loops run on one and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Concave example


def concave_example(epsilon: float, method: str = "lagrangian", penalty: float = 1.0, steps: int = 1000,
                    backend: str = "auto") -> dict:
    """GDA (primal SGD 1e-2, dual νPI lr 0.3, K_P 40, K_I 1) or SGD on the fixed penalty ``f + c·(h − ε)``."""
    x = torch.tensor(0.5, requires_grad=True)
    y = torch.tensor(0.5, requires_grad=True)
    optimizer = LagrangianSGD([x, y], lr=1e-2, backend=backend)
    if method == "lagrangian":
        constraint = optimizer.add_constraint("h", num_constraints=1, sense="==", bound=epsilon, dual_lr=0.3,
                                              dual_rule="nupi", kp=40.0, ki=1.0)
    elif method == "penalty":
        constraint = optimizer.add_constraint("h", num_constraints=1, sense="==", bound=epsilon,
                                              formulation="penalty", penalty=penalty)
    else:
        raise ValueError(f"method must be 'lagrangian' or 'penalty', got {method!r}")
    with _one_intra_op_thread():
        for _ in range(steps):
            f, h = _concave_objective_and_constraint(x, y)
            loss = f + constraint(h.reshape(1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                x.clamp_(0.0, math.pi / 2)
    with torch.no_grad():
        f, h = _concave_objective_and_constraint(x, y)
    return {"x": x.item(), "y": y.item(), "multiplier": constraint.multipliers.item(), "f": f.item(), "h": h.item()}


def _concave_objective_and_constraint(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    scale = 1 + y * y
    return scale * torch.cos(x), scale * torch.sin(x)


def concave_solution(epsilon: float) -> dict:
    """The closed-form optimum and its multiplier."""
    return {"x": math.asin(epsilon), "y": 0.0, "multiplier": epsilon / math.sqrt(1 - epsilon**2),
            "f": math.sqrt(1 - epsilon**2), "h": epsilon}


# --------------------------------------------------------------------------------------------------
# Rate example


def rate_dataset(seed: int = 0, points_per_cluster: int = 100) -> tuple[Tensor, Tensor]:
    """Four Gaussian clusters (variance 0.05): (0,1) and (−1,0) labelled 1, (0,−1) and (1,0) labelled 0."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([(0.0, 1.0), (-1.0, 0.0), (0.0, -1.0), (1.0, 0.0)])
    inputs = torch.cat([m + math.sqrt(0.05) * torch.randn(points_per_cluster, 2, generator=generator) for m in means])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat_interleave(points_per_cluster)
    return inputs, labels


def rate_example(method: str = "lagrangian", penalty: float = 0.0, dual_lr: float = 1e-2, steps: int = 10_000,
                 seed: int = 0, backend: str = "auto") -> dict:
    """One run: "lagrangian" (rate >= 70% as a dual-first proxy constraint) or a fixed ``penalty``·(0.7 − rate).

    Returns the fraction predicted class 0, the accuracy, the multiplier (the coefficient for a penalty run)
    and the final weight and bias.
    """
    if method not in ("lagrangian", "penalty"):
        raise ValueError(f"method must be 'lagrangian' or 'penalty', got {method!r}")
    inputs, labels = rate_dataset(seed)
    weight, bias = _initial_classifier(1)
    optimizer = LagrangianSGD([weight, bias], lr=2e-2, backend=backend)
    if method == "lagrangian":
        constraint = optimizer.add_constraint("rate", num_constraints=1, sense=">=", bound=RATE_TARGET,
                                              dual_lr=dual_lr, ordering="dual_first")
    elif penalty > 0:
        constraint = optimizer.add_constraint("rate", num_constraints=1, sense=">=", bound=RATE_TARGET,
                                              formulation="penalty", penalty=penalty)
    else:
        constraint = None  # a zero penalty is unconstrained training
    _train_rate_classifiers(optimizer, constraint, weight, bias, inputs, labels, steps)
    multiplier = constraint.multipliers.item() if method == "lagrangian" else float(penalty)
    return {**_rate_metrics(weight, bias, inputs, labels)[0], "multiplier": multiplier}


def penalty_grid(coefficients: Sequence[float] = RATE_PENALTIES, steps: int = 10_000, seed: int = 0,
                 backend: str = "auto") -> list[dict]:
    """The rate example's fixed-penalty sweep, one result per coefficient.

    The runs are independent models trained side by side in one optimizer, so the sweep costs about one
    run: model m's loss depends on its own parameters only, so the gradient of the summed losses is each
    model's own gradient, and SGD updates element by element.  Model m carries the fixed penalty
    ``c_m·(0.7 − rate_m)`` as a Lagrangian term whose multiplier is frozen at c_m (dual_lr 0), which is
    the fixed penalty itself (the tests check it against ``rate_example(method="penalty")``).
    """
    inputs, labels = rate_dataset(seed)
    weight, bias = _initial_classifier(len(coefficients))
    optimizer = LagrangianSGD([weight, bias], lr=2e-2, backend=backend)
    constraint = optimizer.add_constraint("rate", num_constraints=len(coefficients), sense=">=",
                                          bound=RATE_TARGET, dual_lr=0.0)
    constraint.multipliers.copy_(torch.tensor(coefficients, dtype=torch.float32))
    _train_rate_classifiers(optimizer, constraint, weight, bias, inputs, labels, steps)
    return [{**metrics, "multiplier": float(c)}
            for c, metrics in zip(coefficients, _rate_metrics(weight, bias, inputs, labels))]


def _initial_classifier(models: int) -> tuple[Tensor, Tensor]:
    """``models`` copies of the paper's starting point w = (1, −1), b = 0, one row each."""
    weight = torch.tensor([[1.0, -1.0]]).repeat(models, 1).requires_grad_()
    bias = torch.zeros(models, requires_grad=True)
    return weight, bias


@_one_intra_op_thread()
def _train_rate_classifiers(optimizer, constraint, weight, bias, inputs, labels, steps) -> None:
    targets = labels[:, None].expand(-1, weight.shape[0])
    for _ in range(steps):
        logits = F.linear(inputs, weight, bias)  # (points, models)
        # Each model's mean cross-entropy; summing over models keeps their gradients separate.
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0).sum()
        if constraint is not None:
            soft_rate = torch.sigmoid(-logits).mean(0)  # mean of 1 − σ(z): surrogate for the primal step
            with torch.no_grad():
                hard_rate = (logits < 0).float().mean(0)  # fraction predicted 0: drives the dual step
            loss = loss + constraint(soft_rate, dual_values=hard_rate)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _rate_metrics(weight: Tensor, bias: Tensor, inputs: Tensor, labels: Tensor) -> list[dict]:
    with torch.no_grad():
        logits = F.linear(inputs, weight, bias)
        predicted_0 = (logits < 0).float().mean(0)
        accuracy = ((logits >= 0).float() == labels[:, None]).float().mean(0)
    return [{"predicted_0": p.item(), "accuracy": a.item(), "weight": w.tolist(), "bias": b.item()}
            for p, a, w, b in zip(predicted_0, accuracy, weight.detach(), bias.detach())]


# --------------------------------------------------------------------------------------------------
# The table of ``fused-lagrangian examples``


def print_examples_table(backend: str = "auto", epsilon: float = 0.5, rate_dual_lr: float = 1e-2,
                         concave_penalties: Sequence[float] = CONCAVE_PENALTIES,
                         rate_penalties: Sequence[float] = RATE_PENALTIES, rate_steps: int = 10_000,
                         file: Optional[object] = None) -> None:
    """Lagrangian vs each penalty of the grid, for both examples."""
    def show(line: str = "") -> None:
        print(line, file=file)

    best = concave_solution(epsilon)
    show(f"Concave example, epsilon = {epsilon}: optimum x* = {best['x']:.4f}, lambda* = {best['multiplier']:.4f}")
    show(f"{'method':<22}{'x':>9}{'y':>9}{'h - eps':>11}{'f':>9}{'multiplier':>12}")
    runs = [("lagrangian", concave_example(epsilon, backend=backend))]
    runs += [(f"penalty c={c:g}", concave_example(epsilon, "penalty", penalty=c, backend=backend))
             for c in concave_penalties]
    for label, r in runs:
        show(f"{label:<22}{r['x']:>9.4f}{r['y']:>9.4f}{r['h'] - epsilon:>11.4f}{r['f']:>9.4f}{r['multiplier']:>12.4f}")
    show(_explain_concave(runs, best))
    show()
    show(f"Rate example: at least {RATE_TARGET:.0%} predicted class 0 ({rate_steps:,} full-batch SGD steps)")
    show(f"{'method':<22}{'predicted 0':>13}{'accuracy':>10}{'multiplier':>12}")
    runs = [(f"lagrangian lr={rate_dual_lr:g}", rate_example(dual_lr=rate_dual_lr, steps=rate_steps, backend=backend))]
    runs += [(f"penalty c={r['multiplier']:.3g}", r)
             for r in penalty_grid(rate_penalties, steps=rate_steps, backend=backend)]
    for label, r in runs:
        show(f"{label:<22}{r['predicted_0']:>13.1%}{r['accuracy']:>10.1%}{r['multiplier']:>#12.4g}")
    show(_explain_rate(runs, points=len(rate_dataset()[1])))


def _explain_concave(runs: list[tuple[str, dict]], best: dict) -> str:
    lagrangian = runs[0][1]
    at_ends = sum(min(r["x"], math.pi / 2 - r["x"]) < 1e-3 for _, r in runs[1:])
    return (f"The Lagrangian run ends {abs(lagrangian['x'] - best['x']):.1e} from x* and "
            f"{abs(lagrangian['multiplier'] - best['multiplier']):.1e} from lambda*.\n{at_ends} of the "
            f"{len(runs) - 1} penalties end at an end of the interval (x = 0 or pi/2): f is concave in x, so "
            "f + c*h is minimised at an end\nfor every c, and no fixed penalty can find x*.")


def _explain_rate(runs: list[tuple[str, dict]], points: int) -> str:
    """How far from the target each method ends, counted in points of the data set (the rate's resolution)."""
    target = round(RATE_TARGET * points)

    def predicted(r: dict) -> int:
        return round(r["predicted_0"] * points)

    lagrangian, penalties = runs[0][1], [r for _, r in runs[1:]]
    lines = [f"The rate is a count over {points} points: it moves in steps of {1 / points:.2%}, and 70% is "
             f"{target} points predicted 0."]
    if abs(predicted(lagrangian) - target) <= 1:
        lines += [f"The Lagrangian run ends at {predicted(lagrangian)} points: its multiplier holds the rate on the "
                  "bound, moving it one point back",
                  f"and forth across it, so the last iterate reads {target / points:.1%} or one point under "
                  f"({target - 1} points = {(target - 1) / points:.2%}):",
                  f"one point is the tolerance of a rate over {points} points."]
    else:
        lines += [f"The Lagrangian run ends at {predicted(lagrangian)} points, {predicted(lagrangian) - target:+d} "
                  "from the target: not converged in these steps (the default 10,000 are enough)."]
    if penalties:
        closest = min(penalties, key=lambda r: abs(predicted(r) - target))
        lines += [f"The closest fixed penalty (c = {closest['multiplier']:.3g}) ends at {predicted(closest)} "
                  f"points, {predicted(closest) - target:+d}: each coefficient fixes where a run ends, and "
                  "hitting 70% needs a sweep."]
    return "\n".join(lines)
