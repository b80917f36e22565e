"""Candidates for one grouped block call, ``block(values, ids=ids, dual_values=hard)``: its forward alone
and with its backward, at each K of a ``BlockCallProblem``; plain PyTorch over the touched groups as the oracle.

The optimizer never steps here (the step's cost at each K is the grouped sweep's): what is timed is
the part of a training step that the block adds to the forward and backward passes, which must not
grow with K when a batch touches only B of the K groups.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_lagrangian import LagrangianAdam
from .problems import (BLOCK_CALL_BOUND, BLOCK_CALL_MULTIPLIER, DUAL_LR, LR, NUM_BATCHES, BlockCallData,
                       BlockCallProblem)

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"


class BlockCallCandidate:
    """One way to compute the call; ``backward`` adds ``term.backward()`` to every step.

    ``params`` is what the call computed (its last term and, with the backward, the gradient it left on
    its values) and ``multipliers()`` what it weighted the groups by, so that the runner's agreement check
    compares them with the hand-written call's.
    """

    def __init__(self, data: BlockCallData, backward: bool) -> None:
        self.batches = data.new_batches()
        self.backward = backward
        self._last_term: Optional[Tensor] = None
        self._last_values: Optional[Tensor] = None
        self._step_index = 0

    def step(self) -> None:
        values, ids, hard = self.batches[self._step_index % NUM_BATCHES]
        term = self._call(values, ids, hard)
        if self.backward:
            term.backward()
        self._after_call()
        self._last_term, self._last_values = term, values
        self._step_index += 1

    def _call(self, values: Tensor, ids: Tensor, hard: Tensor) -> Tensor:
        raise NotImplementedError

    def _after_call(self) -> None:
        pass

    @property
    def params(self) -> list[Tensor]:
        computed = [self._last_term.detach().reshape(1)]
        if self.backward:
            computed.append(self._last_values.grad)
        return computed

    def multipliers(self) -> list[Tensor]:
        raise NotImplementedError


class FusedBlockCall(BlockCallCandidate):
    """This package's grouped block, called as a parity constraint calls it."""

    def __init__(self, data: BlockCallData, backend: str, backward: bool) -> None:
        super().__init__(data, backward)
        # An optimizer needs a parameter to hold its blocks; this one never steps.
        self._anchor = torch.zeros(1, device=data.device, requires_grad=True)
        self.optimizer = LagrangianAdam([self._anchor], lr=LR, backend=backend)
        self.block = self.optimizer.add_constraint("groups", kind="grouped", num_constraints=data.num_groups,
                                                   bound=BLOCK_CALL_BOUND, dual_lr=DUAL_LR,
                                                   init=BLOCK_CALL_MULTIPLIER)

    def _call(self, values, ids, hard) -> Tensor:
        return self.block(values, ids=ids, dual_values=hard)

    def _after_call(self) -> None:
        # What the call recorded waits for a step() that never comes here; kept, it would pile up over
        # the timed calls and the memory would grow with their number.
        self.block.discard_pending()

    def multipliers(self) -> list[Tensor]:
        return [self.block.multipliers]


class HandWrittenBlockCall(BlockCallCandidate):
    """Plain PyTorch as a user would write it for many groups: the means of the groups this batch touches
    (unique + index_add, O(batch)), weighted by their multipliers.  The term only: the dual estimate is
    left to a step."""

    def __init__(self, data: BlockCallData, backward: bool) -> None:
        super().__init__(data, backward)
        self._multipliers = torch.full((data.num_groups,), BLOCK_CALL_MULTIPLIER, device=data.device)

    def _call(self, values, ids, hard) -> Tensor:
        touched, slot = torch.unique(ids, return_inverse=True)
        counts = torch.bincount(slot, minlength=touched.numel()).to(values.dtype)
        sums = torch.zeros(touched.numel(), dtype=values.dtype, device=values.device).index_add(
            0, slot, values - BLOCK_CALL_BOUND)
        return (self._multipliers[touched] * sums / counts).sum()

    def multipliers(self) -> list[Tensor]:
        return [self._multipliers]


def block_call_candidates(problem: BlockCallProblem, device: torch.device, fused_backends: list[str]) -> dict:
    """Every fused backend and the hand-written call, forward alone and with backward, at every K, named
    ``"<candidate> @K=<K> <forward|forward+backward>"`` (each checked against ``unfused`` of the same
    K and variant) and timed in one interleaved run, so their ratios are free of the machine's drift."""
    factories = {}
    for num_groups in problem.num_groups:
        data = BlockCallData(problem, num_groups, device)
        for variant, backward in ((FORWARD, False), (FORWARD_BACKWARD, True)):
            at = f" @K={num_groups:.0e} {variant}"
            for backend in fused_backends:
                factories[f"fused:{backend}{at}"] = (
                    lambda data=data, backend=backend, backward=backward: FusedBlockCall(data, backend, backward))
            factories[f"unfused{at}"] = lambda data=data, backward=backward: HandWrittenBlockCall(data, backward)
    return factories
