r"""Drop-in constrained optimizers: LagrangianSGD, LagrangianAdam, LagrangianAdamW.

With no constraint block they are torch.optim.SGD / Adam / AdamW.  Each constraint block registered
with ``add_constraint`` adds multipliers :math:`\lambda` that ``step()`` moves in the same call as the
parameters:

.. math::
    \theta_{t+1} &= \text{primal}(\theta_t, \nabla_\theta [f + \textstyle\sum_b \text{term}_b(\lambda_t)]) \\
    \lambda_{t+1} &= \text{proj}(\lambda_t + \eta_\lambda\, \hat g_t) \quad \text{(touched constraints only)}

The classes only gather tensors and hyperparameters into ``contract.py``'s layout; the computation is
the backend's ``fused_step``, behind ``layouts.py``, which makes every backend take what torch.optim
takes (any layout, float64, complex, a parameter listed twice).

GradScaler: an iteration whose gradients overflow skips the whole step, primal and simultaneous dual
updates alike, and does not advance ``step``.  Dual-first blocks (``ordering="dual_first"``) are the
exception: they update their multipliers at the block call, before the backward pass, so before the
scaler can know the iteration will be skipped; their violations come from the forward values, not
the gradients, so that update is still a valid one, but a skipped iteration moves them.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from . import backends, distributed, layouts
from .constraints import ConstraintBlock, ConstraintSpec
from .contract import DUAL_HPARAMS, PRIMAL_HPARAMS, Algorithm, FusedStepArguments, PrimalFlag, hparams_tensor
from .formulation import LOCAL, BlockContext, Recording, Reduction
from .validation import VALIDATION_MODES, is_deferred


def _as_float(value) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _hparam(value):
    """A hyperparameter for ``contract.hparams_tensor``: a tensor (a scheduler's lr, updated in place) stays a
    tensor, read by the step through tensor ops at every step, never cached nor read on the host."""
    return value if isinstance(value, Tensor) else float(value)


# Device types whose capturable steps keep the hyperparameters on the device, where the kernel reads them.
HPARAMS_ON_DEVICE = frozenset({"cuda"})

# Hyperparameters as the optimizer gathers them: runs of entries (a param group's tensors, a block), each
# run (its number of entries, the values of one entry in contract order: floats and tensors).
HparamRuns = list[tuple[int, list]]


def _flat_hparams(runs: HparamRuns) -> list:
    """The values of every entry, in order: what ``contract.hparams_tensor`` takes."""
    return [value for count, values in runs for _ in range(count) for value in values]


class _DeviceHparams:
    """contract.py's hyperparameter tensor kept on a CUDA step's device and updated in place (capturable steps).

    The CUDA kernel reads it there (HparamsPlacement in csrc/fused_step_cuda_kernel.cuh), so a CUDA graph
    replays with the values it holds then.  Each run is written by one kernel on a strided view of the
    table, never by a host-to-device copy (a sync, and a copy from host memory that a graph would replay
    stale): a tensor value on the table's device (a scheduler's tensor lr, changed in place) is copied in
    at every step, which a graph records and replays; a float (or a CPU tensor, read on the host: no
    device sync) is written only when it changed, so a steady loop writes nothing, and a graph captures it
    as a constant, as torch's capturable Adam does with a float lr.  A new layout (a tensor gained or lost
    its gradient) allocates a new table: a graph is captured in a steady loop, where the layout stays.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.table: Optional[Tensor] = None
        self._layout: tuple = ()
        self._written: list[list[Optional[float]]] = []  # per run and slot: the float last written there

    def update(self, runs: HparamRuns, device: torch.device) -> Tensor:
        layout = (device, tuple(count for count, _ in runs))
        if layout != self._layout:
            entries = sum(count for count, _ in runs)
            self.table = torch.empty(entries * self.width, dtype=torch.float64, device=device)
            self._layout = layout
            self._written = [[None] * self.width for _ in runs]
        rows = self.table.view(-1, self.width)
        start = 0
        for (count, values), written in zip(runs, self._written):
            run = rows[start:start + count]
            start += count
            for slot, value in enumerate(values):
                if isinstance(value, Tensor) and value.device == self.table.device:
                    run[:, slot].copy_(value.detach().reshape(()))
                    written[slot] = None
                    continue
                number = float(value)
                if written[slot] != number:
                    run[:, slot].fill_(number)
                    written[slot] = number
        return self.table


