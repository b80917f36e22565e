"""Candidates for the optimizer step alone, each on its own copy of a ``StepData``'s tensors.

Every candidate's ``step()`` consumes the next batch of constraint data and applies one primal and
one dual update (or, for the floor and the ceiling, only the primal-sized work).  The gradients are
given; the forward and backward passes are not part of this benchmark (``training_candidates`` has them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_lagrangian import LagrangianAdam, LagrangianSGD
from .problems import DUAL_LR, LR, MOMENTUM, PLAIN_ASCENT, FlatProblem, StepData

try:
    import cooper
except ImportError:  # cooper-optim is a test/benchmark extra, not a dependency
    cooper = None


class StepCandidate:
    """One way to take the step; ``multipliers()`` and ``params`` let the runner check they agree."""

    def __init__(self, data: StepData) -> None:
        self.data = data
        self.params = data.new_params()
        self._step_index = 0

    def step(self) -> None:
        self._step(self.data.batch(self._step_index))
        self._step_index += 1

    def _step(self, batch: list[tuple[Tensor, Tensor]]) -> None:
        raise NotImplementedError

    def multipliers(self) -> list[Tensor]:
        return []


def torch_primal_optimizer(params: list[Tensor], algorithm: str) -> torch.optim.Optimizer:
    """torch's fused Adam or SGD with momentum: the fastest primal update torch offers."""
    if algorithm == "adam":
        return torch.optim.Adam(params, lr=LR, fused=True)
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True)


class FusedLagrangian(StepCandidate):
    """This package: the blocks observe their batch, then one ``step()`` updates everything.

    ``observe`` records without the loss term, which belongs to the forward pass like every other
    candidate's (the training benchmark times it).
    """

    def __init__(self, data: StepData, backend: str) -> None:
        super().__init__(data)
        problem = data.problem
        if problem.algorithm == "adam":
            self.optimizer = LagrangianAdam(self.params, lr=LR, backend=backend)
        else:
            self.optimizer = LagrangianSGD(self.params, lr=LR, momentum=MOMENTUM, backend=backend)
        self.blocks = [
            self.optimizer.add_constraint(f"block{j}", kind=config.kind, num_constraints=config.num_constraints,
                                          dual_lr=DUAL_LR, **PLAIN_ASCENT)
            for j, config in enumerate(problem.blocks)
        ]

    def _step(self, batch) -> None:
        for block, (ids, violations) in zip(self.blocks, batch):
            block.observe(violations, ids)
        self.optimizer.step()

    def multipliers(self) -> list[Tensor]:
        return [block.multipliers for block in self.blocks]


class HandWritten(StepCandidate):
    """The best a user could write in plain PyTorch: torch's fused optimizer plus index_add_ and clamp_.

    Indexed blocks project only the multipliers this batch touched (O(batch)); grouped blocks reduce
    into per-group sums and counts (O(K), small for group constraints).
    """

    def __init__(self, data: StepData) -> None:
        super().__init__(data)
        self.optimizer = torch_primal_optimizer(self.params, data.problem.algorithm)
        self._multipliers = [torch.zeros(c.num_constraints, device=data.device) for c in data.problem.blocks]
        self._sums = [torch.zeros(c.num_constraints, device=data.device) if c.kind == "grouped" else None
                      for c in data.problem.blocks]
        self._counts = [torch.zeros_like(s) if s is not None else None for s in self._sums]

    def _step(self, batch) -> None:
        self.optimizer.step()
        for lam, sums, counts, (ids, violations) in zip(self._multipliers, self._sums, self._counts, batch):
            if sums is None:
                lam.index_add_(0, ids, violations, alpha=DUAL_LR)
                lam[ids] = lam[ids].clamp_(min=0)
            else:
                sums.zero_().index_add_(0, ids, violations)
                counts.zero_().index_add_(0, ids, torch.ones_like(violations))
                lam.add_(sums / counts.clamp(min=1), alpha=DUAL_LR).clamp_(min=0)

    def multipliers(self) -> list[Tensor]:
        return self._multipliers


class Cooper(StepCandidate):
    """cooper-optim 1.0.1: SimultaneousOptimizer, torch's fused primal optimizer, SGD(maximize=True) dual.

    Indexed blocks use an IndexedMultiplier (sparse gradients through an embedding lookup); grouped blocks
    a DenseMultiplier over all K groups, fed the per-group means a Cooper user computes.  The step is
    ``roll()`` after its backward of the primal Lagrangian: dual Lagrangian, its backward, primal step,
    dual step (with Cooper's projection of the multipliers), zero of the dual gradients.
    """

    def __init__(self, data: StepData) -> None:
        if cooper is None:
            raise RuntimeError("cooper-optim is not installed (pip install cooper-optim==1.0.1)")
        super().__init__(data)
        self.problem = _CooperProblem(data)
        primal = torch_primal_optimizer(self.params, data.problem.algorithm)
        self.dual_optimizer = torch.optim.SGD(self.problem.dual_parameters(), lr=DUAL_LR, maximize=True)
        self.optimizer = cooper.optim.SimultaneousOptimizer(self.problem, primal, self.dual_optimizer)

    def _step(self, batch) -> None:
        state = self.problem.state_of(batch)
        state.compute_dual_lagrangian().backward()
        self.optimizer.primal_step()
        self.optimizer.dual_step()
        self.dual_optimizer.zero_grad(set_to_none=True)

    def multipliers(self) -> list[Tensor]:
        return [c.multiplier.weight.detach().view(-1) for c in self.problem.constraints()]


