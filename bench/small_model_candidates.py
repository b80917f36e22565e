"""Candidates for a whole training step of a small model: Linear(122, 1) with BCE on batches of 100.

The constrained step adds two parity-like grouped blocks (2 and 3 groups, ``to_overall``: each group's
rate of positive predictions at most epsilon above the batch's overall rate; the sigmoid drives the
primal term, the hard prediction the multipliers).  At this size the arithmetic is a few microseconds:
what a step costs is its count of small tensor ops and Python calls, so the blocks' cost is measured
against the same step without them, and against torch's Adam for reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_lagrangian import LagrangianAdam
from .problems import DUAL_LR, LR, PLAIN_ASCENT, SmallModelData
from .training_candidates import TrainingCandidate

NO_BLOCKS = " @no blocks"


class SmallModelCandidate(TrainingCandidate):
    """The training sweep's loop (a model of the data's, one batch per step) on a binary classifier."""

    def _logits(self, inputs: Tensor) -> Tensor:
        return self.model(inputs).squeeze(1)

    def _task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels)

    def _step(self, inputs: Tensor, labels: Tensor, group_ids: list[Tensor]) -> None:
        raise NotImplementedError

    def multipliers(self) -> list[Tensor]:
        return []


def soft_and_hard(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The sigmoid (differentiable, drives the primal term) and the 0/1 prediction (drives the multipliers)."""
    return torch.sigmoid(logits), (logits.detach() > 0).to(logits.dtype)


class FusedConstrained(SmallModelCandidate):
    """LagrangianAdam with one grouped block per group count, called as a user's parity constraint."""

    def __init__(self, data: SmallModelData, backend: str) -> None:
        super().__init__(data)
        self.optimizer = LagrangianAdam(self.params, lr=LR, backend=backend)
        self.blocks = [
            self.optimizer.add_constraint(f"parity{j}", kind="grouped", num_constraints=count,
                                          bound=data.problem.epsilon, dual_lr=DUAL_LR, to_overall=True,
                                          **PLAIN_ASCENT)
            for j, count in enumerate(data.problem.group_counts)
        ]

    def _step(self, inputs, labels, group_ids) -> None:
        logits = self._logits(inputs)
        soft, hard = soft_and_hard(logits)
        loss = self._task_loss(logits, labels)
        for block, ids in zip(self.blocks, group_ids):
            loss = loss + block(soft, ids=ids, dual_values=hard)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def multipliers(self) -> list[Tensor]:
        return [block.multipliers for block in self.blocks]


class FusedUnconstrained(SmallModelCandidate):
    """LagrangianAdam without blocks: the step the constrained one is held to (the drop-in cost excluded)."""

    def __init__(self, data: SmallModelData, backend: str) -> None:
        super().__init__(data)
        self.optimizer = LagrangianAdam(self.params, lr=LR, backend=backend)

    def _step(self, inputs, labels, group_ids) -> None:
        self._task_loss(self._logits(inputs), labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class HandWritten(SmallModelCandidate):
    """The oracle: torch's fused Adam; each block's term and projected ascent in plain PyTorch over all
    of its K groups (K is 2 or 3).  A group absent from the batch adds nothing and keeps its multiplier."""

    def __init__(self, data: SmallModelData) -> None:
        super().__init__(data)
        self.optimizer = torch.optim.Adam(self.params, lr=LR, fused=True)
        self._multipliers = [torch.zeros(count, device=data.device) for count in data.problem.group_counts]

    def _step(self, inputs, labels, group_ids) -> None:
        epsilon = self.data.problem.epsilon
        logits = self._logits(inputs)
        soft, hard = soft_and_hard(logits)
        # to_overall: each sample enters as its value minus the batch's mean, so a group's mean is its gap.
        soft_gaps, hard_gaps = soft - soft.mean(), hard - hard.mean()
        loss = self._task_loss(logits, labels)
        dual_directions = []
        for lam, ids in zip(self._multipliers, group_ids):
            counts = torch.bincount(ids, minlength=lam.numel()).to(soft.dtype)
            per_count = 1 / counts.clamp(min=1)
            # sum_i (gap_i - epsilon) over a group, divided by its count: its mean violation, 0 when absent.
            soft_violations = (torch.zeros_like(lam).index_add(0, ids, soft_gaps) - epsilon * counts) * per_count
            loss = loss + (lam * soft_violations).sum()
            dual_directions.append((torch.zeros_like(lam).index_add(0, ids, hard_gaps) - epsilon * counts) * per_count)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for lam, direction in zip(self._multipliers, dual_directions):
            lam.add_(direction, alpha=DUAL_LR).clamp_(min=0)

    def multipliers(self) -> list[Tensor]:
        return self._multipliers


class TorchAdam(SmallModelCandidate):
    """torch.optim.Adam with no constraints: fused=True (the floor) or its default implementation."""

    def __init__(self, data: SmallModelData, fused: bool) -> None:
        super().__init__(data)
        self.optimizer = torch.optim.Adam(self.params, lr=LR, fused=fused or None)

    def _step(self, inputs, labels, group_ids) -> None:
        self._task_loss(self._logits(inputs), labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def small_model_candidates(data: SmallModelData, fused_backends: list[str]) -> dict:
    """Per fused backend the constrained step and, as ``"<name> @no blocks"``, the same optimizer without
    blocks; the hand-written oracle; torch's Adam fused (the floor) and default, unconstrained."""
    factories = {}
    for backend in fused_backends:
        factories[f"fused:{backend}"] = lambda backend=backend: FusedConstrained(data, backend)
        factories[f"fused:{backend}{NO_BLOCKS}"] = lambda backend=backend: FusedUnconstrained(data, backend)
    factories["unfused"] = lambda: HandWritten(data)
    factories["torch_fused"] = lambda: TorchAdam(data, fused=True)
    factories["torch_adam"] = lambda: TorchAdam(data, fused=False)
    return factories
