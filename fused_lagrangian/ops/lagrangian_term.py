"""The Lagrangian term of a constraint block: sum_i w_i * lambda[c(i)] * e_i.

Forward gathers one multiplier per sample; backward gives d/de_i = w_i * lambda[c(i)].  Nothing else
of the graph is touched, so the term composes with any model, and its cost is O(batch) whatever the
number of constraints.  The multipliers are constants of the primal problem: no gradient flows to them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def lagrangian_term(violations: Tensor, ids: Tensor, multipliers: Tensor, weights: Optional[Tensor] = None, *,
                    use_triton: bool = False) -> Tensor:
    """``sum_i weights_i * multipliers[ids_i] * violations_i``; differentiable in ``violations`` only.

    ``use_triton``: the caller's resolved backend is Triton (``backends.resolve``, the one place that decides).
    """
    if use_triton:
        from .lagrangian_term_triton import lagrangian_term_triton  # one kernel forward, one backward

        return lagrangian_term_triton(violations, ids, multipliers, weights)
    # Plain tensor ops: autograd's own backward of this expression is the O(batch) product
    # w_i * lambda[c(i)], and it costs less per call than a Python autograd.Function.
    coefficients = multipliers.detach()[ids].to(violations.dtype)
    if weights is not None:
        coefficients = coefficients * weights
    return torch.dot(coefficients, violations)

