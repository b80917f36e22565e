"""Candidates for a whole training step: forward, backward and step of a small MLP.

The problem is feasible learning: one constraint per training sample (its loss <= epsilon), N of
them, a batch touching B.  With a model this small the primal update is cheap, so what the dual
machinery costs per step decides the step time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_lagrangian import LagrangianAdam
from .problems import DUAL_LR, LR, TrainingData

try:
    import cooper
except ImportError:  # cooper-optim is a test/benchmark extra, not a dependency
    cooper = None


class TrainingCandidate:
    def __init__(self, data: TrainingData) -> None:
        self.data = data
        self.model = data.new_model()
        self.params = list(self.model.parameters())
        self._step_index = 0

    def step(self) -> None:
        self._step(*self.data.batch(self._step_index))
        self._step_index += 1

    def _per_sample_loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.model(inputs), labels, reduction="none")

    def _step(self, inputs: Tensor, labels: Tensor, ids: Tensor) -> None:
        raise NotImplementedError

    def multipliers(self) -> list[Tensor]:
        return []


class FusedLagrangian(TrainingCandidate):
    def __init__(self, data: TrainingData, backend: str) -> None:
        super().__init__(data)
        self.optimizer = LagrangianAdam(self.params, lr=LR, backend=backend)
        self.block = self.optimizer.add_constraint("per_sample", kind="indexed",
                                                   num_constraints=data.problem.num_samples,
                                                   bound=data.problem.epsilon, dual_lr=DUAL_LR)

    def _step(self, inputs, labels, ids) -> None:
        losses = self._per_sample_loss(inputs, labels)
        (losses.mean() + self.block(losses, ids)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def multipliers(self) -> list[Tensor]:
        return [self.block.multipliers]


class HandWritten(TrainingCandidate):
    """torch's fused Adam; the Lagrangian term by a gather; the ascent by index_add_ and a touched clamp."""

    def __init__(self, data: TrainingData) -> None:
        super().__init__(data)
        self.optimizer = torch.optim.Adam(self.params, lr=LR, fused=True)
        self._multipliers = torch.zeros(data.problem.num_samples, device=data.device)

    def _step(self, inputs, labels, ids) -> None:
        losses = self._per_sample_loss(inputs, labels)
        violations = losses - self.data.problem.epsilon
        (losses.mean() + (self._multipliers[ids] * violations).sum()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lam = self._multipliers
        lam.index_add_(0, ids, violations.detach(), alpha=DUAL_LR)
        lam[ids] = lam[ids].clamp_(min=0)

    def multipliers(self) -> list[Tensor]:
        return [self._multipliers]


class Cooper(TrainingCandidate):
    """cooper-optim 1.0.1 as its documentation shows: a CMP, an IndexedMultiplier, ``roll()``."""

    def __init__(self, data: TrainingData) -> None:
        if cooper is None:
            raise RuntimeError("cooper-optim is not installed (pip install cooper-optim==1.0.1)")
        super().__init__(data)
        self.problem = _PerSampleProblem(data, self._per_sample_loss)
        primal = torch.optim.Adam(self.params, lr=LR, fused=True)
        dual = torch.optim.SGD(self.problem.dual_parameters(), lr=DUAL_LR, maximize=True)
        self.optimizer = cooper.optim.SimultaneousOptimizer(self.problem, primal, dual)

    def _step(self, inputs, labels, ids) -> None:
        self.optimizer.roll(compute_cmp_state_kwargs=dict(inputs=inputs, labels=labels, ids=ids))

    def multipliers(self) -> list[Tensor]:
        return [self.problem.per_sample.multiplier.weight.detach().view(-1)]


if cooper is not None:
    class _PerSampleProblem(cooper.ConstrainedMinimizationProblem):
        def __init__(self, data: TrainingData, per_sample_loss) -> None:
            super().__init__()
            self.epsilon = data.problem.epsilon
            self.per_sample_loss = per_sample_loss
            multiplier = cooper.multipliers.IndexedMultiplier(num_constraints=data.problem.num_samples,
                                                              device=data.device)
            self.per_sample = cooper.Constraint(cooper.ConstraintType.INEQUALITY, multiplier=multiplier)

        def compute_cmp_state(self, inputs, labels, ids) -> "cooper.CMPState":
            losses = self.per_sample_loss(inputs, labels)
            state = cooper.ConstraintState(violation=losses - self.epsilon, constraint_features=ids)
            return cooper.CMPState(loss=losses.mean(), observed_constraints={self.per_sample: state})


class TorchFused(TrainingCandidate):
    """The same model and loss with no constraints, torch.optim.Adam(fused=True): the cost floor."""

    def __init__(self, data: TrainingData) -> None:
        super().__init__(data)
        self.optimizer = torch.optim.Adam(self.params, lr=LR, fused=True)

    def _step(self, inputs, labels, ids) -> None:
        self._per_sample_loss(inputs, labels).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class BandwidthCeiling(TrainingCandidate):
    """The primal step's bytes moved by in-place passes (28 B/param): what the update alone must cost."""

    def __init__(self, data: TrainingData) -> None:
        super().__init__(data)
        self._values = [p.detach() for p in self.params]
        self._grads = [torch.randn_like(p) for p in self._values]
        self._states = [[torch.rand_like(p) for p in self._values] for _ in range(2)]

    def _step(self, inputs, labels, ids) -> None:
        torch._foreach_add_(self._values, self._grads, alpha=1e-12)
        for state in self._states:
            torch._foreach_mul_(state, 0.999999)


def training_candidates(data: TrainingData, fused_backends: list[str]) -> dict:
    factories = {f"fused:{backend}": (lambda backend=backend: FusedLagrangian(data, backend))
                 for backend in fused_backends}
    factories["cooper"] = lambda: Cooper(data)
    factories["unfused"] = lambda: HandWritten(data)
    factories["torch_fused"] = lambda: TorchFused(data)
    factories["ceiling"] = lambda: BandwidthCeiling(data)
    return factories
