"""Fairness helpers against closed forms: metrics on hand-made batches, the parity blocks' gradient and
dual step computed by hand."""

import math

import pytest
import torch

from fused_lagrangian import LagrangianAdam, LagrangianSGD
from fused_lagrangian import fairness as fx

# Six rows in three groups; group 2 has no row in this batch.
PREDICTIONS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
LABELS = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 3])
NUM_GROUPS = 4  # group 2 is empty


def test_group_rates_and_gaps_by_hand():
    overall = 3 / 6
    rates = fx.group_rates(PREDICTIONS, GROUPS, NUM_GROUPS)
    assert rates[:2].tolist() == pytest.approx([2 / 3, 1 / 2])
    assert rates[3].item() == 0.0 and math.isnan(rates[2].item())
    gaps = fx.parity_gaps(PREDICTIONS, GROUPS, NUM_GROUPS)
    assert gaps[[0, 1, 3]].tolist() == pytest.approx([2 / 3 - overall, 0.0, -overall])
    assert fx.dp_gap(PREDICTIONS, GROUPS, NUM_GROUPS) == pytest.approx(0.5)
    # Leaving group 3 out of the constrained set leaves group 0 as the worst.
    constrained = torch.tensor([True, True, True, False])
    assert fx.dp_gap(PREDICTIONS, GROUPS, NUM_GROUPS, constrained) == pytest.approx(1 / 6)


def test_equal_opportunity_gap_uses_positive_rows_only():
    # Positives: rows 0,1 (group 0, predictions 1,0), rows 3,4 (group 1, predictions 1,0): TPR 1/2 everywhere.
    assert fx.eo_gap(PREDICTIONS, LABELS, GROUPS, NUM_GROUPS) == pytest.approx(0.0)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # group 0 TPR 1, group 1 TPR 1/2, overall 2/3
    assert fx.eo_gap(PREDICTIONS, labels, GROUPS, NUM_GROUPS) == pytest.approx(1 / 3)


def test_violations_errors_and_sizes_by_hand():
    excess = fx.constraint_excess("dp", PREDICTIONS, LABELS, torch.zeros(6), GROUPS, NUM_GROUPS, 0.1)
    assert excess[[0, 1, 3]].tolist() == pytest.approx([1 / 6 - 0.1, -0.1, 0.5 - 0.1])
    assert fx.max_violation(excess) == pytest.approx(0.4)
    assert fx.groups_violated(excess) == 2
    assert fx.groups_violated(excess, tolerance=0.1) == 1
    assert fx.max_violation(excess - 1.0) == 0.0
    errors = fx.group_errors(PREDICTIONS, LABELS, GROUPS, NUM_GROUPS)
    assert errors[[0, 1, 3]].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert fx.worst_group_error(PREDICTIONS, LABELS, GROUPS, NUM_GROUPS) == pytest.approx(2 / 3)
    assert fx.smallest_group_size(GROUPS, NUM_GROUPS) == 1
    assert fx.smallest_group_size(GROUPS, NUM_GROUPS, torch.tensor([True, True, False, False])) == 2


def test_group_loss_excess_is_mean_loss_minus_bound():
    losses = torch.tensor([0.1, 0.2, 0.3, 1.0, 2.0, 0.5])
    excess = fx.constraint_excess("group-loss", PREDICTIONS, LABELS, losses, GROUPS, NUM_GROUPS, 0.5)
    assert excess[[0, 1, 3]].tolist() == pytest.approx([0.2 - 0.5, 1.5 - 0.5, 0.0])


def test_fairness_metrics_thresholds_logits_at_zero():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.1, -2.0])  # the signs of PREDICTIONS
    metrics = fx.fairness_metrics(logits, LABELS, GROUPS, NUM_GROUPS, "dp", 0.1)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["positive_rate"] == pytest.approx(0.5)
    assert metrics["dp_gap"] == pytest.approx(0.5)
    assert metrics["max_violation"] == pytest.approx(0.4)
    assert metrics["groups_violated"] == 2
    assert metrics["smallest_group_size"] == 1


# These tests check one dual step against the batch's hard rates by hand: plain ascent on this step's
# group means (the grouped blocks' defaults add a running estimate and nuPI's proportional term).
BATCH_ASCENT = dict(estimator="batch", dual_rule="ascent")


def _parity_setup(helper, **options):
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = LagrangianSGD([weight], lr=0.0)
    parity = helper(opt, NUM_GROUPS, 0.1, dual_lr=0.5, **{**BATCH_ASCENT, **options})
    return opt, parity


