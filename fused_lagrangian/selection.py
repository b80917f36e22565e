"""Iterate selection and averaging: which model to keep from a constrained run.

Stochastic primal-dual training oscillates around a feasible point, so the last iterate can be slightly
infeasible even when many iterates were feasible.  Two library tools, independent of any training loop:

``BestIterate`` evaluates the model on a schedule (your full-split evaluation: a metric and the max
constraint violation) and keeps a copy of the best feasible iterate: its parameters (``state_dict``)
and, when given the optimizer, its multipliers and dual state.  "Best" is the best metric among
iterates whose max violation is <= ``tolerance``; while no iterate is feasible it is the least
violating one (``best.feasible`` says which)::

    def evaluate(model):                       # on the whole training (or validation) split
        return accuracy(model, data), float(max_violation(model, data))

    best = BestIterate(evaluate, tolerance=0.01, every=100)
    for step in range(steps):
        ...; optimizer.step()
        best.update(step + 1, model, optimizer)
    best.load_into(model, optimizer)           # the kept iterate, multipliers included

``ParameterAverage`` keeps a running average of the parameters (uniform "Polyak" average, or an
exponential one with ``decay``), on top of ``torch.optim.swa_utils.AveragedModel``; evaluate (or select)
``average.module`` like any model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


@dataclasses.dataclass
class Iterate:
    """One evaluated iterate and the copies needed to get it back."""

    step: int
    metric: float
    max_violation: float
    feasible: bool
    model_state: dict
    constraints: Optional[dict]  # per block: multipliers and dual state (``ConstraintBlock.state_dict``)


class BestIterate:
    """Keeps the best feasible iterate, by ``evaluate(model) -> (metric, max_violation)`` every ``every`` steps.

    ``higher_is_better``: whether a larger metric is better (accuracy) or a smaller one (loss).
    """

    def __init__(self, evaluate: Callable[[nn.Module], tuple[float, float]], *, tolerance: float = 0.0,
                 every: int = 1, higher_is_better: bool = True) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.evaluate = evaluate
        self.tolerance = float(tolerance)
        self.every = int(every)
        self.higher_is_better = higher_is_better
        self.best: Optional[Iterate] = None
        self.history: list[tuple[int, float, float]] = []  # (step, metric, max violation) of every evaluation

    def update(self, step: int, model: nn.Module, optimizer=None) -> bool:
        """Evaluates ``model`` when ``step`` is on the schedule; True when it became the best iterate."""
        if step % self.every:
            return False
        return self.consider(step, model, optimizer)

    @torch.no_grad()
    def consider(self, step: int, model: nn.Module, optimizer=None) -> bool:
        """Evaluates ``model`` now, off schedule (e.g. at the end of training)."""
        was_training = model.training
        model.eval()
        try:
            metric, max_violation = (float(value) for value in self.evaluate(model))
        finally:
            model.train(was_training)
        self.history.append((step, metric, max_violation))
        feasible = max_violation <= self.tolerance
        if not self._better(metric, max_violation, feasible):
            return False
        constraints = None
        if optimizer is not None and getattr(optimizer, "constraints", None):
            constraints = {name: block.state_dict() for name, block in optimizer.constraints.items()}
        model_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.best = Iterate(step, metric, max_violation, feasible, model_state, constraints)
        return True

    def _better(self, metric: float, max_violation: float, feasible: bool) -> bool:
        best = self.best
        if best is None or feasible != best.feasible:
            return best is None or feasible
        if not feasible:
            return max_violation < best.max_violation
        return metric > best.metric if self.higher_is_better else metric < best.metric

    def load_into(self, model: nn.Module, optimizer=None) -> Iterate:
        """Copies the kept parameters (and multipliers, when the optimizer is given) back; returns the iterate."""
        if self.best is None:
            raise RuntimeError("BestIterate has evaluated no iterate yet")
        model.load_state_dict(self.best.model_state)
        if optimizer is not None and self.best.constraints is not None:
            for name, block_state in self.best.constraints.items():
                optimizer.constraints[name].load_state_dict(block_state)
        return self.best


class ParameterAverage:
    """A running average of ``model``'s parameters: uniform since the first ``update`` (``decay=None``) or
    exponential, ``avg <- decay * avg + (1 - decay) * param``.  Buffers (e.g. batch-norm statistics) follow
    the model's current values.  Call ``update()`` after each ``optimizer.step()``."""

    def __init__(self, model: nn.Module, decay: Optional[float] = None) -> None:
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) or None, got {decay}")
        multi_avg_fn = None if decay is None else get_ema_multi_avg_fn(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=False)
        self._model = model

    @property
    def module(self) -> nn.Module:
        """The averaged model (a copy of ``model``), to evaluate or to hand to ``BestIterate``."""
        return self.averaged.module

    @torch.no_grad()
    def update(self) -> None:
        self.averaged.update_parameters(self._model)
        for averaged, current in zip(self.averaged.module.buffers(), self._model.buffers()):
            averaged.copy_(current)
