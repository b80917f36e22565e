"""A Python ``fused_step`` as torch.compile sees it: one opaque custom op with the contract's mutations.

The reference and Triton backends implement ``fused_step`` in Python, and their bodies cannot be traced:
the reference reads hyperparameters, step counts and ``found_inf`` on the host and reduces by
``torch.unique`` (a data-dependent shape); Triton's launcher builds pointer tables from real addresses.
``as_custom_op`` registers such a body as the op ``fused_lagrangian::<name>`` (torch.library.custom_op,
with every tensor list the contract updates declared mutated and a fake returning the statistics' shape)
and returns a ``fused_step`` with the contract's signature that calls the op when traced: the compiled
graph holds the whole step as one node, which runs the body eagerly, as it is, at every call.  A
scheduler's tensor lr reaches it through the hyperparameter tensor (``contract.hparams_tensor``, traced
ops): new values are data, never a recompile.  Eager calls run the body directly: the op's Python
dispatch costs several times a small step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.graph import increment_version

from ..contract import STATS_COLUMNS, hparams_tensor

# The contract's arguments a call updates in place.
MUTATED_ARGS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "multipliers", "dual_states")


def as_custom_op(name: str, body: Callable[..., Tensor], *, body_bumps_versions: bool) -> Callable[..., Tensor]:
    """``body``, a ``fused_step`` of contract.py's signature, as described in the module docstring.

    ``body_bumps_versions``: whether the body's own writes bump the version counters of the tensors it
    updates (torch's in-place ops do; writes through raw pointers do not, and then the eager path bumps
    them, as the op would, so that autograd notices a stepped tensor it saved for backward).
    """

    def prototype(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  max_exp_avg_sqs: list[Tensor], steps: list[Tensor], primal_hparams: Tensor, primal_flags: list[int],
                  algorithm: int, multipliers: list[Tensor], dual_states: list[Tensor], ids: list[Tensor],
                  violations: list[Tensor], dual_hparams: Tensor, dual_flags: list[int], grad_scale: Optional[Tensor],
                  found_inf: Optional[Tensor]) -> Tensor:
        return body(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
                    algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale,
                    found_inf)

    op = torch.library.custom_op(f"fused_lagrangian::{name}", prototype, mutates_args=MUTATED_ARGS)

    @op.register_fake
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags, algorithm,
          multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale, found_inf) -> Tensor:
        device = multipliers[0].device if multipliers else torch.device("cpu")
        return torch.empty((len(multipliers), STATS_COLUMNS), dtype=torch.float32, device=device)

    def fused_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   max_exp_avg_sqs: list[Tensor], steps: list[Tensor], primal_hparams: Tensor, primal_flags: list[int],
                   algorithm: int, multipliers: list[Tensor], dual_states: list[Tensor], ids: list[Tensor],
                   violations: list[Tensor], dual_hparams: Tensor, dual_flags: list[int],
                   grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> Tensor:
        if torch.compiler.is_compiling() or any(isinstance(t, FakeTensor) for t in params[:1] + multipliers[:1]):
            return op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams_tensor(primal_hparams),
                      [int(f) for f in primal_flags], int(algorithm), multipliers, dual_states, ids, violations,
                      hparams_tensor(dual_hparams), [int(f) for f in dual_flags], grad_scale, found_inf)
        stats = body(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
                     algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale,
                     found_inf)
        if not body_bumps_versions:
            increment_version([*params, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, *steps, *multipliers,
                               *dual_states])
        return stats

    fused_step.__doc__ = f"contract.py's fused_step: {body.__module__}.{body.__name__}, one custom op when traced."
    return fused_step
