"""The Lagrangian term as Triton kernels: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1).

Forward, one launch (after zeroing the 0-dim accumulator): each program gathers ``lambda[ids]`` for
its samples, multiplies by the weights, stores these coefficients (saved for backward) and adds its
share of ``sum(coefficients * violations)`` atomically.  Backward, one launch: the saved coefficients
times the incoming gradient, read on the device.  Rounding follows ``lagrangian_term.py``: the
coefficients and the products are rounded to the violations' dtype, the sum is accumulated in fp32
(fp64 for fp64 violations).  Registered with ``torch.library.triton_op`` so torch.compile sees the
kernels themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..backends.triton_kernels import round_to

BLOCK = 1024


@triton.jit
def _forward_kernel(violations, ids, multipliers, weights, coefficients, total, num_samples,
                    HAS_WEIGHTS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_samples
    dtype: tl.constexpr = violations.dtype.element_ty
    k = tl.load(ids + offs, mask=mask, other=0)
    coefficient = round_to(tl.load(multipliers + k, mask=mask, other=0.0), dtype)
    if HAS_WEIGHTS:
        weight = tl.load(weights + offs, mask=mask, other=0.0)
        coefficient = round_to(coefficient.to(ACCUMULATE) * weight.to(ACCUMULATE), dtype)
    tl.store(coefficients + offs, coefficient, mask=mask)
    value = tl.load(violations + offs, mask=mask, other=0.0)
    product = round_to(coefficient.to(ACCUMULATE) * value.to(ACCUMULATE), dtype).to(ACCUMULATE)
    tl.atomic_add(total, tl.sum(product))


@triton.jit
def _backward_kernel(grad_output, coefficients, grad_violations, num_samples, ACCUMULATE: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_samples
    coefficient = tl.load(coefficients + offs, mask=mask, other=0.0)
    scale = tl.load(grad_output).to(ACCUMULATE)
    grad = scale * coefficient.to(ACCUMULATE)
    tl.store(grad_violations + offs, round_to(grad, coefficients.dtype.element_ty), mask=mask)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton_op("fused_lagrangian::lagrangian_term_forward", mutates_args=())
def lagrangian_term_forward(violations: Tensor, ids: Tensor, multipliers: Tensor,
                            weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(term, coefficients): the term and each sample's ``weights_i * multipliers[ids_i]``."""
    violations, ids = violations.contiguous(), ids.contiguous()
    coefficients = torch.empty_like(violations)
    total = torch.zeros((), dtype=_accumulate_dtype(violations.dtype), device=violations.device)
    num_samples = violations.numel()
    if num_samples:
        wrap_triton(_forward_kernel)[(triton.cdiv(num_samples, BLOCK),)](
            violations, ids, multipliers.contiguous(), violations if weights is None else weights.contiguous(),
            coefficients, total, num_samples, HAS_WEIGHTS=weights is not None,
            ACCUMULATE=_triton_dtype(violations.dtype), BLOCK=BLOCK,
        )
    return total.to(violations.dtype), coefficients


@triton_op("fused_lagrangian::lagrangian_term_backward", mutates_args=())
def lagrangian_term_backward(grad_output: Tensor, coefficients: Tensor) -> Tensor:
    """d term / d violations: ``grad_output * coefficients``."""
    grad_violations = torch.empty_like(coefficients)
    num_samples = coefficients.numel()
    if num_samples:
        wrap_triton(_backward_kernel)[(triton.cdiv(num_samples, BLOCK),)](
            grad_output, coefficients, grad_violations, num_samples,
            ACCUMULATE=_triton_dtype(coefficients.dtype), BLOCK=BLOCK,
        )
    return grad_violations


def _setup_context(ctx, inputs, output) -> None:
    _, coefficients = output
    ctx.save_for_backward(coefficients)
    ctx.mark_non_differentiable(coefficients)


def _backward(ctx, grad_term: Tensor, grad_coefficients: Optional[Tensor]):
    (coefficients,) = ctx.saved_tensors
    return lagrangian_term_backward(grad_term, coefficients), None, None, None


lagrangian_term_forward.register_autograd(_backward, setup_context=_setup_context)


def lagrangian_term_triton(violations: Tensor, ids: Tensor, multipliers: Tensor,
                           weights: Optional[Tensor] = None) -> Tensor:
    """``sum_i weights_i * multipliers[ids_i] * violations_i``; differentiable in ``violations`` only."""
    term, _ = lagrangian_term_forward(violations, ids, multipliers.detach(), weights)
    return term
