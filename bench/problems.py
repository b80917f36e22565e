"""The problems every candidate solves: the same tensors, the same batches, the same hyperparameters.

A step problem is the optimizer step alone: fixed gradients for ``num_params`` parameters split over
``num_tensors`` tensors, and for each constraint block a cycle of batches of (constraint id, violation).
A training problem is a whole training step of a small MLP with one constraint per training sample.
Both are built from a seed, so every candidate starts from bitwise identical inputs.
"""

from __future__ import annotations

import dataclasses
import torch
from torch import Tensor

LR = 1e-3
DUAL_LR = 1e-2
MOMENTUM = 0.9
# Distinct batches cycled through.  A training run touches a per-sample multiplier about once an epoch,
# so its line is cold; a short cycle would keep the few multipliers it touches in cache and hide what
# N costs.  64 batches of 4096 samples touch 16 MB of lines per cycle, more than this CPU's L2.
NUM_BATCHES = 64


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    kind: str  # "indexed" (one constraint per sample id) or "grouped" (per-group mean)
    num_constraints: int
    batch: int

    def label(self) -> str:
        return f"{self.kind} K={self.num_constraints:.0e} B={self.batch}"


@dataclasses.dataclass(frozen=True)
class StepProblem:
    num_params: int
    blocks: tuple[BlockConfig, ...] = ()
    algorithm: str = "adam"  # "adam" or "sgd" (with momentum)
    num_tensors: int = 8
    seed: int = 0

    @property
    def bytes_per_param(self) -> int:
        # fp32 Adam reads p, g, m, v and writes p, m, v; SGD with momentum reads p, g, b and writes p, b.
        return 28 if self.algorithm == "adam" else 20

    @property
    def primal_bytes(self) -> int:
        return self.bytes_per_param * self.num_params

    @property
    def dual_bytes(self) -> int:
        # Per sample: its int64 id and fp32 violation read, one fp32 multiplier read and written.
        return sum(16 * block.batch for block in self.blocks)


@dataclasses.dataclass(frozen=True)
class FlatProblem:
    """One indexed block of ``batch`` samples at each of several N, on the same parameters."""

    num_params: int
    batch: int
    num_constraints: tuple[int, ...]

    def step_problem(self, num_constraints: int) -> StepProblem:
        return StepProblem(self.num_params, (BlockConfig("indexed", num_constraints, self.batch),))


class StepData:
    """Initial parameters, fixed gradients and the batches of constraint data of a ``StepProblem``."""

    def __init__(self, problem: StepProblem, device: torch.device) -> None:
        self.problem = problem
        self.device = device
        generator = torch.Generator().manual_seed(problem.seed)
        sizes = _split(problem.num_params, problem.num_tensors)
        self.initial_params = [torch.randn(n, generator=generator).to(device) for n in sizes]
        # Shared by every candidate: optimizers only read gradients.
        self.grads = [torch.randn(n, generator=generator).to(device) for n in sizes]
        self.batches = [[_constraint_batch(block, generator, device) for block in problem.blocks]
                        for _ in range(NUM_BATCHES)]

    def new_params(self) -> list[Tensor]:
        """A fresh copy of the initial parameters, each with the shared gradient attached."""
        params = []
        for initial, grad in zip(self.initial_params, self.grads):
            param = initial.clone().requires_grad_()
            param.grad = grad
            params.append(param)
        return params

    def batch(self, step: int) -> list[tuple[Tensor, Tensor]]:
        return self.batches[step % NUM_BATCHES]


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _constraint_batch(block: BlockConfig, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, block.num_constraints, (block.batch,), generator=generator)
    # Centred violations: some constraints are violated, some satisfied, so the projection matters.
    violations = torch.randn(block.batch, generator=generator)
    return ids.to(device), violations.to(device)


@dataclasses.dataclass(frozen=True)
class TrainingProblem:
    """Feasible learning on a synthetic classification task: every sample's loss <= epsilon."""

    num_samples: int  # N, one constraint per sample
    batch: int
    features: int = 32
    hidden: tuple[int, ...] = (256, 128, 64)
    classes: int = 2
    epsilon: float = 0.5
    seed: int = 0

    @property
    def num_params(self) -> int:
        widths = (self.features, *self.hidden, self.classes)
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


class TrainingData:
    """The model's initial weights and a cycle of (inputs, labels, sample ids) batches."""

    def __init__(self, problem: TrainingProblem, device: torch.device) -> None:
        self.problem = problem
        self.device = device
        torch.manual_seed(problem.seed)
        self.initial_model = make_mlp(problem).to(device)
        generator = torch.Generator().manual_seed(problem.seed + 1)
        self.batches = []
        for _ in range(NUM_BATCHES):
            inputs = torch.randn(problem.batch, problem.features, generator=generator)
            labels = torch.randint(0, problem.classes, (problem.batch,), generator=generator)
            # Sampling without replacement within a batch, as a shuffled data loader would.
            ids = _distinct_ids(problem.num_samples, problem.batch, generator)
            self.batches.append((inputs.to(device), labels.to(device), ids.to(device)))

    def new_model(self) -> torch.nn.Module:
        model = make_mlp(self.problem).to(self.device)
        model.load_state_dict(self.initial_model.state_dict())
        return model

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.batches[step % NUM_BATCHES]


