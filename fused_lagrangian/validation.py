"""Checks of what a constraint block is called with, and when their verdict reaches the host.

Two kinds of checks:

* static (types, shapes, dtypes, devices): metadata only, free on any device and under torch.compile
  (they become guards); they always raise ``ConstraintInputError`` in the block call;
* data (ids in range, violations finite): they read the tensors, so on an accelerator reading their
  verdict would stall the stream.  They produce an error code on the device (``ERROR_IDS_OUT_OF_RANGE``,
  ``ERROR_NONFINITE`` bits) which is then handled in one of two modes:

  - eager (the default on the CPU): the code is read in the block call, which raises (or, with
    ``nonfinite="skip"``, drops this call's samples and counts it) before anything is recorded;
  - deferred (the default on accelerators, and always inside torch.compile): the call records its
    samples and its code; the next ``step()`` skips the whole update (parameters, multipliers, step
    counts), as it does for GradScaler's ``found_inf``; the host raises the same
    ``ConstraintInputError`` naming the block at the next point where it reads the codes:
    ``optimizer.raise_input_errors()``, ``report()``, or an uncompiled ``step()`` whose codes live on
    the CPU (reading them costs nothing there).  With ``nonfinite="skip"`` a non-finite call skips
    that step too and is counted in ``report()`` instead of raising.

The finiteness check is applied to the violations the step will use: the fp32 dual estimate (a finite
float64 value beyond fp32's range is an error, not an infinite multiplier) and the primal violations,
which are computed in fp32 or wider (an fp16 value with a bound outside fp16's range is fine).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ERROR_IDS_OUT_OF_RANGE = 1
ERROR_NONFINITE = 2
VALIDATION_MODES = ("auto", "eager", "deferred")


class ConstraintInputError(ValueError):
    """Bad input to a constraint block; raised before any parameter or multiplier changes."""


def fail(name: str, kind: str, message: str):
    raise ConstraintInputError(f"constraint block {name!r} ({kind}): {message}")


def nonfinite_message(where: str = "") -> str:
    return (f"values contain NaN or inf{where} (pass nonfinite='skip' to skip such updates and count them in "
            "report())")


def is_deferred(mode: str, device: torch.device) -> bool:
    """Whether data checks leave their verdict on the device (see the module docstring)."""
    if torch.compiler.is_compiling():
        return True
    if mode == "auto":
        return device.type != "cpu"
    return mode == "deferred"


def nonfinite_error(checked: list[Tensor]) -> Tensor:
    """0-dim int32 on the device: ERROR_NONFINITE if any value of ``checked`` is NaN or inf, else 0.

    A float64 sum of fp32 (or narrower) values cannot overflow, and is NaN or inf exactly when one of
    them is: one reduction per tensor instead of isfinite().all().
    """
    total = checked[0].sum(dtype=torch.float64)
    for tensor in checked[1:]:
        total = total + tensor.sum(dtype=torch.float64)
    return torch.isfinite(total).logical_not().to(torch.int32) * ERROR_NONFINITE


def ids_error(ids: Tensor, lowest_id: int, num_constraints: int) -> Tensor:
    """0-dim int32 on the device: ERROR_IDS_OUT_OF_RANGE if an id is outside [lowest_id, num_constraints)."""
    if ids.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=ids.device)
    lowest, highest = torch.aminmax(ids)
    return ((lowest < lowest_id) | (highest >= num_constraints)).to(torch.int32) * ERROR_IDS_OUT_OF_RANGE


def raise_for_code(name: str, kind: str, code: int, num_constraints: int, ids: Optional[Tensor] = None) -> None:
    """The ConstraintInputError for an error code read on the host (ids only to name the bad range)."""
    if code & ERROR_IDS_OUT_OF_RANGE:
        detail = ""
        if ids is not None:
            lowest, highest = (int(bound) for bound in torch.aminmax(ids))
            detail = f": min {lowest}, max {highest}"
        fail(name, kind, f"ids out of range [0, {num_constraints}){detail}")
    if code & ERROR_NONFINITE:
        fail(name, kind, nonfinite_message())
