"""A whole training step (forward, backward, step) of a ~50k-parameter MLP with N per-sample constraints."""

import pytest

from conftest import CANDIDATES, build, run
from bench.problems import TrainingProblem

PROBLEMS = {f"MLP, N=1e{e}, B=512": TrainingProblem(10**e, batch=512) for e in (5, 7)}


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_training_step(benchmark, problem, candidate):
    run(benchmark, build(candidate, PROBLEMS[problem]), group=f"training: {problem}", rounds=20)
