"""The position paper's examples (fused_lagrangian_apps.paper_examples) against their closed forms and published outcomes.

Concave example: the Lagrangian run reaches x* = arcsin ε and λ* = ε/√(1−ε²); every fixed penalty ends at
an end of [0, π/2].  Rate example: the Lagrangian run predicts class 0 for 70% of the points (within one
point); no coefficient of the 20-value penalty grid comes within one point of 70%.
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_lagrangian_apps import paper_examples as examples


@pytest.mark.parametrize("epsilon", examples.CONCAVE_EPSILONS)
def test_concave_lagrangian_reaches_the_constrained_optimum(training_backend, epsilon):
    result = examples.concave_example(epsilon, backend=training_backend)
    assert result["x"] == pytest.approx(math.asin(epsilon), abs=1e-3)
    assert result["multiplier"] == pytest.approx(epsilon / math.sqrt(1 - epsilon**2), abs=1e-3)
    assert result["y"] == pytest.approx(0.0, abs=1e-3)
    assert result["h"] == pytest.approx(epsilon, abs=1e-3)


@pytest.mark.parametrize("penalty", examples.CONCAVE_PENALTIES)
def test_concave_fixed_penalty_ends_at_an_end_of_the_interval(training_backend, penalty):
    result = examples.concave_example(0.5, method="penalty", penalty=penalty, backend=training_backend)
    assert min(abs(result["x"]), abs(result["x"] - math.pi / 2)) < 1e-6
    assert result["multiplier"] == 0.0  # a penalty never moves its multiplier


def test_rate_lagrangian_lands_at_70_percent(training_backend):
    result = examples.rate_example(dual_lr=1e-2, backend=training_backend)
    assert result["predicted_0"] == pytest.approx(examples.RATE_TARGET, abs=0.01)
    assert result["accuracy"] == pytest.approx(0.8, abs=0.02)
    assert result["multiplier"] == pytest.approx(2.0, abs=0.1)


def test_rate_lagrangian_with_the_smallest_dual_lr_of_the_paper():
    result = examples.rate_example(dual_lr=2e-3, backend="reference")
    assert result["predicted_0"] == pytest.approx(examples.RATE_TARGET, abs=0.01)
    assert result["multiplier"] == pytest.approx(2.0, abs=0.1)


def test_rate_no_penalty_in_the_grid_lands_at_70_percent(training_backend):
    results = examples.penalty_grid(backend=training_backend)
    assert [r["multiplier"] for r in results] == pytest.approx(examples.RATE_PENALTIES)
    assert len(results) == 20
    for result in results:
        assert abs(result["predicted_0"] - examples.RATE_TARGET) > 0.01, result
    # the grid brackets the target: weak penalties under-shoot it, strong ones over-shoot it
    assert results[0]["predicted_0"] < examples.RATE_TARGET < results[-1]["predicted_0"]


@pytest.mark.parametrize("penalty", [0.0, 0.1, 4.6])
def test_penalty_grid_rows_are_independent_fixed_penalty_runs(penalty):
    """The side-by-side sweep computes what one run with formulation="penalty" computes."""
    steps = 300
    alone = examples.rate_example(method="penalty", penalty=penalty, steps=steps, backend="reference")
    grid = examples.penalty_grid([1.0, penalty, 50.0], steps=steps, backend="reference")
    torch.testing.assert_close(torch.tensor(grid[1]["weight"]), torch.tensor(alone["weight"]), rtol=0, atol=1e-5)
    assert grid[1]["bias"] == pytest.approx(alone["bias"], abs=1e-5)
    assert grid[0]["weight"] != alone["weight"]


def test_examples_table_prints_every_run(capsys):
    # Short rate runs and small grids: this checks the table, not the outcomes (the tests above do).
    examples.print_examples_table(backend="reference", concave_penalties=(0.1, 10.0), rate_penalties=(0.0, 1.0),
                                  rate_steps=50)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("lagrangian") for line in lines) == 2
    assert sum(line.startswith("penalty") for line in lines) == 4
