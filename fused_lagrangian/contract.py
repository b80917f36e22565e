"""The one kernel contract every backend implements.

``fused_step`` updates, in place and in one call, every parameter tensor of an optimizer and every
constraint block's multipliers. All backends take exactly these arguments; the reference backend
(``backends/reference.py``) defines what they mean and the tests hold every fast backend to it.

Primal side, one entry per parameter tensor ``i`` (lists aligned with ``params``):

    params[i], grads[i]     parameter and its gradient (fp32, fp16 or bf16; math in fp32), dense, the
                            gradient and state in the parameter's strides; the reference also takes other
                            layouts and float64 / complex (in their own precision): see layouts.py
    exp_avgs[i]             Adam: first moment.  SGD: momentum buffer (numel 0 when momentum == 0)
    exp_avg_sqs[i]          Adam: second moment. SGD: the list is empty
    max_exp_avg_sqs[i]      Adam: running max of the second moment (numel 0 without amsgrad). SGD: empty
    steps[i]                Adam: 0-dim float32 step count, incremented by the call. SGD: empty
    primal_hparams          1-D float64 tensor, PRIMAL_HPARAMS values per tensor: lr, beta1|momentum,
                            beta2|dampening, eps, weight_decay (a tensor, so that a scheduler's tensor
                            lr reaches the kernel without a host read; ``hparams_tensor`` builds it).
                            On the CPU, or on a CUDA step's device: the CUDA kernel then reads it there,
                            so a CUDA graph replays with the values it holds (capturable steps; the
                            native CUDA kernel takes SGD's on the CPU, where momentum decides the state)
    primal_flags            one int per tensor, a bitmask of the PrimalFlag bits
    algorithm               Algorithm.SGD or Algorithm.ADAM

Dual side, one entry per constraint block ``j`` with K_j constraints:

    multipliers[j]          (K_j,) fp32 multipliers
    dual_states[j]          (R_j, K_j) contiguous fp32 per-constraint dual state, one row per quantity
                            the flags ask for, in this order (``dual_state_rows``):
                              NUPI     the smoothed errors xi (named smoothed_errors in every backend)
                              RUNNING  S, the running violation sum, then N, the running sample count
                            numel 0 when R_j = 0; a (K_j,) tensor stands for (1, K_j); not read
                            with FROZEN
    ids[j]                  (B_j,) int64 constraint id of each pending sample, duplicates allowed; -1 marks
                            padding, an entry that is no sample (what a grouped block records for the
                            empty slots of (B, M) memberships: a static shape), and is ignored
    violations[j]           (B_j,) fp32 per-sample violation e_i = s * (v_i - bound), already signed
    dual_hparams            1-D float64 tensor, DUAL_HPARAMS values per block: lr, kp, ki, nu, damping,
                            lower, upper, decay; on the CPU or the step's device, as primal_hparams
    dual_flags              one int per block, a bitmask of the DualFlag bits

For each block, only the constraints k that occur in ids[j] ("touched") change (padding touches none):

    sum_k, n_k = sum of e_i over samples with id k, their number
    g_k  = sum_k                                       (MEAN flag: sum_k / n_k)
    frozen (FROZEN flag): nothing below is applied, g_k only feeds the statistics
    running (RUNNING flag): S_k <- decay * S_k + sum_k;  N_k <- decay * N_k + n_k;  g_k = S_k / N_k
                       (an exponentially weighted ratio estimate of the constraint's mean violation:
                       pooled over steps, so a group with one or two samples per batch still gets a
                       low-variance estimate; S = N = 0 initially, so the first step uses the batch)
    nuPI (NUPI flag):  xi_new = nu * xi_k + (1 - nu) * g_k
                       d_k    = ki * g_k + kp * (xi_new - xi_k);   xi_k <- xi_new
    ascent:            d_k    = g_k
    lambda_k <- clamp(lambda_k + lr * (d_k - damping * lambda_k), lower, upper)
    RESTART flag and g_k <= 0:  lambda_k <- 0

Every rule, the running estimate included, reads and writes touched constraints only: O(batch) work.
nuPI starts from xi = 0 (Cooper's ``nuPIInitType.ZEROS``), so its first step is ascent with rate
lr * (ki + kp * (1 - nu)).  Untouched constraints and their state stay bitwise unchanged.

``grad_scale`` (optional 1-element fp32) divides the primal gradients; ``found_inf`` (optional
1-element fp32) nonzero skips the whole call: no parameter, state, step or multiplier changes.

Returns a (num_blocks, 3) fp32 tensor of statistics over the touched constraints of each block:
number touched, max violation measure, number with a positive measure, where the measure is
max(g_k, 0) for inequality blocks (lower == 0) and |g_k| for equality blocks.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor


class PrimalSlot(enum.IntEnum):
    """Where each primal hyperparameter sits in a tensor's PRIMAL_HPARAMS values."""

    LR = 0
    BETA1 = 1  # SGD: momentum
    BETA2 = 2  # SGD: dampening
    EPS = 3  # SGD: unused
    WEIGHT_DECAY = 4


