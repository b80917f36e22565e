"""The native grouped block forward (csrc/grouped_forward_cpu.cpp), called the cheapest way a call allows.

Eager calls on plain CPU tensors go through the extension's pybind11 function of the same kernel and
autograd node: torch.ops' generic path (each argument converted against the schema, then an Autograd
and a CPU dispatch) costs ~2 us more a call, about half again at B=100.  Compiled calls, tensor
subclasses (FakeTensor, functionalisation), torch.func transforms and other devices use the registered
op, whose fake implementation torch.compile traces (backends/native.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

# The extension's pybind11 function of the CPU kernel, handed over by the backend that loads the extension
# (backends/native.py); None until then, or when the loaded extension predates it.
_eager_cpu: Optional[Callable] = None


def register_eager_cpu(binding: Optional[Callable]) -> None:
    global _eager_cpu
    _eager_cpu = binding


def grouped_forward(values: Tensor, ids: Tensor, dual_values: Optional[Tensor], multipliers: Tensor,
                    bounds: Optional[Tensor], bound: float, sign: float,
                    to_overall: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.fused_lagrangian.grouped_lagrangian_forward``: (term, d term / d values, entry ids, fp32 dual
    violations, error code); differentiable in ``values`` only.  The operator must be loaded."""
    # is_compiling first: under torch.compile the other tests would be traced (and break the graph).  Under
    # torch.func transforms the tensors are plain Tensors that wrap others: the op's dispatch unwraps them.
    if (_eager_cpu is not None and not torch.compiler.is_compiling() and values.is_cpu and type(values) is Tensor
            and type(ids) is Tensor and torch._C._functorch.peek_interpreter_stack() is None):
        return _eager_cpu(values, ids, dual_values, multipliers, bounds, bound, sign, to_overall)
    return torch.ops.fused_lagrangian.grouped_lagrangian_forward(values, ids, dual_values, multipliers, bounds,
                                                                 bound, sign, to_overall)
