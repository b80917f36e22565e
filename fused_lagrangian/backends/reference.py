"""Reference backend: the semantics of ``fused_step`` in plain PyTorch.

Readable first: one loop over parameter tensors doing what torch.optim's single-tensor SGD / Adam do
(the same operations in the same order, so results agree with torch.optim), then one pass over the
constraint blocks.  Every fast backend is tested against this file.  See ``contract.py`` for the
argument layout.  Under torch.compile the step is one opaque op (custom_op.py) that runs this code as
it is: no graph break, no recompile when a tensor lr changes, the eager results.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..contract import (DUAL_HPARAMS, PADDING_ID, PRIMAL_HPARAMS, STATS_COLUMNS, Algorithm, DualFlag, PrimalFlag,
                        dual_state_rows)
from .custom_op import as_custom_op
from .registry import Backend, register


def _step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    primal_hparams: Tensor,
    primal_flags: list[int],
    algorithm: int,
    multipliers: list[Tensor],
    dual_states: list[Tensor],
    ids: list[Tensor],
    violations: list[Tensor],
    dual_hparams: Tensor,
    dual_flags: list[int],
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Tensor:
    primal_hparams, dual_hparams = _floats(primal_hparams), _floats(dual_hparams)
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
                _in_math_dtype(_adam, param, grad, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i],
                               step=steps[i], hp=hp, flags=flags)
            else:
                _in_math_dtype(_sgd, param, grad, exp_avgs[i], hp=hp, flags=flags)
        for j, lam in enumerate(multipliers):
            hp = dual_hparams[j * DUAL_HPARAMS : (j + 1) * DUAL_HPARAMS]
            stats[j] = _dual_ascent(lam, dual_states[j], ids[j], violations[j], hp, DualFlag(dual_flags[j]))
    return stats


# contract.py's fused_step; traced by torch.compile, the custom op fused_lagrangian::fused_step_reference,
# whose body reads hyperparameters and counts on the host and reduces by torch.unique, as eager.
fused_step = as_custom_op("fused_step_reference", _step, body_bumps_versions=True)


def _floats(hparams) -> list[float]:
    """contract.py's hparams tensor (or a plain list) as Python floats: the reference computes in Python."""
    return hparams.tolist() if isinstance(hparams, Tensor) else [float(h) for h in hparams]


_OWN_PRECISION = (torch.float64, torch.complex64, torch.complex128)


def _in_math_dtype(update, param: Tensor, grad: Tensor, *state: Tensor, **kwargs) -> None:
    """Runs ``update`` in fp32 for fp32/bf16/fp16 (as torch's fused kernels), in the tensor's own dtype for
    float64 and complex ones (as torch.optim): in place when the tensors have that dtype, else on copies."""
    math_dtype = param.dtype if param.dtype in _OWN_PRECISION else torch.float32
    tensors = (param, grad, *state)
    if all(t.dtype == math_dtype or t.numel() == 0 for t in tensors):
        update(*tensors, **kwargs)
        return
    copies = [t.to(math_dtype) for t in tensors]
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
    if param.is_complex():  # torch.optim.Adam: weight decay in complex arithmetic, the rest on real views
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = map(
            torch.view_as_real, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq))
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_value = step.item()
    bias_correction1 = 1 - beta1**step_value
    bias_correction2_sqrt = (1 - beta2**step_value) ** 0.5  # as torch.optim.Adam (not math.sqrt): bitwise in float64
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


def _dual_ascent(lam: Tensor, state: Tensor, ids: Tensor, violations: Tensor, hp, flags: DualFlag) -> Tensor:
    """Projected ascent of the touched multipliers of one block; returns its statistics row."""
    lr, kp, ki, nu, damping, lower, upper, decay = hp
    samples = ids != PADDING_ID
    ids, violations = ids[samples], violations[samples]
    if ids.numel() == 0:
        return torch.zeros(STATS_COLUMNS, dtype=torch.float32, device=lam.device)
    touched, slot = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(touched.numel(), dtype=torch.float32, device=lam.device).index_add_(0, slot, violations)
    counts = torch.zeros_like(sums).index_add_(0, slot, torch.ones_like(violations))
    frozen = bool(flags & DualFlag.FROZEN)
    rows = None if frozen else state.view(dual_state_rows(flags)[0], lam.numel())
    if not frozen and flags & DualFlag.RUNNING:
        sum_row = dual_state_rows(flags)[1]
        running_sum = decay * rows[sum_row, touched] + sums
        running_count = decay * rows[sum_row + 1, touched] + counts
        rows[sum_row, touched] = running_sum
        rows[sum_row + 1, touched] = running_count
        g = running_sum / running_count
    else:
        g = sums / counts if flags & DualFlag.MEAN else sums
    if not frozen:
        lam_k = lam[touched]
        if flags & DualFlag.NUPI:
            smoothed_error = rows[0, touched]
            new_smoothed_error = nu * smoothed_error + (1 - nu) * g
            direction = ki * g + kp * (new_smoothed_error - smoothed_error)
            rows[0, touched] = new_smoothed_error
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