class DualSlot(enum.IntEnum):
    """Where each dual hyperparameter sits in a block's DUAL_HPARAMS values."""

    LR = 0
    KP = 1
    KI = 2
    NU = 3
    DAMPING = 4
    LOWER = 5
    UPPER = 6
    DECAY = 7  # running estimator: weight of the past in S and N


PRIMAL_HPARAMS = len(PrimalSlot)
PADDING_ID = -1  # an entry of ids that is no sample
DUAL_HPARAMS = len(DualSlot)
STATS_COLUMNS = 3


class FusedStepArguments(NamedTuple):
    """The argument layout of ``fused_step``, in order: every backend's signature and the operator schema
    (csrc/fused_step.cpp) spell exactly these names (tests/test_contract.py checks it)."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    primal_hparams: Tensor
    primal_flags: list[int]
    algorithm: int
    multipliers: list[Tensor]
    dual_states: list[Tensor]
    ids: list[Tensor]
    violations: list[Tensor]
    dual_hparams: Tensor
    dual_flags: list[int]
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None


class Algorithm(enum.IntEnum):
    SGD = 0
    ADAM = 1


class PrimalFlag(enum.IntFlag):
    AMSGRAD = 1
    MAXIMIZE = 2
    NESTEROV = 4
    DECOUPLED_WEIGHT_DECAY = 8
    # SGD's momentum buffer is seeded with the first gradient, as torch.optim.SGD does.
    FIRST_MOMENTUM_STEP = 16


class DualFlag(enum.IntFlag):
    MEAN = 1
    NUPI = 2
    RESTART = 4
    FROZEN = 8
    RUNNING = 16


def is_dense(tensor: Tensor) -> bool:
    """What "dense" means above: non-overlapping and without gaps, contiguous in some order of the dimensions
    (size-1 ones aside), so an elementwise kernel can walk the storage in memory order."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda dim: dim[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def dual_state_rows(flags: int) -> tuple[int, int]:
    """(rows of a block's dual state, row of the running sum S; the count N is the next row)."""
    smoothed = 1 if flags & DualFlag.NUPI else 0
    running = 2 if flags & DualFlag.RUNNING else 0
    return smoothed + running, smoothed


_FLOAT_TABLES: dict[tuple, Tensor] = {}
_PLAIN_NUMBERS = frozenset((float, int))


def hparams_tensor(values: Union[Tensor, Sequence[Union[float, Tensor]]]) -> Tensor:
    """The float64 CPU tensor of hyperparameters ``fused_step`` takes, from floats and 0-dim tensors.

    Tensor entries (a scheduler's lr, updated in place) are copied in by tensor ops, never read on the
    host: traced by torch.compile, a new value is data, not a recompile.
    """
    if isinstance(values, Tensor):
        return values
    # All plain numbers (the usual case) is decided by one set test: a scan with isinstance costs more
    # than the rest of a small step's dual part.
    positions = [] if _PLAIN_NUMBERS.issuperset(map(type, values)) else [
        i for i, value in enumerate(values) if isinstance(value, Tensor)]
    if not positions:
        if torch.compiler.is_compiling():
            return torch.tensor(values, dtype=torch.float64)
        # Eager steps pass the same floats step after step: reuse their tensor (kernels only read it).
        key = tuple(values)
        table = _FLOAT_TABLES.get(key)
        if table is None:
            if len(_FLOAT_TABLES) >= 64:
                _FLOAT_TABLES.clear()
            table = _FLOAT_TABLES[key] = torch.tensor(values, dtype=torch.float64)
        return table
    table = torch.tensor([0.0 if isinstance(value, Tensor) else value for value in values], dtype=torch.float64)
    entries = torch.stack([values[i].detach().reshape(()).to("cpu", torch.float64) for i in positions])
    return table.index_put_((torch.tensor(positions),), entries)
