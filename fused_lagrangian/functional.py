"""The public functional entry: ``fused_step(..., backend=...)`` picks a backend and runs it.

The argument layout is ``contract.py``'s; the optimizer classes only gather their tensors into it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, layouts


def fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    primal_hparams: list[float],
    primal_flags: list[int],
    algorithm: int,
    multipliers: list[Tensor],
    dual_states: list[Tensor],
    ids: list[Tensor],
    violations: list[Tensor],
    dual_hparams: list[float],
    dual_flags: list[int],
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """One optimizer step over all parameters and all constraint blocks; returns per-block statistics.

    Takes what torch.optim takes (any layout, float64, complex, a tensor listed twice): see layouts.py."""
    device = params[0].device if params else (multipliers[0].device if multipliers else torch.device("cpu"))
    implementation = layouts.normalising(backends.fused_step_of(backends.resolve(backend, device)))
    return implementation(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags, algorithm,
        multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale, found_inf,
    )