def test_demographic_parity_gradient_matches_hand_computation():
    _, parity = _parity_setup(fx.demographic_parity)
    upper = torch.tensor([0.3, 0.0, 0.7, 0.2])
    lower = torch.tensor([0.1, 0.4, 0.0, 0.0])
    parity.upper.multipliers.copy_(upper)
    parity.lower.multipliers.copy_(lower)
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.2], requires_grad=True)
    parity(logits, GROUPS).backward()
    # term = sum_k (upper_k - lower_k) * (mean_k(s) - mean(s)) + const over the groups present (0, 1, 3);
    # d/ds_i = net[g_i] / n[g_i] - sum_present(net) / N, times sigmoid'(z_i).
    net = (upper - lower).tolist()
    sizes = {0: 3, 1: 2, 3: 1}
    present = net[0] + net[1] + net[3]
    s = torch.sigmoid(logits.detach())
    expected = [(net[k] / sizes[k] - present / 6) * float(s[i] * (1 - s[i])) for i, k in enumerate(GROUPS.tolist())]
    assert logits.grad.tolist() == pytest.approx(expected, abs=1e-7)


def test_demographic_parity_dual_step_uses_hard_rates():
    opt, parity = _parity_setup(fx.demographic_parity)
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.1, -2.0])  # hard rates 2/3, 1/2, -, 0; overall 1/2
    parity(logits, GROUPS)
    opt.step()
    gaps = {0: 2 / 3 - 1 / 2, 1: 0.0, 3: -1 / 2}
    for k, gap in gaps.items():
        assert parity.upper.multipliers[k].item() == pytest.approx(max(0.0, 0.5 * (gap - 0.1)))
        assert parity.lower.multipliers[k].item() == pytest.approx(max(0.0, 0.5 * (-0.1 - gap)))
    assert parity.upper.multipliers[2].item() == 0.0 and parity.lower.multipliers[2].item() == 0.0


def test_unconstrained_groups_count_in_the_overall_rate_only():
    constrained = torch.tensor([True, True, True, False])
    opt, parity = _parity_setup(fx.demographic_parity, constrained=constrained)
    parity(torch.tensor([2.0, -1.0, 0.5, 3.0, -0.1, -2.0]), GROUPS)
    opt.step()
    # Overall stays 3/6 (group 3's row included); group 3 itself gets no multiplier.
    assert parity.upper.multipliers[0].item() == pytest.approx(0.5 * (2 / 3 - 1 / 2 - 0.1))
    assert parity.lower.multipliers[3].item() == 0.0


def test_equal_opportunity_dual_step_uses_true_positive_rates():
    opt, parity = _parity_setup(fx.equal_opportunity)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    # Positives: row 0 (group 0, TPR 1), rows 3,4 (group 1, TPR 1/2), row 5 (group 3, TPR 0); overall 2/4.
    parity(torch.tensor([2.0, -1.0, 0.5, 3.0, -0.1, -2.0]), GROUPS, labels)
    opt.step()
    assert parity.upper.multipliers[0].item() == pytest.approx(0.5 * (1.0 - 0.5 - 0.1))
    assert parity.lower.multipliers[3].item() == pytest.approx(0.5 * (-0.1 + 0.5))
    assert parity.upper.multipliers[1].item() == 0.0 and parity.lower.multipliers[1].item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        parity(torch.zeros(6), GROUPS)


def test_linear_penalty_cancels_on_two_sided_parity():
    """Why the demo's sweep uses the quadratic penalty: the linear one has no gradient here."""
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = LagrangianSGD([weight], lr=0.0)
    parity = fx.demographic_parity(opt, NUM_GROUPS, 0.1, formulation="penalty", penalty=10.0)
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.2], requires_grad=True)
    parity(logits, GROUPS).backward()
    assert logits.grad.abs().max().item() < 1e-6
    quadratic = fx.demographic_parity(opt, NUM_GROUPS, 0.1, name="quadratic", formulation="quadratic", penalty=10.0)
    logits.grad = None
    quadratic(logits, GROUPS).backward()
    assert logits.grad.abs().max().item() > 1e-3


def test_bounded_group_loss_and_per_sample_bound_steps():
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = LagrangianAdam([weight], lr=0.0)
    group_bound = fx.bounded_group_loss(opt, NUM_GROUPS, 0.5, dual_lr=1.0, **BATCH_ASCENT)
    row_bound = fx.per_sample_loss_bound(opt, 10, 0.5, dual_lr=1.0)
    losses = torch.tensor([0.1, 0.2, 0.3, 1.0, 2.0, 0.5])
    group_bound(losses, ids=GROUPS)
    rows = torch.tensor([7, 0, 3, 9, 2, 5])
    row_bound(losses, ids=rows)
    opt.step()
    assert group_bound.multipliers.tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    expected = torch.zeros(10)
    expected[rows] = (losses - 0.5).clamp(min=0)
    assert row_bound.multipliers.tolist() == pytest.approx(expected.tolist())
    assert (group_bound.spec.kind, row_bound.spec.kind) == ("grouped", "indexed")


# --------------------------------------------------------------------------------------------------
# Constraints that generalise (two-dataset scheme), overlapping groups, confidence intervals.

