"""The post-processing baseline: per-group decision thresholds on a trained model's scores.

Under demographic parity or equal opportunity the most accurate constrained classifier thresholds the
scores group by group (Hardt, Price and Srebro, NeurIPS 2016; Corbett-Davies et al., KDD 2017).  Thresholding
the unconstrained model's scores per group is therefore the standard baseline an in-training method is judged
against: no retraining, every constraint met on the rows it is fitted to, and each threshold fitted to its
group's training rows only, which is what it risks on test.

Fit: for a target overall rate r, each constrained group independently takes the number of its top-scored
rows predicted positive that maximises its own training accuracy among the numbers whose rate lies within
[r - bound_k, r + bound_k]; groups left unconstrained keep the model's threshold (logit 0).  Every r of a
grid is tried; the most accurate choice whose max violation, measured against the overall rate it actually
produces, is at most ``tolerance`` wins, else the least violating one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

RATE_CONSTRAINTS = ("dp", "eo")


@dataclasses.dataclass
class GroupThresholds:
    thresholds: Tensor  # (K,) per group: a row is predicted positive when its logit is above its group's entry
    overall_rate: float  # the target overall rate of the chosen fit
    train_accuracy: float  # of the fit, on the rows it was fitted to
    train_max_violation: float

    def shift(self, logits: Tensor, group_ids: Tensor) -> Tensor:
        """Logits moved so that ``> 0`` is the thresholded decision (the demo's evaluation reads logits)."""
        return logits - self.thresholds.to(logits.dtype)[group_ids]


@dataclasses.dataclass
class _Group:
    """One group's rows sorted by score, descending, and what predicting the top j of them positive gives."""
    sorted_logits: np.ndarray
    correct: np.ndarray  # (n + 1,) correct predictions among the group's rows with the top j positive
    in_rate: np.ndarray  # (n + 1,) rows of the rate's population (dp: all, eo: label 1) among the top j
    population: int  # the rate's denominator: rows (dp) or label-1 rows (eo)
    model_choice: int  # j of the model's own threshold, logit 0

    @classmethod
    def of(cls, logits: np.ndarray, labels: np.ndarray, constraint: str) -> "_Group":
        order = np.argsort(-logits, kind="stable")
        logits, labels = logits[order], labels[order]
        positives = np.concatenate([[0], np.cumsum(labels)])
        top = np.arange(len(labels) + 1)
        negatives = len(labels) - positives[-1]
        correct = positives + negatives - (top - positives)
        in_rate, population = (top, len(labels)) if constraint == "dp" else (positives, int(positives[-1]))
        return cls(logits, correct, in_rate, population, int((logits > 0).sum()))

    def best_within(self, low: float, high: float) -> int:
        """The most accurate j whose rate lies in [low, high]; the j of the nearest rate when none does."""
        rates = self.in_rate / self.population
        allowed = (rates >= low - 1e-12) & (rates <= high + 1e-12)
        if allowed.any():
            return int(np.argmax(np.where(allowed, self.correct, -1)))
        return int(np.argmin(np.abs(rates - 0.5 * (low + high))))

    def threshold(self, j: int) -> float:
        if len(self.sorted_logits) == 0:
            return 0.0
        return float(self.sorted_logits[j]) if j < len(self.sorted_logits) else -float("inf")


def fit_group_thresholds(logits: Tensor, labels: Tensor, group_ids: Tensor, num_groups: int,
                         bounds: Union[float, Tensor], constrained: Tensor, constraint: str = "dp",
                         tolerance: float = 0.0, targets: Optional[Sequence[float]] = None) -> GroupThresholds:
    """Per-group thresholds of ``logits`` (N,) that hold |rate_k - overall| <= bounds[k] for every constrained
    group on these rows, most accurately (see the module docstring).  One group per row (``group_ids`` (N,)).
    ``targets``: the overall rates tried (default 401 evenly spaced in [0, 1]).
    """
    if constraint not in RATE_CONSTRAINTS:
        raise ValueError(f"group thresholds hold rate constraints {RATE_CONSTRAINTS}, got {constraint!r}")
    if group_ids.dim() != 1:
        raise ValueError("group thresholds need one group per row: group_ids must be (N,), not memberships")
    bounds = torch.as_tensor(bounds, dtype=torch.float64).expand(num_groups).numpy()
    scores = logits.detach().double().cpu().numpy()
    positive = labels.detach().cpu().numpy() > 0.5
    ids = group_ids.cpu().numpy()
    groups = [_Group.of(scores[ids == k], positive[ids == k], constraint) for k in range(num_groups)]
    held = [k for k in range(num_groups) if bool(constrained[k]) and groups[k].population > 0]
    population = sum(group.population for group in groups)
    if population == 0:
        raise ValueError("no row is in the rate's population (eo: no label-1 row): there is no rate to hold")

    best = None
    for rate in np.linspace(0.0, 1.0, 401) if targets is None else targets:
        choice = [group.model_choice for group in groups]
        for k in held:
            choice[k] = groups[k].best_within(rate - bounds[k], rate + bounds[k])
        achieved = sum(int(group.in_rate[j]) for group, j in zip(groups, choice)) / population
        violation = max((abs(groups[k].in_rate[choice[k]] / groups[k].population - achieved) - bounds[k]
                         for k in held), default=0.0)
        accuracy = sum(int(group.correct[j]) for group, j in zip(groups, choice)) / len(scores)
        # Feasible fits rank by accuracy; infeasible ones, below every feasible one, by violation.
        key = (accuracy, 0.0) if violation <= tolerance else (-1.0, -violation)
        if best is None or key > best[0]:
            best = (key, float(rate), choice, accuracy, max(0.0, float(violation)))
    _, rate, choice, accuracy, violation = best
    thresholds = torch.tensor([group.threshold(j) for group, j in zip(groups, choice)], dtype=torch.float64)
    return GroupThresholds(thresholds, rate, accuracy, violation)
