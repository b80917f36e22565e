"""Reference backend: the semantics of ``fused_step`` in plain PyTorch.

Readable first: one loop over parameter tensors doing what torch.optim's single-tensor SGD / Adam do
(the same operations in the same order, so results agree with torch.optim), then one pass over the
constraint blocks.  Every fast backend is tested against this file.  See ``contract.py`` for the
argument layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..contract import DUAL_HPARAMS, PRIMAL_HPARAMS, STATS_COLUMNS, Algorithm, DualFlag, PrimalFlag
from .registry import Backend, register


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
) -> Tensor:
    stats_device = multipliers[0].device if multipliers else torch.device("cpu")
    stats = torch.zeros(len(multipliers), STATS_COLUMNS, dtype=torch.float32, device=stats_device)
    if found_inf is not None and bool(found_inf.item()):
        return stats
    inv_scale = None if grad_scale is None else 1.0 / grad_scale.item()
    with torch.no_grad():
        for i, param in enumerate(params):
            hp = primal_hparams[i * PRIMAL_HPARAMS : (i + 1) * PRIMAL_HPARAMS]
            flags = PrimalFlag(primal_flags[i])
            grad = grads[i] if inv_scale is None else grads[i] * inv_scale
            if algorithm == Algorithm.ADAM:
                _in_fp32(_adam, param, grad, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i],
                         step=steps[i], hp=hp, flags=flags)
            else:
                _in_fp32(_sgd, param, grad, exp_avgs[i], hp=hp, flags=flags)
        for j, lam in enumerate(multipliers):
            hp = dual_hparams[j * DUAL_HPARAMS : (j + 1) * DUAL_HPARAMS]
            stats[j] = _dual_ascent(lam, dual_states[j], ids[j], violations[j], hp, DualFlag(dual_flags[j]))
    return stats


def _in_fp32(update, param: Tensor, grad: Tensor, *state: Tensor, **kwargs) -> None:
    """Runs ``update`` on fp32 views: in place for fp32 tensors, on fp32 copies written back otherwise."""
    tensors = (param, grad, *state)
    if all(t.dtype == torch.float32 or t.numel() == 0 for t in tensors):
        update(*tensors, **kwargs)
        return
    copies = [t.float() for t in tensors]
    update(*copies, **kwargs)
    for original, updated in zip((param, *state), (copies[0], *copies[2:])):
        original.copy_(updated)


def _adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, hp, flags) -> None:
    lr, beta1, beta2, eps, weight_decay = hp
    if flags & PrimalFlag.MAXIMIZE:
        grad = -grad
    step += 1
    if weight_decay != 0:
        if flags & PrimalFlag.DECOUPLED_WEIGHT_DECAY:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_value = step.item()
    bias_correction1 = 1 - beta1**step_value
    bias_correction2_sqrt = math.sqrt(1 - beta2**step_value)
    second_moment = exp_avg_sq
    if flags & PrimalFlag.AMSGRAD:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _sgd(param, grad, momentum_buffer, *, hp, flags) -> None:
    lr, momentum, dampening, _, weight_decay = hp
    direction = -grad if flags & PrimalFlag.MAXIMIZE else grad
    if weight_decay != 0:
        direction = direction.add(param, alpha=weight_decay)
    if momentum != 0:
        if flags & PrimalFlag.FIRST_MOMENTUM_STEP:
            momentum_buffer.copy_(direction)
        else:
            momentum_buffer.mul_(momentum).add_(direction, alpha=1 - dampening)
        if flags & PrimalFlag.NESTEROV:
            direction = direction.add(momentum_buffer, alpha=momentum)
        else:
            direction = momentum_buffer
    param.add_(direction, alpha=-lr)


def _dual_ascent(lam: Tensor, xi: Tensor, ids: Tensor, violations: Tensor, hp, flags: DualFlag) -> Tensor:
    """Projected ascent of the touched multipliers of one block; returns its statistics row."""
    lr, kp, ki, nu, damping, lower, upper = hp
    if ids.numel() == 0:
        return torch.zeros(STATS_COLUMNS, dtype=torch.float32, device=lam.device)
    touched, slot = torch.unique(ids, return_inverse=True)
    g = torch.zeros(touched.numel(), dtype=torch.float32, device=lam.device).index_add_(0, slot, violations)
    if flags & DualFlag.MEAN:
        counts = torch.zeros_like(g).index_add_(0, slot, torch.ones_like(violations))
        g = g / counts
    if not flags & DualFlag.FROZEN:
        lam_k = lam[touched]
        if flags & DualFlag.NUPI:
            xi_k = xi[touched]
            xi_new = nu * xi_k + (1 - nu) * g
            direction = ki * g + kp * (xi_new - xi_k)
            xi[touched] = xi_new
        else:
            direction = g
        lam_k = (lam_k + lr * (direction - damping * lam_k)).clamp_(lower, upper)
        if flags & DualFlag.RESTART:
            lam_k = torch.where(g <= 0, torch.zeros_like(lam_k), lam_k)
        lam[touched] = lam_k
    measure = g.abs() if lower < 0 else g.clamp(min=0)
    return torch.stack([
        torch.tensor(float(touched.numel()), device=lam.device),
        measure.max(),
        (measure > 0).sum().float(),
    ])


register(Backend("reference", lambda device_type: None, lambda: fused_step))
