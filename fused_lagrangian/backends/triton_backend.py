"""Triton backend: ``fused_step`` in one Triton launch per call (the grid is described in triton_kernels.py).

The host side only describes the call to the kernel: int64 tables of data pointers and sizes, float64
tables of hyperparameters, and the program-to-tensor / program-to-block owner tables.  They are built
once per distinct set of tensor addresses (or hyperparameter values) and cached on the device, so a
steady-state step launches the kernel and nothing else: no host synchronisation, no copies.

Launch configuration is fixed (no autotuning): an autotuner benchmarks by running the kernel several
times, and this kernel updates parameters, state, multipliers and step counts in place.  The sizes
below are reasoned, not measured on a GPU: 4096 elements per primal program (4 tiles of 1024 over 4
warps, 8 fp32 per thread per tile), 1024 samples per sample program.  Parameters of several storage
dtypes (fp32, bf16, fp16) share the launch: each program branches on its tensor's dtype code.

Registered as the custom op ``fused_lagrangian::fused_step_triton`` (custom_op.py's ``as_custom_op``, not
triton_op): triton_op traces its body with fake tensors under torch.compile, and a pointer table needs
real addresses; the kernel's writes through that table are also invisible to triton_op's mutation
analysis.  As an opaque custom op with declared mutations, torch.compile keeps the call in the graph.

Not checked on the device: ids in range (the constraint blocks validate them on the host).  The
accumulator workspace and tickets are private to a (device, stream): concurrent calls on one stream
are ordered; calls on different streams get different workspaces.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
from typing import Callable, Hashable, Optional

import torch
from torch import Tensor

from ..contract import (DUAL_HPARAMS, PRIMAL_HPARAMS, STATS_COLUMNS, Algorithm, DualFlag, DualSlot, PrimalSlot,
                        dual_state_rows, hparams_tensor, is_dense)
from .custom_op import as_custom_op
from .registry import Backend, register

PRIMAL_BLOCK = 1024
PRIMAL_TILES = 4
SAMPLE_BLOCK = 1024
# Finalisation works on sub-tiles of a sample chunk: a 1024-wide finaliser costs the whole kernel
# 168 registers per thread (ptxas, sm_90), 256-wide 79, which leaves room for 6 programs per SM.
FINAL_BLOCK = 256
NUM_WARPS = 4
# Chunks a finalisation helper claims before leaving the rest to others (0: no limit).  The GPU wants
# no limit; the tests set 1 so that the serial interpreter runs every kind of finaliser.
HELPER_CHUNK_LIMIT = 0
# Tables for this many distinct tensor sets / hyperparameter sets stay cached per kind.
CACHED_TABLES = 8


def unavailable_reason(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton has no CPU driver; CPU tensors run only under TRITON_INTERPRET=1 (the interpreter)"
    return f"Triton runs on CUDA devices, not {device_type}"


def load_fused_step() -> Callable:
    return fused_step


def build_status() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton not installed"
    mode = "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
    return f"triton {importlib.metadata.version('triton')}, {mode}"


# --------------------------------------------------------------------------------------------------
# The launch


def _launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags, algorithm,
            multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale, found_inf) -> Tensor:
    from . import triton_kernels as kernels

    primal_hparams, dual_hparams = hparams_tensor(primal_hparams), hparams_tensor(dual_hparams)
    device = params[0].device if params else (multipliers[0].device if multipliers else torch.device("cpu"))
    for tensor in (grad_scale, found_inf):
        if tensor is not None and (tensor.device != device or tensor.numel() != 1):
            raise ValueError(f"triton backend: grad_scale/found_inf must be 1-element tensors on {device}")
    stats = torch.empty((len(multipliers), STATS_COLUMNS), dtype=torch.float32,
                        device=multipliers[0].device if multipliers else torch.device("cpu"))
    ids = [i if i.dtype == torch.int64 and i.is_contiguous() else i.to(torch.int64).contiguous() for i in ids]
    violations = [v if v.dtype == torch.float32 and v.is_contiguous() else v.float().contiguous() for v in violations]

    dual = _dual_plan(device, multipliers, dual_states, ids, violations, dual_flags)
    workspace = _workspace(device, dual.num_constraints)
    # A fixed, 16-byte aligned address the kernel addresses parameters from; also the pointer passed
    # for arguments this call does not use.
    anchor = workspace.tickets
    primal = _primal_plan(device, anchor, algorithm, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    count_steps = algorithm == Algorithm.ADAM and len(params) > 0
    num_programs = dual.num_programs + primal.num_programs
    if num_programs == 0:
        if not count_steps:
            return stats
        num_programs = 1  # an idle program that only advances the step counts

    kernels.fused_step_kernel[(num_programs,)](
        _or(primal.tensor_table, anchor), _or(primal.chunk_owner, anchor),
        _or(_primal_settings(device, primal_hparams, primal_flags), anchor), len(params), primal.num_programs,
        _or(dual.block_table, anchor), _or(dual.sample_owner, anchor),
        _or(_dual_settings(device, dual_hparams, dual_flags), anchor), len(multipliers), dual.num_programs,
        workspace.accumulators, workspace.tickets, _or(stats, anchor), _or(grad_scale, anchor), _or(found_inf, anchor),
        anchor,
        ALGORITHM=int(algorithm), DTYPES=primal.dtypes, ALIGNED=primal.aligned, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, HAS_BLOCKS=len(multipliers) > 0, COUNT_STEPS=count_steps,
        PRIMAL_BLOCK=PRIMAL_BLOCK, PRIMAL_TILES=PRIMAL_TILES, SAMPLE_BLOCK=SAMPLE_BLOCK, FINAL_BLOCK=FINAL_BLOCK,
        HELPER_CHUNK_LIMIT=HELPER_CHUNK_LIMIT, num_warps=NUM_WARPS,
    )
    return stats


# contract.py's fused_step: one launch of the kernel; traced, the custom op fused_lagrangian::fused_step_triton.
fused_step = as_custom_op("fused_step_triton", _launch, body_bumps_versions=False)


def _or(tensor: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """Triton rejects null pointers: empty or absent arguments the kernel never reads get a placeholder."""
    return placeholder if tensor is None or tensor.numel() == 0 else tensor


# --------------------------------------------------------------------------------------------------
# Cached device tables


class _LruCache:
    def __init__(self, capacity: int) -> None:
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._capacity = capacity

    def get(self, key: Hashable, build: Callable[[], object]):
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = build()
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry


_primal_plans = _LruCache(CACHED_TABLES)
_dual_plans = _LruCache(CACHED_TABLES)
_settings_tables = _LruCache(2 * CACHED_TABLES)


# Pinned sources of copies recorded into a CUDA graph: each replay reads them again, so they must outlive
# the graph (a few small tables per capture; kept for the process's life).
_captured_staging: list[Tensor] = []


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        # Pinned staging: an asynchronous copy, ordered on the stream before the launch that reads it.
        staged = host.pin_memory()
        if torch.cuda.is_current_stream_capturing():
            _captured_staging.append(staged)
        return staged.to(device, non_blocking=True)
    return host.to(device)


@dataclasses.dataclass(frozen=True)
class _PrimalPlan:
    tensor_table: Tensor  # int64 (TENSOR_ROWS, num_tensors)
    chunk_owner: Tensor  # int32 (num_programs,): the tensor each primal program updates
    num_programs: int
    dtypes: int  # bit (1 << dtype code) per storage dtype present
    aligned: bool  # every parameter, gradient and state starts on a 16-byte boundary


@dataclasses.dataclass(frozen=True)
class _DualPlan:
    block_table: Tensor  # int64 (BLOCK_ROWS, num_blocks)
    sample_owner: Tensor  # int32 (num_programs,): the block each sample program scatters, -1 for none
    num_programs: int
    num_constraints: int  # accumulator slots needed


def _primal_plan(device, anchor, algorithm, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                 steps) -> _PrimalPlan:
    # Addresses, sizes and dtypes are everything the tables encode (a layout change at the same address
    # and size is not detected).  map() over the C methods: this key is built on every call.
    key = (device, anchor.data_ptr(), algorithm,
           *(tuple(map(Tensor.data_ptr, tensors)) for tensors in (params, grads, exp_avgs, exp_avg_sqs,
                                                                  max_exp_avg_sqs, steps)),
           tuple(map(Tensor.numel, params)), tuple(p.dtype for p in params))
    return _primal_plans.get(key, lambda: _build_primal_plan(device, anchor, algorithm, params, grads, exp_avgs,
                                                              exp_avg_sqs, max_exp_avg_sqs, steps))


def _build_primal_plan(device, anchor, algorithm, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                       steps) -> _PrimalPlan:
    from . import triton_kernels as k

    is_adam = algorithm == Algorithm.ADAM
    table = [[0] * len(params) for _ in range(k.TENSOR_ROWS.value)]
    chunks = []
    dtypes = 0
    aligned = True
    first_chunk = 0
    for i, (param, grad) in enumerate(zip(params, grads)):
        state = [exp_avgs[i]] + ([exp_avg_sqs[i], max_exp_avg_sqs[i]] if is_adam else [])
        _check_primal_layout(i, device, param, grad, state)
        code = k.DTYPE_CODES[str(param.dtype).removeprefix("torch.")]
        dtypes |= 1 << code
        rows = (k.TENSOR_PARAM, k.TENSOR_GRAD, k.TENSOR_EXP_AVG, k.TENSOR_EXP_AVG_SQ, k.TENSOR_MAX_EXP_AVG_SQ)
        for row, tensor in zip(rows, (param, grad, *state)):
            table[row.value][i] = _element_offset(tensor, anchor)
            aligned &= tensor.numel() == 0 or tensor.data_ptr() % 16 == 0
        if is_adam:
            step = steps[i]
            if step.device != device or step.dtype != torch.float32 or step.numel() != 1:
                raise ValueError(f"triton backend: steps[{i}] must be a 1-element float32 tensor on {device}")
            table[k.TENSOR_STEP.value][i] = step.data_ptr()
        chunks.append(math.ceil(param.numel() / (PRIMAL_BLOCK * PRIMAL_TILES)))
        table[k.TENSOR_NUMEL.value][i] = param.numel()
        table[k.TENSOR_FIRST_CHUNK.value][i] = first_chunk
        table[k.TENSOR_DTYPE.value][i] = code
        first_chunk += chunks[-1]
    chunk_owner = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32),
                                          torch.tensor(chunks, dtype=torch.int64))
    return _PrimalPlan(_to_device(torch.tensor(table, dtype=torch.int64), device), _to_device(chunk_owner, device),
                       first_chunk, dtypes, aligned)


def _element_offset(tensor: Tensor, anchor: Tensor) -> int:
    """Where ``tensor`` starts, in elements of its dtype from ``anchor`` (how the kernel addresses it)."""
    if tensor.numel() == 0:
        return 0  # never dereferenced
    distance = tensor.data_ptr() - anchor.data_ptr()
    if distance % tensor.element_size():
        raise ValueError(f"triton backend: a {tensor.dtype} tensor is not aligned to its element size")
    return distance // tensor.element_size()


def _check_primal_layout(i: int, device: torch.device, param: Tensor, grad: Tensor, state: list[Tensor]) -> None:
    """Elementwise updates through raw pointers need every tensor of a parameter in one dense layout."""
    from .triton_kernels import DTYPE_CODES

    def fail(message: str) -> None:
        raise ValueError(f"triton backend: parameter {i} (shape {tuple(param.shape)}): {message}; "
                         "use backend='reference' for such tensors")

    if str(param.dtype).removeprefix("torch.") not in DTYPE_CODES:
        fail(f"dtype {param.dtype} is not float32, bfloat16 or float16")
    if param.device != device:
        fail(f"on {param.device}, other tensors on {device}")
    if not is_dense(param):
        fail("not dense (overlapping or gapped strides)")
    for tensor in (grad, *(s for s in state if s.numel() > 0)):
        if tensor.device != device or tensor.dtype != param.dtype or tensor.shape != param.shape:
            fail(f"gradient/state {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} does not match")
        if tensor.stride() != param.stride():
            fail(f"gradient/state strides {tensor.stride()} differ from the parameter's {param.stride()}")


def _dual_plan(device, multipliers, dual_states, ids, violations, dual_flags) -> _DualPlan:
    key = (device, *(tuple(map(Tensor.data_ptr, tensors)) for tensors in (multipliers, dual_states, ids, violations)),
           tuple(map(Tensor.numel, multipliers)), tuple(map(Tensor.numel, ids)), tuple(dual_flags))
    return _dual_plans.get(key, lambda: _build_dual_plan(device, multipliers, dual_states, ids, violations,
                                                          dual_flags))


def _build_dual_plan(device, multipliers, dual_states, ids, violations, dual_flags) -> _DualPlan:
    from . import triton_kernels as k

    table = [[0] * len(multipliers) for _ in range(k.BLOCK_ROWS.value)]
    programs = []
    offset = 0
    first_program = 0
    for j, (lam, state, block_ids, block_violations) in enumerate(zip(multipliers, dual_states, ids, violations)):
        if lam.dtype != torch.float32 or not lam.is_contiguous() or lam.device != device:
            raise ValueError(f"triton backend: multipliers[{j}] must be contiguous float32 on {device}")
        num_rows, sum_row = dual_state_rows(dual_flags[j])
        if not dual_flags[j] & DualFlag.FROZEN and num_rows and (
                state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != num_rows * lam.numel()):
            raise ValueError(f"triton backend: dual_states[{j}] must be contiguous float32 with {num_rows} rows of "
                             f"{lam.numel()} (the state its flags ask for)")
        if block_ids.shape != block_violations.shape or block_ids.dim() != 1 or block_ids.device != device:
            raise ValueError(f"triton backend: ids[{j}] and violations[{j}] must be 1-D, equal length, on {device}")
        rows = (k.BLOCK_MULTIPLIERS, k.BLOCK_DUAL_STATE, k.BLOCK_IDS, k.BLOCK_VIOLATIONS)
        for row, tensor in zip(rows, (lam, state, block_ids, block_violations)):
            table[row.value][j] = tensor.data_ptr()
        if dual_flags[j] & DualFlag.RUNNING and state.numel():
            row_bytes = lam.numel() * state.element_size()
            table[k.BLOCK_RUNNING_SUMS.value][j] = state.data_ptr() + sum_row * row_bytes
            table[k.BLOCK_RUNNING_COUNTS.value][j] = state.data_ptr() + (sum_row + 1) * row_bytes
        programs.append(math.ceil(block_ids.numel() / SAMPLE_BLOCK))
        table[k.BLOCK_NUM_SAMPLES.value][j] = block_ids.numel()
        table[k.BLOCK_FIRST_PROGRAM.value][j] = first_program
        table[k.BLOCK_ACCUMULATOR_OFFSET.value][j] = offset
        first_program += programs[-1]
        offset += lam.numel()
    sample_owner = torch.repeat_interleave(torch.arange(len(multipliers), dtype=torch.int32),
                                           torch.tensor(programs, dtype=torch.int64))
    if multipliers and first_program == 0:
        # Every block is empty: one program still runs, so that the statistics get written (zeros).
        sample_owner = torch.full((1,), -1, dtype=torch.int32)
    return _DualPlan(_to_device(torch.tensor(table, dtype=torch.int64), device), _to_device(sample_owner, device),
                     sample_owner.numel(), offset)


def _primal_settings(device: torch.device, hparams: Tensor, flags: list[int]) -> Tensor:
    return _settings(device, "primal", hparams, flags, _primal_settings_table)


def _dual_settings(device: torch.device, hparams: Tensor, flags: list[int]) -> Tensor:
    return _settings(device, "dual", hparams, flags, _dual_settings_table)


def _settings(device: torch.device, kind: str, hparams: Tensor, flags: list[int],
              table: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The kernel's float64 settings: contract.py's hyperparameters, values derived from them, the flags.

    A CPU hparams tensor is read on the host: its table is cached by value and uploaded when the values
    change.  An hparams tensor on the device (a capturable step's, updated in place) is never read on the
    host: its table is derived there at every call, so a CUDA graph replays with the current values.
    """
    if hparams.device.type == "cpu":
        return _settings_tables.get((kind, device, tuple(hparams.tolist()), tuple(flags)),
                                    lambda: _to_device(table(hparams, torch.tensor(flags, dtype=torch.float64)), device))
    flag_column = _settings_tables.get((kind, "flags", device, tuple(flags)),
                                       lambda: _to_device(torch.tensor(flags, dtype=torch.float64), device))
    return table(hparams, flag_column)


