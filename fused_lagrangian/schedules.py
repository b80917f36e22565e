"""Dual learning-rate schedules with torch's own LR schedulers.

torch.optim.lr_scheduler classes drive ``optimizer.param_groups[i]["lr"]``; a Lagrangian optimizer's
param groups are the primal ones (so that it stays a drop-in torch.optim optimizer), and each block
keeps its ``dual_lr``.  ``DualLearningRates`` exposes the blocks' dual learning rates as param groups
of a small optimizer-shaped object, one group per block, in registration order (``group["name"]`` is
the block's name); whatever a scheduler writes into ``group["lr"]`` becomes the block's ``dual_lr`` for
the following steps::

    optimizer = LagrangianAdam(model.parameters(), lr=1e-3)
    fairness = optimizer.add_constraint("tpr", kind="grouped", num_constraints=10, dual_lr=0.05)
    dual_lrs = DualLearningRates(optimizer)
    dual_schedule = torch.optim.lr_scheduler.StepLR(dual_lrs, step_size=1000, gamma=0.5)
    for batch in loader:
        ...; optimizer.step(); dual_schedule.step()

It has nothing to step itself (the dual update runs in ``optimizer.step()``), so torch's check that the
optimizer stepped before its scheduler does not apply to it.  Checkpoint ``dual_lrs.state_dict()`` with
the scheduler's to resume the schedule's current values.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


class _DualLRGroup(dict):
    """A param group whose "lr" is the block's dual_lr: writes go through to the block's spec."""

    def __init__(self, block) -> None:
        super().__init__(params=[block.multipliers], lr=block.spec.dual_lr, name=block.name)
        self._block = block

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if key == "lr":
            if float(value) < 0:
                raise ValueError(f"constraint block {self._block.name!r}: dual_lr must be >= 0, got {value}")
            self._block.spec.dual_lr = value


class DualLearningRates(torch.optim.Optimizer):
    """The dual learning rates of ``optimizer``'s blocks (all, or those named in ``blocks``) as param groups
    that torch LR schedulers can drive."""

    def __init__(self, optimizer, blocks: Optional[Iterable[str]] = None) -> None:
        names = list(optimizer.constraints) if blocks is None else list(blocks)
        unknown = [name for name in names if name not in optimizer.constraints]
        if unknown:
            raise ValueError(f"no constraint block named {unknown}; known: {sorted(optimizer.constraints)}")
        if not names:
            raise ValueError("the optimizer has no constraint block: add_constraint first")
        super().__init__([_DualLRGroup(optimizer.constraints[name]) for name in names], defaults={})

    # The scheduler wraps step() to record that the optimizer stepped; here the optimizer's own step()
    # moves the multipliers, so the record is always true.
    @property
    def _opt_called(self) -> bool:
        return True

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        pass

    def step(self, closure=None):
        """Nothing to do: the dual update runs in the Lagrangian optimizer's ``step()``."""
        return None if closure is None else closure()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the groups' values (lr, initial_lr, ...) in place, so that they still write through."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} dual learning rates, this has {len(self.param_groups)}")
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