def make_mlp(problem: TrainingProblem) -> torch.nn.Module:
    widths = (problem.features, *problem.hidden)
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(widths[-1], problem.classes))
    return torch.nn.Sequential(*layers)


def _distinct_ids(population: int, count: int, generator: torch.Generator) -> Tensor:
    if count > population:
        raise ValueError(f"batch {count} is larger than the number of samples {population}")
    ids = torch.randint(0, population, (count,), generator=generator).unique()
    while ids.numel() < count:
        extra = torch.randint(0, population, (count - ids.numel(),), generator=generator)
        ids = torch.cat([ids, extra]).unique()
    return ids[torch.randperm(count, generator=generator)]


# Parity-like grouped blocks: each group's rate at most EPSILON above the overall rate.
PARITY_EPSILON = 0.02
# The block-call problem's bound is the values' median, so some groups are violated and some satisfied,
# and its multipliers start at 0.5: with zeros the loss term and its gradient would be zero, and the
# check that every candidate computes the same call would compare nothing.
BLOCK_CALL_BOUND = 0.5
BLOCK_CALL_MULTIPLIER = 0.5


@dataclasses.dataclass(frozen=True)
class BlockCallProblem:
    """A grouped block's call (its forward, and forward + backward) at each of several group counts K."""

    batch: int
    num_groups: tuple[int, ...]
    seed: int = 0


class BlockCallData:
    """For one K: a cycle of (values, group ids, hard 0/1 dual values) batches, as a parity constraint gets.

    ``values`` are sigmoid-like probabilities in (0, 1), ``hard`` the predictions they round to; group ids
    are uniform over the K groups, so at K = 10^7 nearly every sample of a batch is in a group of its own.
    """

    def __init__(self, problem: BlockCallProblem, num_groups: int, device: torch.device) -> None:
        self.problem = problem
        self.num_groups = num_groups
        self.device = device
        generator = torch.Generator().manual_seed(problem.seed)
        self.batches = []
        for _ in range(NUM_BATCHES):
            values = torch.rand(problem.batch, generator=generator)
            ids = torch.randint(0, num_groups, (problem.batch,), generator=generator)
            hard = (values > 0.5).float()
            self.batches.append((values.to(device), ids.to(device), hard.to(device)))

    def new_batches(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The batches with each candidate's own copy of the values, leaves that require grad (their
        gradients accumulate per candidate, so candidates cannot share them)."""
        return [(values.clone().requires_grad_(), ids, hard) for values, ids, hard in self.batches]


@dataclasses.dataclass(frozen=True)
class SmallModelProblem:
    """Logistic regression, Linear(features, 1) with BCE, and one parity-like grouped block per entry of
    ``group_counts``: the regime where the Python side of a step, not its arithmetic, sets the cost."""

    features: int = 122  # the one-hot Adult census features
    batch: int = 100
    group_counts: tuple[int, ...] = (2, 3)
    epsilon: float = PARITY_EPSILON
    seed: int = 0

    @property
    def num_params(self) -> int:
        return self.features + 1


class SmallModelData:
    """The model's initial weights and a cycle of (inputs, 0/1 labels, group ids per block) batches."""

    def __init__(self, problem: SmallModelProblem, device: torch.device) -> None:
        self.problem = problem
        self.device = device
        torch.manual_seed(problem.seed)
        self.initial_model = torch.nn.Linear(problem.features, 1).to(device)
        generator = torch.Generator().manual_seed(problem.seed + 1)
        self.batches = []
        for _ in range(NUM_BATCHES):
            inputs = torch.randn(problem.batch, problem.features, generator=generator)
            labels = torch.randint(0, 2, (problem.batch,), generator=generator).float()
            group_ids = [torch.randint(0, count, (problem.batch,), generator=generator).to(device)
                         for count in problem.group_counts]
            self.batches.append((inputs.to(device), labels.to(device), group_ids))

    def new_model(self) -> torch.nn.Module:
        model = torch.nn.Linear(self.problem.features, 1).to(self.device)
        model.load_state_dict(self.initial_model.state_dict())
        return model

    def batch(self, step: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        return self.batches[step % NUM_BATCHES]


# Projected ascent on this batch's estimate: the dual update that the hand-written and Cooper baselines
# compute, so that every candidate times the same work (grouped blocks default to a running estimate
# with nuPI, which those baselines do not implement).
PLAIN_ASCENT = {"dual_rule": "ascent", "estimator": "batch"}
