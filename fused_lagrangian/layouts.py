"""What torch.optim accepts, every backend accepts: one normalisation in front of every ``fused_step``.

The fast kernels (native C++/CUDA, Triton) update a parameter elementwise through raw pointers, so they
take a parameter only when it is float32, bfloat16 or float16, dense, and its gradient and state have
its strides; and they run over all tensors at once, so a tensor listed twice would race with itself.
torch.optim takes more than that.  ``normalising(backend_step)`` returns a ``fused_step`` with
contract.py's signature that turns any call torch.optim would accept into calls the backend can run,
with torch.optim's result:

* float64 and complex tensors (any dtype the kernels do not take): the reference backend's update, which
  keeps the tensor's own precision (the kernels compute in fp32) and does what torch.optim's
  single-tensor path does, operation for operation (complex: SGD in complex arithmetic, Adam's moments
  on ``view_as_real`` views): bitwise torch.optim;
* strides that differ only in size-1 dimensions (autograd makes such gradients): a view of the same
  memory with the parameter's strides, no copy;
* any other layout (a gradient assigned by hand, state made contiguous while the model went
  ``channels_last``, a gapped parameter): the update runs on dense copies, written back once the call
  succeeded, so a call that raises changes nothing;
* a parameter listed twice in a group (torch.optim warns, then updates it twice in order): each repeat
  goes to a later call, so calls stay race-free and the updates happen in torch's order;
* ids and violations of any layout (strided or expanded views): contiguous.

The common case (every tensor already fits) costs one pass over the tensor list and no copy.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import Tensor

from .backends import reference
from .contract import PRIMAL_HPARAMS, STATS_COLUMNS, Algorithm, is_dense

KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
_DTYPE = operator.attrgetter("dtype")

# The eight primal lists of contract.py, in order.
_PRIMAL_LISTS = 8


def normalising(backend_step: Callable) -> Callable:
    """``backend_step`` behind the normalisation described in the module docstring."""

    def fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
                   algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags,
                   grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> Tensor:
        primal = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags)
        ids = [i if i.is_contiguous() else i.contiguous() for i in ids]
        violations = [v if v.is_contiguous() else v.contiguous() for v in violations]
        dual = (multipliers, dual_states, ids, violations, dual_hparams, dual_flags)
        plan = _plan(primal, algorithm)
        if plan is None:
            return backend_step(*primal, algorithm, *dual, grad_scale, found_inf)
        stats = None
        # Kernel calls first: they are the ones that check their inputs and may raise, before anything moved.
        for round_number, indices in enumerate(plan.kernel_rounds):
            if not indices and (round_number > 0 or not multipliers):
                continue
            lists, write_back = _kernel_inputs(primal, algorithm, indices)
            round_dual = dual if round_number == 0 else ([], [], [], [], [], [])
            round_stats = backend_step(*lists, algorithm, *round_dual, grad_scale, found_inf)
            for original, updated in write_back:
                original.copy_(updated)
            if round_number == 0:
                stats = round_stats
        if plan.exact:
            reference.fused_step(*_select(primal, algorithm, plan.exact), algorithm,
                                 [], [], [], [], [], [], grad_scale, found_inf)
        if stats is None:
            device = multipliers[0].device if multipliers else torch.device("cpu")
            stats = torch.zeros(len(multipliers), STATS_COLUMNS, dtype=torch.float32, device=device)
        return stats

    fused_step.__doc__ = f"contract.py's fused_step: {getattr(backend_step, '__module__', '')} behind layouts.py."
    return fused_step


class _Plan:
    """Which tensor indices go to which call: kernel rounds (round r: r-th occurrences) and the exact path."""

    def __init__(self) -> None:
        self.kernel_rounds: list[list[int]] = [[]]
        self.exact: list[int] = []


def _state_lists(primal: tuple, algorithm: int) -> tuple:
    """The lists of state tensors the call updates (entries of numel 0: absent)."""
    return primal[2:5] if algorithm == Algorithm.ADAM else primal[2:3]


def _plan(primal: tuple, algorithm: int) -> Optional[_Plan]:
    """None when every tensor fits the kernels as it is (the common case), else where each one goes."""
    params = primal[0]
    if _fit_as_they_are(primal, algorithm):
        return None
    plan = _Plan()
    occurrences: dict[int, int] = {}
    for i, param in enumerate(params):
        if param.dtype not in KERNEL_DTYPES:
            plan.exact.append(i)  # the reference loops over tensors one after another: repeats are in order
            continue
        repeat = occurrences.get(id(param), 0)
        occurrences[id(param)] = repeat + 1
        while len(plan.kernel_rounds) <= repeat:
            plan.kernel_rounds.append([])
        plan.kernel_rounds[repeat].append(i)
    return plan


def _fit_as_they_are(primal: tuple, algorithm: int) -> bool:
    """Kernel dtypes, dense parameters, gradients and state in their parameter's strides, no repeats.

    Whole-list checks with ``map`` over tensor methods: this runs at every step, and a Python loop with
    several attribute reads per tensor costs about twice as much.
    """
    if torch.compiler.is_compiling():
        return _fit_as_they_are_traced(primal, algorithm)
    params, grads = primal[0], primal[1]
    if not all(map(KERNEL_DTYPES.__contains__, map(_DTYPE, params))):
        return False
    if not all(map(Tensor.is_contiguous, params)) and not all(map(is_dense, params)):
        return False
    strides = list(map(Tensor.stride, params))
    if list(map(Tensor.stride, grads)) != strides:
        return False
    for states in _state_lists(primal, algorithm):
        state_strides = list(map(Tensor.stride, states))
        if state_strides != strides and any(
                got != wanted and state.numel() for got, wanted, state in zip(state_strides, strides, states)):
            return False
    return len(set(map(id, params))) == len(params)


def _fit_as_they_are_traced(primal: tuple, algorithm: int) -> bool:
    """``_fit_as_they_are`` in plain loops, which torch.compile traces (it cannot trace ``attrgetter``); a
    compiled step runs it once per compilation, then guards on the tensors' metadata."""
    params, grads = primal[0], primal[1]
    for i, param in enumerate(params):
        if param.dtype not in KERNEL_DTYPES or not is_dense(param) or grads[i].stride() != param.stride():
            return False
        if any(state[i].numel() and state[i].stride() != param.stride() for state in _state_lists(primal, algorithm)):
            return False
        if any(param is other for other in params[:i]):
            return False
    return True


