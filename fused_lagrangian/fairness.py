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

Constraints that generalise (the two-dataset scheme of Cotter et al., "Training well-generalizing
classifiers for fairness metrics and other data-dependent constraints", ICML 2019): a model fitted to its
training rows satisfies the constraints on *those* rows more easily than on new data, so multipliers driven
by the training rows stop too early.  Hold out part of the training data for the constraints::

    primal_rows, constraint_rows = fairness.split_for_constraints(group_ids, fraction=0.3)
    parity = fairness.demographic_parity(opt, K, 0.05, dual_lr=...)
    logits = model(x).squeeze(1)
    loss = bce(logits[primal_rows], y[primal_rows]) + parity(
        logits[primal_rows], group_ids[primal_rows],
        held_out_logits=logits[constraint_rows], held_out_group_ids=group_ids[constraint_rows])

The primal term (the gradient) comes from the primal rows only; the multipliers move by the hard rates of
the held-out rows (recorded with ``block.observe``), which the model never fits.  The split is stratified,
so every group keeps the same fraction of its rows on each side.

Per-group bounds: ``epsilon`` may be a (K,) tensor, e.g. ``epsilon + size_slack(...)`` (a looser bound for
groups whose rates are too noisy to hold to the common one).
"""

from __future__ import annotations

import math
from typing import Optional, Union

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

    def __init__(self, optimizer: LagrangianOptimizer, num_groups: int, epsilon: Union[float, Tensor], *,
                 name: str, positives_only: bool, constrained: Optional[Tensor] = None, **block_options) -> None:
        if isinstance(epsilon, Tensor):
            if epsilon.shape != (num_groups,) or bool((epsilon < 0).any()):
                raise ValueError(f"{name}: a per-group epsilon must have shape ({num_groups},) and be >= 0")
            self.epsilon = epsilon.float()
        else:
            if epsilon < 0:
                raise ValueError(f"{name}: epsilon must be >= 0, got {epsilon}")
            self.epsilon = float(epsilon)
        self.positives_only = positives_only
        self.constrained = constrained
        self.optimizer = optimizer
        common = dict(kind="grouped", num_constraints=num_groups, **block_options)
        self.upper = optimizer.add_constraint(f"{name}_upper", sense="<=", bound=self.epsilon, **common)
        self.lower = optimizer.add_constraint(f"{name}_lower", sense=">=", bound=-self.epsilon, **common)

    @property
    def blocks(self) -> tuple[ConstraintBlock, ConstraintBlock]:
        return self.upper, self.lower

    def __call__(self, logits: Tensor, group_ids: Tensor, labels: Optional[Tensor] = None, *,
                 held_out_logits: Optional[Tensor] = None, held_out_group_ids: Optional[Tensor] = None,
                 held_out_labels: Optional[Tensor] = None) -> Tensor:
        """The loss term of both blocks for this batch: logits (B,), group ids (B,), or (B, M) memberships
        padded with -1 for overlapping groups (e.g. sex, race and their intersections; ``memberships``).

        With ``held_out_logits`` and ``held_out_group_ids`` (rows the loss does not fit: the two-dataset
        scheme, see the module docstring), the multipliers move by the held-out rows' hard rates and this
        batch only shapes the gradient.  That path records once per step: call it once between two
        ``step()`` calls (no gradient accumulation over several calls), with the default ordering.
        """
        soft, hard, group_ids = self._centred(logits, group_ids, labels)
        if held_out_logits is None:
            return (self.upper(soft, ids=group_ids, dual_values=hard)
                    + self.lower(soft, ids=group_ids, dual_values=hard))
        if held_out_group_ids is None:
            raise ValueError("held_out_logits need held_out_group_ids")
        for block in self.blocks:
            if block.has_pending or block.spec.ordering != "simultaneous":
                raise ValueError(f"{block.name}: the held-out (two-dataset) call needs the simultaneous ordering "
                                 "and must be the block's only call of the step")
        term = self.upper(soft, ids=group_ids) + self.lower(soft, ids=group_ids)
        # The call above recorded the primal rows' estimate: the held-out rows' replaces it.
        for block in self.blocks:
            block.discard_pending()
        _, held_out_hard, held_out_ids = self._centred(held_out_logits.detach(), held_out_group_ids, held_out_labels)
        for block in self.blocks:
            block.observe(held_out_hard, ids=held_out_ids)
        return term

    def _centred(self, logits: Tensor, group_ids: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Soft and hard predictions minus their overall means, and the ids, of the constrained rows."""
        if self.positives_only:
            if labels is None:
                raise ValueError("equal opportunity needs the labels (the rate is over rows with label 1)")
            positive = labels > 0.5
            logits, group_ids = logits[positive], group_ids[positive]
        soft, hard = soft_and_hard_predictions(logits)
        # The overall rate is the mean over samples, whatever their memberships.
        soft, hard = soft - soft.mean(), hard - hard.mean()
        if self.constrained is not None:
            if group_ids.dim() == 2:  # memberships (B, M) padded with -1: unconstrained ones become padding
                member = (group_ids >= 0) & self.constrained[group_ids.clamp(min=0)]
                return soft, hard, torch.where(member, group_ids, torch.full_like(group_ids, -1))
            rows = self.constrained[group_ids].nonzero().squeeze(1)  # one nonzero pass for all three tensors
            soft, hard, group_ids = (t.index_select(0, rows) for t in (soft, hard, group_ids))
        return soft, hard, group_ids


def demographic_parity(optimizer: LagrangianOptimizer, num_groups: int, epsilon: Union[float, Tensor], *,
                       name: str = "demographic_parity", constrained: Optional[Tensor] = None,
                       **block_options) -> RateParity:
    """Each group's positive rate within ±epsilon of the overall positive rate.

    ``constrained`` (bool, one per group) leaves the groups marked False out of the constraint; they
    still count in the overall rate.  ``epsilon``: a float, or a (K,) tensor of per-group bounds.
    ``block_options`` go to ``add_constraint`` (dual_lr, formulation, ...).
    Call the result as ``term = parity(logits, group_ids)``; with held-out rows for the multipliers (the
    two-dataset scheme) as ``parity(logits, group_ids, held_out_logits=..., held_out_group_ids=...)``.
    """
    return RateParity(optimizer, num_groups, epsilon, name=name, positives_only=False,
                      constrained=constrained, **block_options)


def equal_opportunity(optimizer: LagrangianOptimizer, num_groups: int, epsilon: Union[float, Tensor], *,
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


def split_for_constraints(group_ids: Tensor, fraction: float, *, min_group_rows: int = 0,
                          seed: int = 0) -> tuple[Tensor, Tensor]:
    """Row indices ``(primal_rows, constraint_rows)`` of the two-dataset scheme, stratified by group.

    In every group of at least ``min_group_rows`` rows, ``round(fraction * n_k)`` rows (chosen at random
    with ``seed``) go to the constraint split and the rest to the primal split.  A smaller group is not
    split: all its rows are in both, since a held-out part of a few rows has a rate too coarse to hold to
    any bound (3 rows: 0, 1/3, 2/3 or 1) and its multipliers would never settle.  Both index tensors are
    sorted.  ``group_ids``: (N,) ids >= 0.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    ids = group_ids.cpu().long()
    if ids.dim() == 2:  # memberships: stratify by each row's first group (e.g. its intersectional group)
        ids = ids[:, 0]
    if bool((ids < 0).any()):
        raise ValueError("split_for_constraints: every row needs a group id >= 0 (in the first column)")
    # Sort the rows by (group, random key): each group's rows become a random run; the first
    # round(fraction * n_k) of each run are held out.
    order = torch.argsort(ids.double() + torch.rand(ids.numel(), generator=generator, dtype=torch.float64) * 0.5)
    sizes = torch.bincount(ids)
    starts = torch.cumsum(sizes, 0) - sizes
    rank_in_group = torch.arange(ids.numel()) - starts[ids[order]]
    held_out = torch.zeros(ids.numel(), dtype=torch.bool)
    held_out[order] = rank_in_group < torch.round(fraction * sizes.double()).long()[ids[order]]
    unsplit = (sizes < min_group_rows)[ids]
    device = group_ids.device
    primal, constraint = ~held_out | unsplit, held_out | unsplit
    return primal.nonzero().squeeze(1).to(device), constraint.nonzero().squeeze(1).to(device)


def memberships(*group_ids: Tensor) -> Tensor:
    """(B, M) memberships of overlapping group families, e.g. ``memberships(intersection_ids, sex_ids +
    offset, race_ids + offset2)``: the ids of each family must not collide (offset them).  A -1 entry is
    padding (no group of that family)."""
    return torch.stack([ids.long() for ids in group_ids], dim=1)


def size_slack(epsilon: float, group_rows: Tensor, rate: float, z: float = 1.959964) -> Tensor:
    """Per-group bounds ``max(epsilon, z * sqrt(rate * (1 - rate) / n_k))``: no group is held tighter than
    what its n_k rows can measure (the half-width of a normal interval of a rate ``rate`` over n_k rows).
    Large groups keep ``epsilon``; a group of 10 rows at rate 0.25 gets 0.27 (z = 1.96)."""
    rows = group_rows.double().clamp(min=1)
    noise = z * math.sqrt(rate * (1.0 - rate)) / torch.sqrt(rows)
    return noise.clamp(min=epsilon).float()


# --------------------------------------------------------------------------------------------------
# Metrics.  All take hard 0/1 predictions (or per-row losses) and dense group ids, (B,) or (B, M)
# memberships padded with -1 (a row counts in each of its groups); empty groups give NaN and are ignored
# by the summaries.  Overall rates are means over rows.

def flatten_memberships(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """One (value, group) pair per membership: (B,) ids unchanged, (B, M) ids without their padding."""
    if group_ids.dim() == 1:
        return values, group_ids
    member = group_ids >= 0
    return values.unsqueeze(1).expand_as(group_ids)[member], group_ids[member]


def group_sizes(group_ids: Tensor, num_groups: int) -> Tensor:
    """Rows per group (a row with several memberships counts in each)."""
    member_ids = group_ids if group_ids.dim() == 1 else group_ids[group_ids >= 0]
    return torch.bincount(member_ids, minlength=num_groups)


def group_means(values: Tensor, group_ids: Tensor, num_groups: int) -> Tensor:
    """Mean of ``values`` per group (NaN for a group with no row)."""
    values, group_ids = flatten_memberships(values.double(), group_ids)
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
    sizes = group_sizes(group_ids, num_groups).double()
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


def wilson_interval(successes: Tensor, trials: Tensor, z: float = 1.959964) -> tuple[Tensor, Tensor]:
    """Wilson score interval (default 95%) of a proportion per entry; NaN where ``trials`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small n (a group of 4 rows
    with rate 0 gets [0, 0.49], not [0, 0]).
    """
    n = trials.double()
    p = successes.double() / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * torch.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamped: at p = 0 or 1 the bound is 0 or 1 exactly, up to float rounding.
    return (centre - half).clamp(0.0, 1.0), (centre + half).clamp(0.0, 1.0)


def rate_intervals(predictions: Tensor, group_ids: Tensor, num_groups: int,
                   z: float = 1.959964) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per group: positive rate, Wilson interval (low, high) and rows (NaN rate and bounds when empty)."""
    predictions, group_ids = flatten_memberships(predictions.double(), group_ids)
    positives = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, predictions)
    rows = torch.bincount(group_ids, minlength=num_groups)
    low, high = wilson_interval(positives, rows, z)
    return positives / rows, low, high, rows


def parity_excluded(low: Tensor, high: Tensor, overall: float, epsilon: Union[float, Tensor]) -> Tensor:
    """Groups whose rate interval lies entirely outside ``overall ± epsilon``: a violation that sampling
    noise of the split cannot explain (at the interval's level).  False for empty groups."""
    outside = (low > overall + epsilon) | (high < overall - epsilon)
    return outside & ~torch.isnan(low)


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
