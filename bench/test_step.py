"""The optimizer step alone (gradients given), each candidate on identical tensors."""

import pytest

from conftest import CANDIDATES, build, run
from bench.problems import BlockConfig, StepProblem
from bench.sweeps import STANDARD_BLOCKS

PROBLEMS = {
    "10M params, no blocks": StepProblem(10**7),
    "10M params, indexed 1e6 + grouped 1e3, B=4096": StepProblem(10**7, STANDARD_BLOCKS),
    "10M params SGD, indexed 1e6 + grouped 1e3, B=4096": StepProblem(10**7, STANDARD_BLOCKS, "sgd"),
    "1M params, indexed 1e3, B=4096": StepProblem(10**6, (BlockConfig("indexed", 10**3, 4096),)),
    "1M params, indexed 1e8, B=4096": StepProblem(10**6, (BlockConfig("indexed", 10**8, 4096),)),
    "1M params, grouped 1e4, B=4096": StepProblem(10**6, (BlockConfig("grouped", 10**4, 4096),)),
}


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_step(benchmark, problem, candidate):
    run(benchmark, build(candidate, PROBLEMS[problem]), group=f"step: {problem}", rounds=15)