class _InputErrors:
    """Deferred checks: the sum of the error codes of the calls recorded since the last step (on the device).

    A plain object rather than an optimizer attribute: torch.compile replays attribute writes made in a
    traced block call on it (it drops them on a torch.optim.Optimizer).
    """

    def __init__(self) -> None:
        self.code: Optional[Tensor] = None


class LagrangianOptimizer(torch.optim.Optimizer):
    """Base class: constraint blocks, the fused step, state_dict with multipliers, report().

    ``validation`` ("auto", "eager" or "deferred"; settable on the instance) says when the data checks
    of block calls (ids in range, finite values) are read on the host: "eager" in the block call,
    "deferred" at the next ``raise_input_errors()`` / ``report()`` (or uncompiled CPU ``step()``), the
    step skipping the whole update meanwhile; "auto" is eager on the CPU, deferred on accelerators and
    inside torch.compile.  See ``validation.py``.
    """

    algorithm: Algorithm
    validation: str = "auto"

    def __init__(self, params, defaults: dict, backend: str, process_group=None) -> None:
        if defaults.get("differentiable"):
            raise NotImplementedError(f"{type(self).__name__} does not support differentiable=True")
        super().__init__(params, defaults)
        if backend != "auto" and backend not in backends.names():
            raise ValueError(f"unknown backend {backend!r}; known: auto, {', '.join(backends.names())}")
        self.backend = backend
        # Data parallelism: the ranks whose blocks stay in step (None: the default group once
        # torch.distributed is initialised); see distributed.py.
        self.process_group = process_group
        self.constraints: dict[str, ConstraintBlock] = {}
        self._implementations: dict[tuple[str, str], tuple[str, Callable]] = {}
        self._native_forward_by_device: dict[str, bool] = {}
        # Capturable steps on CUDA: the hyperparameter tables kept on the device (see _hparams_for).
        self._device_hparams: dict[tuple, _DeviceHparams] = {}
        self._input_errors = _InputErrors()
        self._block_context = BlockContext(reduction=self._reduction, deferred_checks=self._deferred_checks,
                                           uses_triton=self._uses_triton, native_forward=self._native_forward,
                                           recorded=self._recorded)
        # GradScaler hands us grad_scale / found_inf instead of unscaling the gradients itself.
        self._step_supports_amp_scaling = True

    # deepcopy and pickle: torch.optim.Optimizer keeps only defaults, state and param_groups; the blocks
    # (which refer back to this optimizer: the copy's blocks refer to the copy) and the backend travel too.
    _PICKLED_ATTRIBUTES = ("backend", "process_group", "constraints", "_step_supports_amp_scaling", "_input_errors",
                           "_block_context", "validation")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._PICKLED_ATTRIBUTES if name in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("constraints", {})
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("process_group", None)
        self._implementations = {}  # resolved again on first use: backend functions are not state
        self._native_forward_by_device = {}
        self._device_hparams = {}

    # ----------------------------------------------------------------------------------------------
    # Constraint blocks

    def add_constraint(self, name: str, kind: str = "dense", num_constraints: int = 1, sense: str = "<=",
                       bound=0.0, dual_lr: float = 1e-2, *, device: Optional[torch.device] = None,
                       **options) -> ConstraintBlock:
        """Registers a block of ``num_constraints`` constraints; see ``ConstraintSpec`` for the options."""
        if name in self.constraints:
            raise ValueError(f"a constraint block named {name!r} already exists")
        spec = ConstraintSpec(name=name, kind=kind, num_constraints=num_constraints, sense=sense, bound=bound,
                              dual_lr=dual_lr, **options)
        block = ConstraintBlock(self._block_context, spec, self._block_device(name, device))
        self.constraints[name] = block
        self._resolved(block.device)  # the backend's probes run here, outside any traced region
        return block

    def _default_device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _block_device(self, name: str, device) -> torch.device:
        """Where a block's multipliers live: the parameters' device, on which the one fused step runs."""
        params_device = self._default_device()
        if device is None:
            return params_device
        device = torch.device(device)
        if device.type == params_device.type and device.index is None:
            device = params_device  # "cuda" means the parameters' cuda device
        if device != params_device:
            hint = " (the meta device holds no values)" if device.type == "meta" else ""
            raise ValueError(f"constraint block {name!r}: device {device}{hint} differs from the parameters' "
                             f"device {params_device}; the step updates parameters and multipliers in one call "
                             "on one device")
        return device

    def _reduction(self) -> Reduction:
        return distributed.data_parallel_reduction(self.process_group) or LOCAL

    def _deferred_checks(self, device: torch.device) -> bool:
        if self.validation not in VALIDATION_MODES:
            raise ValueError(f"validation must be one of {VALIDATION_MODES}, got {self.validation!r}")
        return is_deferred(self.validation, device)

    def _uses_triton(self, device: torch.device) -> bool:
        # On the CPU Triton only runs interpreted (tests of the step kernel): the term stays plain torch there.
        return device.type == "cuda" and self._resolved(device)[0] == "triton"

    def _native_forward(self, device: torch.device) -> bool:
        uses = self._native_forward_by_device.get(device.type)
        if uses is None:
            uses = self._native_forward_by_device[device.type] = (
                self._resolved(device)[0] == "native" and backends.native.has_grouped_forward(device.type))
        return uses

    def _recorded(self, block: ConstraintBlock, recording: Recording) -> None:
        if recording.error is not None:
            errors = self._input_errors
            errors.code = recording.error if errors.code is None else errors.code + recording.error
        if block.spec.ordering == "dual_first":
            self._dual_step([block])

    def report(self) -> dict:
        """Per block: observed count, max violation, number violated, multiplier statistics.

        Reads the deferred input checks first: raises the ConstraintInputError of a bad call.
        """
        self.raise_input_errors()
        return {name: block.report() for name, block in self.constraints.items()}

    def raise_input_errors(self) -> None:
        """Reads the deferred input checks of every block (one host sync); raises for the first bad call."""
        self._input_errors.code = None
        for block in self.constraints.values():
            block.raise_input_errors()

    # ----------------------------------------------------------------------------------------------
    # The step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        primal = self._gather_primal()
        blocks = [b for b in self.constraints.values() if b.spec.ordering == "simultaneous"]
        self._run(primal, blocks, *self._amp_scaling(), self._take_input_errors())
        return loss

    def _amp_scaling(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """GradScaler's ``grad_scale`` and ``found_inf`` for this step (None when not set).

        With no gradient at all, GradScaler's ``found_inf`` is the Python number 0 (a sum over no device):
        nothing overflowed, so the step runs (the blocks' dual updates)."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if isinstance(found_inf, numbers.Number):
            found_inf = None if found_inf == 0 else torch.ones(1)
        if isinstance(grad_scale, numbers.Number):
            grad_scale = None if grad_scale == 1 else torch.tensor([float(grad_scale)])
        return grad_scale, found_inf

    def _take_input_errors(self) -> Optional[Tensor]:
        """This step's deferred error code; on the CPU outside torch.compile it is read and raised here."""
        errors, self._input_errors.code = self._input_errors.code, None
        if errors is not None and errors.device.type == "cpu" and not torch.compiler.is_compiling() and int(errors):
            for block in self.constraints.values():
                block.discard_pending()
            self.raise_input_errors()
        return errors

    @torch.no_grad()
    def _dual_step(self, blocks: list[ConstraintBlock]) -> None:
        """The dual update alone (dual-first ordering): the same call with no parameter tensors."""
        self._run(([], [], [], [], [], [], [], []), blocks, None, None, self._input_errors.code)

    def _run(self, primal: tuple, blocks: list[ConstraintBlock], grad_scale, found_inf,
             input_errors: Optional[Tensor]) -> None:
        # On an AMP overflow (found_inf) or a deferred input error the backend skips primal and dual
        # alike, device-side; the pending violations belong to that skipped iteration and are dropped.
        pending = [block.take_pending() for block in blocks]
        try:
            self._run_taken(primal, blocks, pending, grad_scale, found_inf, input_errors)
        except Exception:
            # Nothing was updated (backends check before they write): the samples wait for the next step,
            # and state created for this step goes, as if it never began.
            for block, (ids, violations) in zip(blocks, pending):
                block.restore_pending(ids, violations)
            for state, keys in getattr(self, "_created_state", ()):
                for key in keys:
                    state.pop(key, None)
            raise
        finally:
            self._created_state = []

    def _run_taken(self, primal: tuple, blocks: list[ConstraintBlock], pending: list, grad_scale, found_inf,
                   input_errors: Optional[Tensor]) -> None:
        if blocks:
            pending = self._reduction().gather_pending(pending)
        if not primal[0] and not blocks:
            return
        if input_errors is not None:
            skip = (input_errors > 0).float().reshape(1)
            found_inf = skip if found_inf is None else found_inf + skip.to(found_inf.device)
        device = primal[0][0].device if primal[0] else blocks[0].device
        flags = [block.spec.dual_flags for block in blocks]
        hparams = self._hparams_for(("dual", *(block.name for block in blocks)),
                                    [(1, block.spec.dual_hparams) for block in blocks], DUAL_HPARAMS, device)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags = primal
        arguments = FusedStepArguments(
            params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
            steps=steps, primal_hparams=hparams_tensor(primal_hparams), primal_flags=primal_flags,
            algorithm=int(self.algorithm), multipliers=[b.multipliers for b in blocks],
            dual_states=[b.dual_state for b in blocks], ids=[ids for ids, _ in pending],
            violations=[v for _, v in pending], dual_hparams=hparams_tensor(hparams), dual_flags=flags,
            grad_scale=grad_scale, found_inf=found_inf)
        tracked = [(block.touched, block.multipliers, ids)
                   for block, (ids, _) in zip(blocks, pending) if block.touched is not None]
        if tracked and torch.compiler.is_compiling():
            for touched, _, _ in tracked:
                touched.invalidate()
            tracked = ()
        for touched, multipliers, _ in tracked:
            touched.before_step(multipliers)
        stats = self._resolved(device)[1](*arguments)
        for touched, multipliers, ids in tracked:
            touched.after_step(ids, multipliers)
        for row, block in enumerate(blocks):
            block.last_stats = (stats, row)

    def _hparams_for(self, key: tuple, runs: HparamRuns, width: int, device: torch.device) -> Union[list, Tensor]:
        """The hyperparameters of a step on ``device``: for a capturable optimizer on CUDA, the table ``key``
        kept on the device and updated in place (``_DeviceHparams``), else the values, for ``hparams_tensor``."""
        if device.type not in HPARAMS_ON_DEVICE or not any(group.get("capturable") for group in self.param_groups):
            return _flat_hparams(runs)
        table = self._device_hparams.get(key)
        if table is None:
            table = self._device_hparams[key] = _DeviceHparams(width)
        return table.update(runs, device)

    def _resolved(self, device: torch.device) -> tuple[str, Callable]:
        """The backend's name and ``fused_step`` for this device, resolved once: the probes cost more than a
        small step."""
        key = (self.backend, device.type)
        resolved = self._implementations.get(key)
        if resolved is None:
            name = backends.resolve(self.backend, device)
            resolved = self._implementations[key] = (name, layouts.normalising(backends.fused_step_of(name)))
        return resolved

    def _gather_primal(self) -> tuple:
        """Contract order: the lists params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, then the
        hyperparameters (``_hparams_for``) and the flags."""
        lists: tuple[list, ...] = ([], [], [], [], [], [])
        flags: list[int] = []
        runs: HparamRuns = []
        self._seeded_this_step: set[int] = set()
        self._this_step_skipped: Optional[bool] = None
        # (state dict, keys) created for this step: removed again if the step raises.
        self._created_state: list[tuple[dict, tuple[str, ...]]] = []
        for group in self.param_groups:
            group_hparams, group_flag = self._group_options(group)
            gathered = len(flags)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                flags.append(group_flag | self._append_state(lists, p, group, self.state[p]))
            if len(flags) > gathered:
                runs.append((len(flags) - gathered, group_hparams))
        hparams = self._hparams_for(("primal",), runs, PRIMAL_HPARAMS, lists[0][0].device) if runs else []
        return distributed.local_shards(lists + (hparams, flags))

    def _group_options(self, group: dict) -> tuple[list[float], int]:
        """The group's hyperparameters in contract order and its ``PrimalFlag`` bits."""
        raise NotImplementedError

    def _append_state(self, lists: tuple, p: Tensor, group: dict, state: dict) -> int:
        """Appends p, its gradient and state to the tensor lists; returns ``PrimalFlag`` bits of the state.

        Flags are plain ints here: enum arithmetic per tensor and step costs more than the rest of it.
        """
        raise NotImplementedError

    def _keeps_new_state(self) -> bool:
        """Whether state created for this step is kept: not when GradScaler will skip the step.

        torch.optim never runs a skipped step, so it creates no state then; keeping ours would make the
        next step differ (SGD seeds a new momentum buffer with the first direction, even with dampening).
        Read once per step, and only when state is created (a host read of ``found_inf``: first steps only).
        """
        if self._this_step_skipped is None:
            found_inf = self._amp_scaling()[1]
            self._this_step_skipped = found_inf is not None and bool(found_inf.ne(0).any())
        return not self._this_step_skipped

    # ----------------------------------------------------------------------------------------------
    # Checkpoints: torch's state plus every block's multipliers and dual state.

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["constraints"] = {name: block.state_dict() for name, block in self.constraints.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load plus the blocks'; all of it is checked first, so a refused checkpoint changes nothing."""
        state_dict = dict(state_dict)
        # Without the key (torch.optim's state dicts, torch.distributed.checkpoint's): primal state only.
        constraints = state_dict.pop("constraints", None)
        if constraints is not None:
            self._check_constraint_blocks(constraints)
        self._check_primal_state(state_dict)
        super().load_state_dict(state_dict)
        for name, block_state in (constraints or {}).items():
            self.constraints[name].load_state_dict(block_state)
        self._place_steps()

    def _check_constraint_blocks(self, constraints: dict) -> None:
        if not isinstance(constraints, dict):
            raise ValueError(f"checkpoint 'constraints' entry is a {type(constraints).__name__}, not a dict")
        missing = set(self.constraints) - set(constraints)
        unknown = set(constraints) - set(self.constraints)
        if missing or unknown:
            raise ValueError(f"checkpoint constraint blocks do not match: missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        for name, block_state in constraints.items():
            self.constraints[name].check_state_dict(block_state)

    def _check_primal_state(self, state_dict: dict) -> None:
        """What torch.optim's load would refuse halfway or accept and then fail at ``step()`` on, refused first."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict):
            raise ValueError("optimizer state dict needs a 'state' dict and a 'param_groups' list")
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for saved, ours in zip(groups, self.param_groups):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(ours["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
        params = dict(zip(itertools.chain.from_iterable(g["params"] for g in groups),
                          itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, param_state in state.items():
            param = params.get(key)
            if param is None or not isinstance(param_state, dict):
                continue
            for name, value in param_state.items():
                if name == "step":
                    _step_value(value, f"state of parameter {key}: step")
                elif name in _PARAM_SHAPED_STATE and isinstance(value, Tensor) and value.shape != param.shape:
                    raise ValueError(f"state of parameter {key}: {name} has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(param.shape)}")

    def _place_steps(self) -> None:
        """Step counts as torch keeps them: 0-dim float32 tensors, on the CPU for CPU params (on the device
        for GPU params); older checkpoints' Python numbers and float64 or (1,)-shaped tensors are converted."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "step" not in state:
                    continue
                step, device = state["step"], _step_device(p)
                if not (isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0
                        and step.device == device):
                    state["step"] = torch.tensor(_step_value(step, "step"), dtype=torch.float32, device=device)


# State tensors with one value per parameter element (the rest, "step", is a count).
_PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _step_value(value, what: str) -> float:
    """A checkpoint's step count as a float: a Python number or a one-element tensor, finite and >= 0."""
    if isinstance(value, Tensor):
        number = float(value.item()) if value.numel() == 1 and not value.is_complex() else None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        number = None
    if number is None or not (0 <= number < float("inf")):
        raise ValueError(f"{what} must be a count >= 0 (a number or a one-element tensor), got {value!r}")
    return number


def _step_device(p: Tensor) -> torch.device:
    return torch.device("cpu") if p.device.type == "cpu" else p.device


_EMPTY: dict = {}
_FIRST_MOMENTUM_STEP = int(PrimalFlag.FIRST_MOMENTUM_STEP)


def _empty_like(p: Tensor) -> Tensor:
    """A shared zero-element placeholder for state a tensor does not have (contract: numel 0)."""
    key = (p.device, p.dtype)
    if key not in _EMPTY:
        _EMPTY[key] = torch.empty(0, device=p.device, dtype=p.dtype)
    return _EMPTY[key]


class LagrangianSGD(LagrangianOptimizer):
    r"""torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize) plus constraint blocks.

    .. math::
        d &= \pm g + w\theta, \quad b \leftarrow \mu b + (1-\tau) d \ (b_1 = d), \quad
        \theta \leftarrow \theta - \gamma\,(d + \mu b \text{ if nesterov else } b)
    """

    algorithm = Algorithm.SGD

    def __init__(self, params: Iterable, lr=1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 backend: str = "auto", process_group=None) -> None:
        if _as_float(lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, backend, process_group)

    def _group_options(self, group):
        flag = PrimalFlag(0)
        if group["maximize"]:
            flag |= PrimalFlag.MAXIMIZE
        if group["nesterov"]:
            flag |= PrimalFlag.NESTEROV
        hparams = [_hparam(group["lr"]), float(group["momentum"]), float(group["dampening"]), 0.0,
                   _hparam(group["weight_decay"])]
        return hparams, int(flag)

    def _append_state(self, lists, p, group, state):
        params, grads, buffers = lists[:3]
        flag = 0
        if group["momentum"] != 0:
            buffer = state.get("momentum_buffer")
            # torch.optim.SGD seeds a new buffer with the first direction; a parameter listed twice in
            # a group sees no buffer at either of its updates of that step in torch, so both seed it.
            if buffer is None or id(buffer) in self._seeded_this_step:
                flag = _FIRST_MOMENTUM_STEP
                if buffer is None:
                    buffer = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if self._keeps_new_state():
                        state["momentum_buffer"] = buffer
                        self._seeded_this_step.add(id(buffer))
                        self._created_state.append((state, ("momentum_buffer",)))
            buffers.append(buffer)
        else:
            buffers.append(_empty_like(p))
        params.append(p)
        grads.append(p.grad)
        return flag


class LagrangianAdam(LagrangianOptimizer):
    r"""torch.optim.Adam (amsgrad, maximize, weight_decay, decoupled_weight_decay) plus constraint blocks.

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\, \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon},
        \quad \hat v = \max(\hat v, v) \text{ with amsgrad, else } v
    """

    algorithm = Algorithm.ADAM

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 backend: str = "auto", process_group=None) -> None:
        if _as_float(lr) < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for index, beta in enumerate(betas):
            if not 0.0 <= _as_float(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, backend, process_group)

    def _group_options(self, group):
        flag = PrimalFlag(0)
        if group["amsgrad"]:
            flag |= PrimalFlag.AMSGRAD
        if group["maximize"]:
            flag |= PrimalFlag.MAXIMIZE
        if group["decoupled_weight_decay"]:
            flag |= PrimalFlag.DECOUPLED_WEIGHT_DECAY
        beta1, beta2 = group["betas"]
        hparams = [_hparam(group["lr"]), _hparam(beta1), _hparam(beta2), float(group["eps"]),
                   float(group["weight_decay"])]
        return hparams, int(flag)

    def _append_state(self, lists, p, group, state):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists[:6]
        if "step" not in state:
            new_state = {"step": torch.zeros((), dtype=torch.float32, device=_step_device(p)),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if group["amsgrad"]:
                new_state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._keeps_new_state():
                state.update(new_state)
                self._created_state.append((state, tuple(new_state)))
            else:
                state = new_state  # for this skipped step only, as torch.optim.Adam creates none then
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        max_exp_avg_sqs.append(state["max_exp_avg_sq"] if group["amsgrad"] else _empty_like(p))
        steps.append(state["step"])
        return 0


class LagrangianAdamW(LagrangianAdam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2), plus constraint blocks."""

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto", process_group=None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, process_group=process_group)