def _select(primal: tuple, algorithm: int, indices: list[int]) -> tuple:
    """The primal lists restricted to ``indices``."""
    lists: tuple[list, ...] = tuple([] for _ in range(_PRIMAL_LISTS))
    is_adam = algorithm == Algorithm.ADAM
    hparams = primal[6]
    for i in indices:
        lists[0].append(primal[0][i])
        lists[1].append(primal[1][i])
        lists[2].append(primal[2][i])
        if is_adam:
            lists[3].append(primal[3][i])
            lists[4].append(primal[4][i])
            lists[5].append(primal[5][i])
        lists[6].append(hparams[i * PRIMAL_HPARAMS:(i + 1) * PRIMAL_HPARAMS])
        lists[7].append(primal[7][i])
    if isinstance(hparams, Tensor):
        # Kept where it is (a capturable step's table on the device): gathered there, never read on the host.
        selected = torch.cat(lists[6]) if indices else hparams[:0]
    else:
        selected = [value for entry in lists[6] for value in entry]
    return lists[:6] + (selected,) + lists[7:]


def _kernel_inputs(primal: tuple, algorithm: int, indices: list[int]) -> tuple[tuple, list[tuple[Tensor, Tensor]]]:
    """The kernel's lists for ``indices``, every tensor in its parameter's dense layout.

    Returns the lists and the (original, copy) pairs to write back after the call.
    """
    lists = _select(primal, algorithm, indices)
    write_back: list[tuple[Tensor, Tensor]] = []
    is_adam = algorithm == Algorithm.ADAM
    for slot in range(len(indices)):
        param = lists[0][slot]
        layout = param
        if not is_dense(param):
            layout = param.contiguous()
            write_back.append((param, layout))
            lists[0][slot] = layout
        lists[1][slot] = _in_layout(lists[1][slot], layout, write_back=None)
        for column in ((2, 3, 4) if is_adam else (2,)):
            lists[column][slot] = _in_layout(lists[column][slot], layout, write_back)
    return lists, write_back


def _in_layout(tensor: Tensor, layout: Tensor, write_back: Optional[list]) -> Tensor:
    """``tensor`` with ``layout``'s strides: itself, a view of the same memory, or a copy (noted for write-back)."""
    if tensor.numel() == 0 or tensor.stride() == layout.stride() or tensor.shape != layout.shape:
        return tensor  # (a shape mismatch is the backend's to report: copying would broadcast it away)
    if all(size == 1 or a == b for size, a, b in zip(tensor.shape, tensor.stride(), layout.stride())):
        # Strides differ only where the size is 1, never used to address: the same elements, reindexed.
        return tensor.as_strided(layout.shape, layout.stride(), tensor.storage_offset())
    copy = torch.empty_like(layout).copy_(tensor)
    if write_back is not None:
        write_back.append((tensor, copy))
    return copy