def _primal_settings_table(hparams: Tensor, flags: Tensor) -> Tensor:
    """Rows of PRIMAL_SETTINGS: the kernel's P_* columns (the derived ones in float64, as Python computed them)."""
    hp = hparams.view(-1, PRIMAL_HPARAMS)
    lr, beta1, beta2, weight_decay = (hp[:, slot] for slot in (PrimalSlot.LR, PrimalSlot.BETA1, PrimalSlot.BETA2,
                                                               PrimalSlot.WEIGHT_DECAY))
    return torch.cat([hp, torch.stack([1 - beta1, 1 - beta2, 1 - lr * weight_decay, flags], dim=1)], dim=1)


def _dual_settings_table(hparams: Tensor, flags: Tensor) -> Tensor:
    """Rows of DUAL_SETTINGS: contract.DualSlot's values first (the kernel's D_* columns), then what the kernel
    derives."""
    hp = hparams.view(-1, DUAL_HPARAMS)
    return torch.cat([hp, torch.stack([1 - hp[:, DualSlot.NU], flags], dim=1)], dim=1)


# --------------------------------------------------------------------------------------------------
# Accumulator workspace: zero between launches (the finaliser clears what the scatter touched).


@dataclasses.dataclass
class _Workspace:
    accumulators: Tensor  # int32, ACCUMULATOR_WORDS per constraint slot
    tickets: Tensor  # int32 (TICKETS,), see triton_kernels.py


_workspaces: dict[tuple, _Workspace] = {}


def _workspace(device: torch.device, num_constraints: int) -> _Workspace:
    from .triton_kernels import ACCUMULATOR_WORDS, TICKETS

    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    workspace = _workspaces.get(key)
    words = ACCUMULATOR_WORDS.value * max(num_constraints, 1)
    if workspace is None:
        workspace = _workspaces[key] = _Workspace(torch.zeros(words, dtype=torch.int32, device=device),
                                                  torch.zeros(TICKETS.value, dtype=torch.int32, device=device))
    elif workspace.accumulators.numel() < words:
        workspace.accumulators = torch.zeros(words, dtype=torch.int32, device=device)
    return workspace


register(Backend("triton", unavailable_reason, load_fused_step, build_status))
