"""The post-processing baseline against brute force over every per-group threshold, and against the library's
own fairness metrics for what its thresholds do."""

import importlib.util
import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch

from fused_lagrangian import fairness
from fused_lagrangian_apps.group_thresholds import fit_group_thresholds


def random_problem(seed, sizes=(4, 5, 6, 3), constraint="dp"):
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    logits = torch.randn(len(group_ids), generator=generator, dtype=torch.float64)  # no ties
    labels = (torch.rand(len(group_ids), generator=generator) < torch.sigmoid(logits + 0.3)).float()
    if constraint == "eo":  # every group needs label-1 rows for a true positive rate
        labels[torch.cat([torch.tensor([0]), torch.tensor(sizes).cumsum(0)[:-1]])] = 1.0
    return logits, labels, group_ids


def predictions_of(logits, group_ids, choice):
    """Top choice[k] rows of each group by logit predicted positive."""
    predictions = torch.zeros_like(logits)
    for k, count in enumerate(choice):
        rows = torch.nonzero(group_ids == k).squeeze(1)
        predictions[rows[torch.argsort(logits[rows], descending=True)[:count]]] = 1.0
    return predictions


def rates(constraint, predictions, labels, group_ids, num_groups):
    """Per group rate and the overall one, computed directly (dp: over rows; eo: over label-1 rows)."""
    keep = torch.ones_like(labels, dtype=torch.bool) if constraint == "dp" else labels > 0.5
    per_group = torch.stack([predictions[keep & (group_ids == k)].mean() for k in range(num_groups)])
    return per_group, predictions[keep].mean()


@pytest.mark.parametrize("constraint", ["dp", "eo"])
@pytest.mark.parametrize("seed", range(4))
def test_each_target_rate_gets_the_most_accurate_choice_in_its_band(constraint, seed):
    """With the overall target r fixed the groups are independent: the fit's accuracy at r is the best of all
    (n_k + 1) products whose constrained groups' rates lie in [r - bound_k, r + bound_k]."""
    logits, labels, group_ids = random_problem(seed, constraint=constraint)
    sizes = torch.bincount(group_ids).tolist()
    constrained = torch.tensor([True, True, True, False])
    bounds = torch.tensor([0.1, 0.2, 0.15, 0.1])
    for target in (0.2, 0.45, 0.7):
        fit = fit_group_thresholds(logits, labels, group_ids, 4, bounds, constrained, constraint,
                                   tolerance=float("inf"), targets=[target])
        best = -1.0
        for choice in itertools.product(*(range(n + 1) for n in sizes)):
            predictions = predictions_of(logits, group_ids, choice)
            per_group, _ = rates(constraint, predictions, labels, group_ids, 4)
            in_band = all(abs(float(per_group[k]) - target) <= float(bounds[k]) + 1e-12 for k in range(3))
            if in_band and choice[3] == int((logits[group_ids == 3] > 0).sum()):  # the unconstrained group keeps 0
                best = max(best, float((predictions == labels).double().mean()))
        if best >= 0:
            assert fit.train_accuracy == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("constraint", ["dp", "eo"])
@pytest.mark.parametrize("seed", range(3))
def test_reported_accuracy_and_violation_are_those_of_its_thresholds(constraint, seed):
    logits, labels, group_ids = random_problem(seed, sizes=(40, 25, 60, 8, 30), constraint=constraint)
    constrained = torch.tensor([True, True, True, False, True])
    bounds = 0.05
    fit = fit_group_thresholds(logits, labels, group_ids, 5, bounds, constrained, constraint, tolerance=0.01)
    shifted = fit.shift(logits, group_ids)
    predictions = (shifted > 0).float()
    excess = fairness.constraint_excess(constraint, predictions, labels, None, group_ids, 5, bounds)
    assert fit.train_max_violation == pytest.approx(fairness.max_violation(excess, constrained), abs=1e-9)
    assert fit.train_accuracy == pytest.approx(float((predictions == labels).double().mean()), abs=1e-12)
    assert fit.train_max_violation <= 0.01  # a feasible choice exists here (e.g. every group at one rate)


def test_loose_bounds_give_every_group_its_most_accurate_threshold():
    logits, labels, group_ids = random_problem(7, sizes=(9, 12, 6))
    fit = fit_group_thresholds(logits, labels, group_ids, 3, 1.0, torch.ones(3, dtype=torch.bool))
    best = 0
    for k in range(3):
        rows = group_ids == k
        best += max(int((((logits[rows] > t).float()) == labels[rows]).sum())
                    for t in [float("inf"), -float("inf"), *logits[rows].tolist()])  # none, all, above each row
    assert fit.train_accuracy == pytest.approx(best / len(labels), abs=1e-12)
    assert fit.train_max_violation == 0.0


def test_a_zero_bound_puts_every_group_at_the_same_count():
    """A bound of 0 on three groups of 10 rows: the only feasible choices give every group the same count of
    positives; the fit is the most accurate of those 11."""
    logits, labels, group_ids = random_problem(3, sizes=(10, 10, 10))
    fit = fit_group_thresholds(logits, labels, group_ids, 3, 0.0, torch.ones(3, dtype=torch.bool))
    predictions = (fit.shift(logits, group_ids) > 0).float()
    counts = torch.stack([predictions[group_ids == k].sum() for k in range(3)])
    assert fit.train_max_violation == 0.0 and bool((counts == counts[0]).all())
    best = max(float((predictions_of(logits, group_ids, (c, c, c)) == labels).double().mean()) for c in range(11))
    assert fit.train_accuracy == pytest.approx(best, abs=1e-12)


def test_rejects_what_thresholds_cannot_hold():
    logits, labels, group_ids = random_problem(0)
    keep = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="rate constraints"):
        fit_group_thresholds(logits, labels, group_ids, 4, 0.1, keep, "group-loss")
    with pytest.raises(ValueError, match="one group per row"):
        fit_group_thresholds(logits, labels, torch.stack([group_ids, group_ids], 1), 4, 0.1, keep)
    with pytest.raises(ValueError, match="no label-1 row"):
        fit_group_thresholds(logits, torch.zeros_like(labels), group_ids, 4, 0.1, keep, "eo")


README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "threshold_ceiling.py"


def test_readme_ceiling_output_matches_a_fresh_run(capsys):
    """The README quotes examples/threshold_ceiling.py's output for both group sets; rerun each command
    (full length, about 15 s each) and find every printed line in the README."""
    spec = importlib.util.spec_from_file_location("threshold_ceiling", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = README.read_text()
    commands = re.findall(r"^\$ python examples/threshold_ceiling\.py(.*)$", text, re.MULTILINE)
    assert len(commands) == 2, "README should quote the ceiling for the default and the 687-group mode"
    for options in commands:
        assert example.main(shlex.split(options)) == 0
        for line in capsys.readouterr().out.splitlines():
            assert line in text.splitlines(), f"README is stale for threshold_ceiling.py{options}: {line!r}"