def test_split_for_constraints_is_stratified_and_keeps_small_groups_whole():
    ids = torch.tensor([0] * 10 + [1] * 3 + [2] * 40)
    primal, held_out = fx.split_for_constraints(ids, 0.3, min_group_rows=5, seed=1)
    sizes = lambda rows: torch.bincount(ids[rows], minlength=3).tolist()  # noqa: E731
    assert sizes(held_out) == [3, 3, 12] and sizes(primal) == [7, 3, 28]
    # Split groups are split (disjoint halves covering the group); the 3-row group is on both sides.
    both = set(primal.tolist()) & set(held_out.tolist())
    assert both == {10, 11, 12}
    assert set(primal.tolist()) | set(held_out.tolist()) == set(range(len(ids)))
    again = fx.split_for_constraints(ids, 0.3, min_group_rows=5, seed=1)
    assert torch.equal(again[1], held_out)  # deterministic given the seed
    with pytest.raises(ValueError):
        fx.split_for_constraints(ids, 1.0)


def test_held_out_rows_move_the_multipliers_and_the_primal_rows_the_gradient():
    opt, parity = _parity_setup(fx.demographic_parity)
    primal_logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.2], requires_grad=True)
    # Held-out rows: group 0 all positive, group 1 all negative (overall 1/2): gaps +1/2, -1/2.
    held_logits = torch.tensor([3.0, 3.0, -3.0, -3.0])
    held_groups = torch.tensor([0, 0, 1, 1])
    term = parity(primal_logits, GROUPS, held_out_logits=held_logits, held_out_group_ids=held_groups)
    term.backward()
    assert primal_logits.grad is not None  # the term is built from the primal rows
    opt.step()
    assert parity.upper.multipliers.tolist() == pytest.approx([0.5 * (0.5 - 0.1), 0.0, 0.0, 0.0])
    assert parity.lower.multipliers.tolist() == pytest.approx([0.0, 0.5 * (0.5 - 0.1), 0.0, 0.0])
    # Group 3 has primal rows only: its multipliers do not move.
    parity(primal_logits.detach(), GROUPS)
    with pytest.raises(ValueError, match="only call"):
        parity(primal_logits.detach(), GROUPS, held_out_logits=held_logits, held_out_group_ids=held_groups)


def test_per_group_epsilon():
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = LagrangianSGD([weight], lr=0.0)
    parity = fx.demographic_parity(opt, NUM_GROUPS, torch.tensor([0.1, 0.1, 0.1, 0.6]), dual_lr=0.5, **BATCH_ASCENT)
    parity(torch.tensor([2.0, -1.0, 0.5, 3.0, -0.1, -2.0]), GROUPS)  # group 3: gap -1/2, within 0.6
    opt.step()
    assert parity.lower.multipliers[3].item() == 0.0
    assert parity.upper.multipliers[0].item() == pytest.approx(0.5 * (2 / 3 - 1 / 2 - 0.1))
    with pytest.raises(ValueError, match="per-group epsilon"):
        fx.demographic_parity(opt, NUM_GROUPS, torch.tensor([0.1, 0.1]), name="bad")


def test_overlapping_groups_metrics_and_parity_step():
    # Rows in an intersectional group (0..2) and a marginal group (3 or 4); row 5 has no marginal group.
    memberships = torch.tensor([[0, 3], [0, 3], [1, 3], [1, 4], [2, 4], [2, -1]])
    predictions = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # overall 1/2, over rows
    rates = fx.group_rates(predictions, memberships, 5)
    assert rates.tolist() == pytest.approx([1.0, 0.5, 0.0, 2 / 3, 0.5])
    assert fx.group_sizes(memberships, 5).tolist() == [2, 2, 2, 3, 2]
    assert fx.dp_gap(predictions, memberships, 5) == pytest.approx(0.5)
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = LagrangianSGD([weight], lr=0.0)
    parity = fx.demographic_parity(opt, 5, 0.1, dual_lr=1.0, constrained=torch.tensor([True, True, True, True, False]),
                                   **BATCH_ASCENT)
    parity((predictions * 2 - 1) * 3, memberships)
    opt.step()
    assert parity.upper.multipliers.tolist() == pytest.approx([0.4, 0.0, 0.0, 2 / 3 - 0.5 - 0.1, 0.0])
    assert parity.lower.multipliers.tolist() == pytest.approx([0.0, 0.0, 0.4, 0.0, 0.0])


def test_wilson_interval_closed_forms():
    low, high = fx.wilson_interval(torch.tensor([0.0, 5.0, 50.0]), torch.tensor([4, 10, 100]))
    # 0 of 4: [0, z^2 / (n + z^2)]; 5 of 10 and 50 of 100: symmetric around 1/2.
    z2 = 1.959964 ** 2
    assert low[0].item() == 0.0 and high[0].item() == pytest.approx(z2 / (4 + z2))
    assert low[1].item() == pytest.approx(0.2366, abs=1e-4) and high[1].item() == pytest.approx(0.7634, abs=1e-4)
    assert low[2].item() == pytest.approx(0.4038, abs=1e-4) and high[2].item() == pytest.approx(0.5962, abs=1e-4)
    excluded = fx.parity_excluded(torch.tensor([0.30, 0.20, math.nan]), torch.tensor([0.40, 0.40, math.nan]), 0.2, 0.05)
    assert excluded.tolist() == [True, False, False]
