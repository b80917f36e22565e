"""Fairness constraints as constraint blocks, and the metrics that judge them.

Constraints (each built on ``opt.add_constraint``; call the result with this batch's tensors and add the
returned term to the loss):

    demographic_parity   every group's positive rate within ±epsilon of the overall rate
    equal_opportunity    the same for the true positive rate (rows with label 1 only)
    bounded_group_loss   every group's mean loss <= epsilon
    per_sample_loss_bound  every training row's loss <= epsilon (feasible learning: one constraint per row)

Rates are not differentiable, so the parity constraints use proxies (Cotter et al., 2019): the sigmoid of
the logit drives the primal gradient, the hard prediction (logit > 0) drives the multipliers through
``dual_values``.  The multipliers therefore rise until the *hard* rates comply, which is what the metrics
below measure.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .constraints import ConstraintBlock
from .optim import LagrangianOptimizer

PARITY_CONSTRAINTS = ("dp", "eo")
CONSTRAINTS = ("dp", "eo", "group-loss")


def soft_and_hard_predictions(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The sigmoid surrogate (differentiable) and the hard 0/1 prediction (logit > 0, i.e. p > 0.5)."""
    return torch.sigmoid(logits), (logits.detach() > 0).to(logits.dtype)


class RateParity:
    """Two-sided rate parity to overall: ``|rate_k - overall| <= epsilon`` for every group k.

    Two grouped blocks share the group ids: ``<name>_upper`` (rate_k - overall <= epsilon) and
    ``<name>_lower`` (rate_k - overall >= -epsilon).  Each row enters as its prediction minus the overall
    mean prediction, so a group's mean of these values is exactly rate_k - overall.  The overall mean is
    taken over every row passed in, including rows whose group is left unconstrained (``constrained``).
    """

    def __init__(self, optimizer: LagrangianOptimizer, num_groups: int, epsilon: float, *,
                 name: str, positives_only: bool, constrained: Optional[Tensor] = None, **block_options) -> None:
        if epsilon < 0:
            raise ValueError(f"{name}: epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.positives_only = positives_only
        self.constrained = constrained
        common = dict(kind="grouped", num_constraints=num_groups, **block_options)
        self.upper = optimizer.add_constraint(f"{name}_upper", sense="<=", bound=self.epsilon, **common)
        self.lower = optimizer.add_constraint(f"{name}_lower", sense=">=", bound=-self.epsilon, **common)

    @property
    def blocks(self) -> tuple[ConstraintBlock, ConstraintBlock]:
        return self.upper, self.lower

    def __call__(self, logits: Tensor, group_ids: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The loss term of both blocks for this batch (logits and group ids of shape (B,))."""
        if self.positives_only:
            if labels is None:
                raise ValueError("equal opportunity needs the labels (the rate is over rows with label 1)")
            positive = labels > 0.5
            logits, group_ids = logits[positive], group_ids[positive]
        soft, hard = soft_and_hard_predictions(logits)
        soft, hard = soft - soft.mean(), hard - hard.mean()
        if self.constrained is not None:
            rows = self.constrained[group_ids].nonzero().squeeze(1)  # one nonzero pass for all three tensors
            soft, hard, group_ids = (t.index_select(0, rows) for t in (soft, hard, group_ids))
        return (self.upper(soft, ids=group_ids, dual_values=hard)
                + self.lower(soft, ids=group_ids, dual_values=hard))


def demographic_parity(optimizer: LagrangianOptimizer, num_groups: int, epsilon: float, *,
                       name: str = "demographic_parity", constrained: Optional[Tensor] = None,
                       **block_options) -> RateParity:
    """Each group's positive rate within ±epsilon of the overall positive rate.

    ``constrained`` (bool, one per group) leaves the groups marked False out of the constraint; they
    still count in the overall rate.  ``block_options`` go to ``add_constraint`` (dual_lr, formulation, ...).
    Call the result as ``term = parity(logits, group_ids)``.
    """
    return RateParity(optimizer, num_groups, epsilon, name=name, positives_only=False,
                      constrained=constrained, **block_options)


def equal_opportunity(optimizer: LagrangianOptimizer, num_groups: int, epsilon: float, *,
                      name: str = "equal_opportunity", constrained: Optional[Tensor] = None,
                      **block_options) -> RateParity:
    """Each group's true positive rate within ±epsilon of the overall true positive rate.

    Call the result as ``term = parity(logits, group_ids, labels)``: only rows with label 1 count.
    """
    return RateParity(optimizer, num_groups, epsilon, name=name, positives_only=True,
                      constrained=constrained, **block_options)


def bounded_group_loss(optimizer: LagrangianOptimizer, num_groups: int, epsilon: float, *,
                       name: str = "bounded_group_loss", **block_options) -> ConstraintBlock:
    """Every group's mean loss <= epsilon.  Call as ``block(per_sample_losses, ids=group_ids)``."""
    return optimizer.add_constraint(name, kind="grouped", num_constraints=num_groups, sense="<=",
                                    bound=float(epsilon), **block_options)


def per_sample_loss_bound(optimizer: LagrangianOptimizer, num_samples: int, epsilon: float, *,
                          name: str = "per_sample_loss", **block_options) -> ConstraintBlock:
    """Feasible learning: every training row's loss <= epsilon, one multiplier per row.

    Call as ``block(per_sample_losses, ids=row_ids)`` with each row's index in the training set; only the
    rows of the batch have their multipliers moved.
    """
    return optimizer.add_constraint(name, kind="indexed", num_constraints=num_samples, sense="<=",
                                    bound=float(epsilon), **block_options)


# --------------------------------------------------------------------------------------------------
# Metrics.  All take hard 0/1 predictions (or per-row losses) and dense group ids; empty groups give NaN
# and are ignored by the summaries.

def group_means(values: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Mean of ``values`` per group (NaN for a group with no row)."""
    values = values.double()
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, values)
    counts = torch.bincount(group_ids, minlength=num_groups).double()
    return sums / counts


def group_rates(predictions: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Positive rate of the 0/1 ``predictions`` per group (NaN for an empty group)."""
    return group_means(predictions, group_ids, num_groups)


def parity_gaps(predictions: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """rate_k - overall rate, per group (NaN for an empty group)."""
    return group_rates(predictions, group_ids, num_groups) - predictions.double().mean()


def dp_gap(predictions: Tensor, group_ids: Tensor, num_groups: int,
           constrained: Optional[Tensor] = None) -> float:
    """max_k |rate_k - overall| over non-empty (and, if given, constrained) groups."""
    return _max_abs(parity_gaps(predictions, group_ids, num_groups), constrained)


def eo_gap(predictions: Tensor, labels: Tensor, group_ids: Tensor, num_groups: int,
           constrained: Optional[Tensor] = None) -> float:
    """max_k |TPR_k - overall TPR| over groups with at least one positive row."""
    positive = labels > 0.5
    return dp_gap(predictions[positive], group_ids[positive], num_groups, constrained)


def excess_over(measure: Tensor, epsilon: float) -> Tensor:
    """measure_k - epsilon per group (NaN stays NaN): positive where the constraint is violated."""
    return measure - epsilon


def max_violation(excess: Tensor, constrained: Optional[Tensor] = None) -> float:
    """The largest positive excess over the bound, 0.0 when every constraint holds."""
    worst = _max(excess, constrained)
    return max(0.0, worst) if not math.isnan(worst) else 0.0


def groups_violated(excess: Tensor, constrained: Optional[Tensor] = None, tolerance: float = 0.0) -> int:
    """How many groups exceed their bound by more than ``tolerance``."""
    return int(_select(excess, constrained).gt(tolerance).sum())


def group_errors(predictions: Tensor, labels: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Error rate per group (NaN for an empty group)."""
    return group_means((predictions != labels).double(), group_ids, num_groups)


def worst_group_error(predictions: Tensor, labels: Tensor, group_ids: Tensor, num_groups: int,
                      constrained: Optional[Tensor] = None) -> float:
    return _max(group_errors(predictions, labels, group_ids, num_groups), constrained)


def smallest_group_size(group_ids: Tensor, num_groups: int, constrained: Optional[Tensor] = None) -> int:
    """Rows in the smallest non-empty (and, if given, constrained) group."""
    sizes = torch.bincount(group_ids, minlength=num_groups).double()
    sizes[sizes == 0] = math.nan
    return int(torch.nan_to_num(_select(sizes, constrained), nan=math.inf).min())


def constraint_excess(constraint: str, predictions: Tensor, labels: Tensor, losses: Optional[Tensor],
                      group_ids: Tensor, num_groups: int, epsilon: float) -> Tensor:
    """Per group, how far the hard measure of ``constraint`` exceeds epsilon (dp, eo or group-loss).

    ``losses`` (per row) are read by group-loss only.
    """
    if constraint == "dp":
        return excess_over(parity_gaps(predictions, group_ids, num_groups).abs(), epsilon)
    if constraint == "eo":
        positive = labels > 0.5
        return excess_over(parity_gaps(predictions[positive], group_ids[positive], num_groups).abs(), epsilon)
    if constraint == "group-loss":
        if losses is None:
            raise ValueError("the group-loss constraint needs the per-row losses")
        return excess_over(group_means(losses, group_ids, num_groups), epsilon)
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")


def fairness_metrics(logits: Tensor, labels: Tensor, group_ids: Tensor, num_groups: int, constraint: str,
                     epsilon: float, constrained: Optional[Tensor] = None) -> dict:
    """Accuracy, parity gaps and the violations of ``constraint`` for one model on one split."""
    logits, labels = logits.detach().float(), labels.float()
    predictions = (logits > 0).float()
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    excess = constraint_excess(constraint, predictions, labels, losses, group_ids, num_groups, epsilon)
    return {
        "accuracy": float((predictions == labels).float().mean()),
        "positive_rate": float(predictions.mean()),
        "dp_gap": dp_gap(predictions, group_ids, num_groups, constrained),
        "eo_gap": eo_gap(predictions, labels, group_ids, num_groups, constrained),
        "max_violation": max_violation(excess, constrained),
        "groups_violated": groups_violated(excess, constrained),
        "worst_group_error": worst_group_error(predictions, labels, group_ids, num_groups, constrained),
        "smallest_group_size": smallest_group_size(group_ids, num_groups, constrained),
    }


def _select(per_group: Tensor, constrained: Optional[Tensor]) -> Tensor:
    selected = per_group if constrained is None else per_group[constrained]
    return selected[~torch.isnan(selected)]


def _max(per_group: Tensor, constrained: Optional[Tensor]) -> float:
    selected = _select(per_group, constrained)
    return float(selected.max()) if selected.numel() else math.nan


def _max_abs(per_group: Tensor, constrained: Optional[Tensor]) -> float:
    return _max(per_group.abs(), constrained)
