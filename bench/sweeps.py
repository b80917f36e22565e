"""What is measured: the sweeps of the quick and the full run.

    params    step alone vs number of parameters (8 tensors), without and with constraint blocks
    threads   the 10M-parameter step (Adam and SGD) at 1 and 2 threads, and an indexed block of
              10^4 vs 10^8 constraints at 10M parameters (the native-step targets)
    indexed   step alone vs number of per-sample constraints N, at batch 512 and 4096
    flat      the same step at the smallest and the largest N timed in one interleaved run (the
              flatness target: cases timed minutes apart differ by the machine's drift, not by N)
    grouped   step alone vs number of groups K
    training  forward + backward + step of a ~50k-parameter MLP with N per-sample constraints, at
              batch 512 and, where the dual machinery dominates the step, batch 128
    blockcall one grouped block call (forward, and forward + backward) at K = 10^3 and 10^7 groups,
              batch 4096, timed in one interleaved run like ``flat``
    smallmodel training step of Linear(122, 1) on batch 100 with two grouped blocks (2 and 3 groups)
              against the same LagrangianAdam step without blocks and torch's Adam, interleaved, at
              1 thread and at all threads

Each case is a (sweep name, config, problem) triple; ``cases(quick)`` lists them in run order.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from .problems import BlockCallProblem, BlockConfig, FlatProblem, SmallModelProblem, StepProblem, TrainingProblem

SWEEPS = ("params", "threads", "indexed", "flat", "grouped", "training", "blockcall", "smallmodel")
# The blocks of the native-step targets: 10^6 per-sample constraints and 10^3 groups, batch 4096.
STANDARD_BLOCKS = (BlockConfig("indexed", 10**6, 4096), BlockConfig("grouped", 10**3, 4096))
# Parameters of the constraint sweeps: big enough to be a real model's step, small enough that the
# dual side's cost shows.
CONSTRAINT_SWEEP_PARAMS = 10**6


@dataclasses.dataclass(frozen=True)
class Case:
    sweep: str
    problem: Union[StepProblem, FlatProblem, TrainingProblem, BlockCallProblem, SmallModelProblem]
    threads: int

    @property
    def config(self) -> dict:
        problem = self.problem
        if isinstance(problem, FlatProblem):
            return {"num_params": problem.num_params, "batch": problem.batch,
                    "num_constraints": list(problem.num_constraints)}
        if isinstance(problem, BlockCallProblem):
            return {"batch": problem.batch, "num_groups": list(problem.num_groups)}
        if isinstance(problem, SmallModelProblem):
            return {"model": f"Linear({problem.features}, 1)", "num_params": problem.num_params,
                    "batch": problem.batch, "group_counts": list(problem.group_counts), "epsilon": problem.epsilon}
        if isinstance(problem, TrainingProblem):
            return {"num_samples": problem.num_samples, "batch": problem.batch, "num_params": problem.num_params,
                    "model": f"MLP {problem.features}-{'-'.join(map(str, problem.hidden))}-{problem.classes}"}
        return {"num_params": problem.num_params, "num_tensors": problem.num_tensors,
                "algorithm": problem.algorithm, "blocks": [dataclasses.asdict(b) for b in problem.blocks]}


def cases(quick: bool) -> list[Case]:
    threads = torch.get_num_threads()
    thread_counts = sorted({1, threads})
    found: list[Case] = []

    param_counts = [10**5, 10**6, 10**7] if quick else [10**5, 10**6, 10**7, 10**8]
    for num_params in param_counts:
        for blocks in ((), STANDARD_BLOCKS):
            found.append(Case("params", StepProblem(num_params, blocks), threads))

    if not quick:
        for algorithm in ("adam", "sgd"):
            for blocks in ((), STANDARD_BLOCKS):
                for count in thread_counts:
                    found.append(Case("threads", StepProblem(10**7, blocks, algorithm), count))
        for num_constraints in (10**4, 10**8):
            found.append(Case("threads", StepProblem(10**7, (BlockConfig("indexed", num_constraints, 4096),)),
                              threads))

    exponents = [3, 5, 7] if quick else [3, 4, 5, 6, 7, 8]
    for batch in (512, 4096):
        for exponent in exponents:
            block = BlockConfig("indexed", 10**exponent, batch)
            found.append(Case("indexed", StepProblem(CONSTRAINT_SWEEP_PARAMS, (block,)), threads))

    for batch in (512, 4096):
        extremes = (10**exponents[0], 10**exponents[-1])
        found.append(Case("flat", FlatProblem(CONSTRAINT_SWEEP_PARAMS, batch, extremes), threads))

    for exponent in ([1, 3, 5] if quick else [1, 2, 3, 4, 5]):
        block = BlockConfig("grouped", 10**exponent, 4096)
        found.append(Case("grouped", StepProblem(CONSTRAINT_SWEEP_PARAMS, (block,)), threads))

    for num_samples in ([10**7] if quick else [10**5, 10**6, 10**7]):
        found.append(Case("training", TrainingProblem(num_samples, batch=512), threads))
    # At batch 512 the MLP's forward and backward already cost a quarter of Cooper's whole step, which
    # caps any dual update's speedup; a smaller batch is the regime the dual update decides.
    found.append(Case("training", TrainingProblem(10**7, batch=128), threads))

    # The same cases in the quick and the full run: they are the targets' own cases, and cheap.
    found.append(Case("blockcall", BlockCallProblem(batch=4096, num_groups=(10**3, 10**7)), threads))
    # The small model's tensors are too small to gain from a second thread, but its ops may still wake
    # one, and on a loaded machine that wake-up can cost more than the whole step: one thread shows what
    # the step's own ops cost, all threads what a user gets by default.
    for count in thread_counts:
        found.append(Case("smallmodel", SmallModelProblem(), count))
    return found
