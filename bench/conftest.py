"""pytest-benchmark suite: ``pytest bench/ --benchmark-only``.

Each test times one candidate on one problem; tests of the same problem share a benchmark group, so
pytest-benchmark's table compares them side by side.  pytest-benchmark times the candidates one after
another; the interleaved, machine-stamped numbers with targets come from ``fused-lagrangian bench``
(whose harness these tests share: the same problems and the same candidates).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench import fused_backends
from bench.problems import StepData, StepProblem, TrainingData, TrainingProblem
from bench.step_candidates import step_candidates
from bench.training_candidates import training_candidates

CPU = torch.device("cpu")
CANDIDATES = [f"fused:{name}" for name in fused_backends(CPU)] + ["cooper", "unfused", "torch_fused", "ceiling"]


@functools.lru_cache(maxsize=1)
def step_data(problem: StepProblem) -> StepData:
    return StepData(problem, CPU)


@functools.lru_cache(maxsize=1)
def training_data(problem: TrainingProblem) -> TrainingData:
    return TrainingData(problem, CPU)


def build(candidate: str, problem) -> object:
    """A fresh candidate on ``problem``'s shared data; skips when it does not apply or cannot run here."""
    if isinstance(problem, TrainingProblem):
        factories = training_candidates(training_data(problem), fused_backends(CPU))
    else:
        factories = step_candidates(step_data(problem), fused_backends(CPU))
    if candidate not in factories:
        pytest.skip(f"{candidate} does not apply to this problem")
    try:
        return factories[candidate]()
    except RuntimeError as error:
        pytest.skip(str(error))


def run(benchmark, candidate, group: str, rounds: int) -> None:
    benchmark.group = group
    benchmark.pedantic(candidate.step, rounds=rounds, iterations=1, warmup_rounds=2)