if cooper is not None:
    class _CooperProblem(cooper.ConstrainedMinimizationProblem):
        def __init__(self, data: StepData) -> None:
            super().__init__()
            self.configs = data.problem.blocks
            for j, config in enumerate(self.configs):
                multiplier_type = (cooper.multipliers.IndexedMultiplier if config.kind == "indexed"
                                   else cooper.multipliers.DenseMultiplier)
                multiplier = multiplier_type(num_constraints=config.num_constraints, device=data.device)
                setattr(self, f"block{j}", cooper.Constraint(cooper.ConstraintType.INEQUALITY, multiplier=multiplier))

        def state_of(self, batch) -> "cooper.CMPState":
            observed = {}
            for constraint, config, (ids, violations) in zip(self.constraints(), self.configs, batch):
                if config.kind == "indexed":
                    observed[constraint] = cooper.ConstraintState(violation=violations, constraint_features=ids)
                else:
                    observed[constraint] = cooper.ConstraintState(violation=_group_means(ids, violations,
                                                                                         config.num_constraints))
            return cooper.CMPState(observed_constraints=observed)

        def compute_cmp_state(self, batch) -> "cooper.CMPState":
            return self.state_of(batch)


def _group_means(ids: Tensor, values: Tensor, num_groups: int) -> Tensor:
    """Per-group mean of ``values`` (0 for groups absent from the batch), as a Cooper user computes it."""
    sums = torch.zeros(num_groups, device=values.device).index_add_(0, ids, values)
    counts = torch.bincount(ids, minlength=num_groups).clamp_(min=1)
    return sums / counts


class TorchFused(StepCandidate):
    """torch.optim.Adam(fused=True) / SGD(fused=True) with no constraints: the cost floor of the step."""

    def __init__(self, data: StepData) -> None:
        super().__init__(data)
        self.optimizer = torch_primal_optimizer(self.params, data.problem.algorithm)

    def _step(self, batch) -> None:
        self.optimizer.step()


class BandwidthCeiling(StepCandidate):
    """In-place read-modify-write passes over exactly the bytes the primal step moves.

    Adam moves 28 B/param: ``p += tiny * g`` (read p, g; write p) plus ``m *= c`` and ``v *= c``.
    SGD with momentum moves 20 B/param: the same without ``v``.  Streaming passes like these are as fast
    as memory allows, so a step cannot beat them by more than caching effects.
    """

    def __init__(self, data: StepData) -> None:
        super().__init__(data)
        self._values = [p.detach() for p in self.params]
        state_count = 2 if data.problem.algorithm == "adam" else 1
        self._states = [[torch.rand_like(p) for p in self._values] for _ in range(state_count)]

    def _step(self, batch) -> None:
        torch._foreach_add_(self._values, self.data.grads, alpha=1e-12)
        for state in self._states:
            torch._foreach_mul_(state, 0.999999)


def step_candidates(data: StepData, fused_backends: list[str]) -> dict:
    """Name -> factory of every candidate for this problem; the constrained ones only when it has blocks."""
    factories = {f"fused:{backend}": (lambda backend=backend: FusedLagrangian(data, backend))
                 for backend in fused_backends}
    if data.problem.blocks:
        factories["cooper"] = lambda: Cooper(data)
        factories["unfused"] = lambda: HandWritten(data)
    factories["torch_fused"] = lambda: TorchFused(data)
    factories["ceiling"] = lambda: BandwidthCeiling(data)
    return factories


def flat_candidates(problem: FlatProblem, device: torch.device, fused_backends: list[str]) -> dict:
    """Each fused backend and the hand-written step at every N (named ``"<candidate> @N=<N>"``), floor and ceiling.

    Timed in one interleaved run, so their ratios are free of the drift between separately timed cases.
    """
    factories = {}
    for num_constraints in problem.num_constraints:
        per_n = step_candidates(StepData(problem.step_problem(num_constraints), device), fused_backends)
        for name in [f"fused:{backend}" for backend in fused_backends] + ["unfused"]:
            factories[f"{name} @N={num_constraints:.0e}"] = per_n[name]
        factories.setdefault("torch_fused", per_n["torch_fused"])
        factories.setdefault("ceiling", per_n["ceiling"])
    return factories
