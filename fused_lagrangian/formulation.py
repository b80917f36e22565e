"""The forward path of a constraint block: from this batch's values to its loss term and dual estimate.

One path for every kind, formulation and world size:

    values, ids  -> static checks (shapes, dtypes, devices; raise at once)
                 -> entries: one per (sample, constraint) membership; a grouped sample may have several
                 -> signed violation per entry  e = s * (v - [overall mean] - b_k), in fp32 or wider
                 -> data checks (ids in range, finite violations): an error code, see validation.py
                 -> the loss term: Lagrangian  sum_e w_e lambda_k e  (w = 1, or W / N_k for grouped),
                    augmented / penalty / quadratic  f(lambda_k, g_k) of the per-constraint estimates
                 -> what the step consumes: (entry ids, fp32 dual violations, error code)

Everything that involves other processes goes through a ``Reduction``: ``LocalReduction`` (one process,
no communication) or the data-parallel one of ``distributed.py``, which only communicates.  With W
ranks whose gradients are averaged (DDP), the term's gradient is W times this rank's share of the
global batch's gradient, and its value an estimate whose mean over the ranks is the global term:

* indexed: W x the local term (an id is seen by one rank per step with DistributedSampler);
* grouped: weights W / N_k with N_k the global count of group k; ``to_overall`` adds the gradient
  of the global mean, which every rank's samples feed;
* dense: a rank's values are its estimate of the constraint; the global estimate is the mean over
  the ranks, which is what the dual update sees and what the averaged gradient of the local term is;
* other formulations of grouped and dense blocks: the penalty of the global estimate.

Nothing here is O(K): group counts and sums come from ``grouping.segments`` (O(batch), static shapes).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, Union

import torch
from torch import Tensor

from .grouping import segments
from .ops import lagrangian_term
from .ops.grouped_forward import grouped_forward
from .validation import (ERROR_IDS_OUT_OF_RANGE, ERROR_NONFINITE, ConstraintInputError, fail, host_verdict,
                         ids_error, nonfinite_error, nonfinite_message, raise_for_code)

SENSE_SIGNS = {"<=": 1.0, ">=": -1.0, "==": 1.0}
_ID_DTYPES = (torch.int64, torch.int32)


class Reduction(Protocol):
    """How a block call sees the other ranks' samples (one process: it sees none)."""

    world_size: int
    is_local: bool

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks of a small float64 tensor."""

    def group_totals(self, ids: Tensor, num_constraints: int, dtype: torch.dtype,
                     values: Optional[Tensor] = None, padded: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """For each local entry: (entries with its id, sum of ``values`` over them), over all ranks.
        ``padded``: ids may be -1 (``grouping.segments``)."""

    def agree(self, status: Tensor) -> Tensor:
        """The sum over ranks of the [invalid, non-finite, ...] status vector, read on the host."""

    def gather_pending(self, pending: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Every rank's recorded (ids, violations) of each block, the same lists on every rank."""


class LocalReduction:
    world_size = 1
    is_local = True

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def group_totals(self, ids, num_constraints, dtype, values=None, padded=False):
        groups = segments(ids, num_constraints, dtype, with_ids=False, padded=padded)
        return groups.per_entry(groups.counts), None if values is None else groups.per_entry(groups.sums(values))

    def agree(self, status: Tensor) -> Tensor:
        return status

    def gather_pending(self, pending):
        return pending


LOCAL = LocalReduction()


@dataclasses.dataclass
class BlockContext:
    """What a block's owner (the optimizer) hands it: the block never reaches into the optimizer."""

    reduction: Callable[[], Reduction]  # for calls that record (grad enabled, or observe)
    deferred_checks: Callable[[torch.device], bool]  # validation.is_deferred with the owner's mode
    uses_triton: Callable[[torch.device], bool]  # the resolved backend's choice for the term op
    native_forward: Callable[[torch.device], bool]  # the resolved backend has the fused grouped forward op
    recorded: Callable[[object, "Recording"], None]  # after a block recorded a call (dual-first steps here)


@dataclasses.dataclass
class Recording:
    """What a call hands to the step: entry ids (owned, int64), fp32 signed dual violations, error code."""

    ids: Tensor
    violations: Tensor
    error: Optional[Tensor]  # 0-dim int32 on the device in deferred mode, else None (checked already)


@dataclasses.dataclass
class Measured:
    """A validated call: what the step consumes, and what its loss term needs."""

    recording: Recording
    primal: Tensor  # the values in the compute dtype (fp32 or wider)
    violations: Tensor  # signed, differentiable, one per entry
    ids: Tensor  # one per entry, in range, or -1 where padded
    padded: bool  # (B, M) ids: entries of -1 (padding) carry violation 0


class Formulation:
    """One block's forward math; built once from its spec, holds no optimizer state."""

    def __init__(self, name: str, kind: str, num_constraints: int, sense: str, formulation: str, penalty: float,
                 to_overall: bool, nonfinite: str, bound: Union[float, Tensor], device: torch.device) -> None:
        self.name, self.kind, self.num_constraints = name, kind, num_constraints
        self.sign = SENSE_SIGNS[sense]
        self.is_equality = sense == "=="
        self.formulation, self.penalty, self.to_overall = formulation, penalty, to_overall
        self.skip_nonfinite = nonfinite == "skip"
        self.bound = bound
        # The fused op's form of the bound: one per constraint, or a scalar.
        self._bound_rows = bound if isinstance(bound, Tensor) else None
        self._bound_scalar = 0.0 if isinstance(bound, Tensor) else float(bound)
        self.dense_ids = torch.arange(num_constraints, device=device) if kind == "dense" else None
        self.device = device

    # ----------------------------------------------------------------------------------------------

    def fail(self, message: str):
        fail(self.name, self.kind, message)

    def entries(self, values: Tensor, ids: Optional[Tensor],
                dual_values: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], int]:
        """Static checks; (entry ids, the caller's ids to range-check (None for dense), lowest valid id)."""
        self.check_static(values, ids, dual_values)
        if self.kind == "dense":
            return self.dense_ids, None, 0
        return ids.long(), ids, -1 if ids.dim() == 2 else 0

    def check_static(self, values: Tensor, ids: Optional[Tensor], dual_values: Optional[Tensor]) -> None:
        """Types, shapes and devices: metadata only, raise ConstraintInputError at once."""
        # Run at every call: each tensor's device and shape are read once (every read builds an object).
        if not isinstance(values, Tensor) or not values.is_floating_point():
            self.fail(f"values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}")
        device, shape = values.device, values.shape
        if device != self.device:
            self.fail(f"values are on {device} but the multipliers are on {self.device}")
        if self.kind == "dense":
            if shape != (self.num_constraints,):
                self.fail(f"values must have shape ({self.num_constraints},), got {tuple(shape)}")
            if ids is not None:
                self.fail("dense blocks take no ids")
        else:
            if len(shape) != 1:
                self.fail(f"values must be 1-D (one per sample), got shape {tuple(shape)}")
            if ids is None:
                self.fail("ids are required (one constraint id per sample)")
            if not isinstance(ids, Tensor) or ids.dtype not in _ID_DTYPES:
                self.fail(f"ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids))}")
            ids_shape = ids.shape
            if ids_shape != shape and not (self.kind == "grouped" and len(ids_shape) == 2 and ids_shape[0] == shape[0]):
                self.fail(f"ids shape {tuple(ids_shape)} does not match values shape {tuple(shape)}"
                          + (" (or (B, M) group ids padded with -1)" if self.kind == "grouped" else ""))
            if ids.device != device:
                self.fail(f"ids are on {ids.device} but the multipliers are on {self.device}")
        if dual_values is not None:
            if not isinstance(dual_values, Tensor) or not dual_values.is_floating_point():
                self.fail("dual_values must be a floating-point tensor")
            if dual_values.shape != shape or dual_values.device != device:
                self.fail(f"dual_values must match values (shape {tuple(shape)}, device {device})")

    @staticmethod
    def memberships(ids: Tensor) -> tuple[Tensor, Tensor]:
        """(group id, sample) of each slot of (B, M) ids, in row order, padding (-1) included: kept rather
        than dropped (a data-dependent size: a host sync on accelerators, a graph break in compile), it
        carries violation 0 (``signed``), counts in no group (``grouping.segments``), and the step
        ignores it (contract.PADDING_ID)."""
        samples = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        return ids.reshape(-1), samples.reshape(-1)

    # ----------------------------------------------------------------------------------------------

    def measure(self, values: Tensor, ids: Optional[Tensor], dual_values: Optional[Tensor], reduction: Reduction,
                deferred: bool) -> Optional[Measured]:
        """Checks and signed violations of a call; None when it is dropped (non-finite, nonfinite="skip")."""
        local = reduction.is_local
        try:
            entry_ids, given_ids, lowest_id = self.entries(values, ids, dual_values)
        except ConstraintInputError as error:
            if local:
                raise
            self._agree(reduction, error=error)
            raise  # _agree raises on every rank; here for the type checker
        samples = None
        if given_ids is not None:
            multiple = given_ids.dim() == 2
            # An id out of range must not index anything before the checks' verdict: clamp it where
            # indexing comes first (the verdict then raises, or makes the step skip).
            if deferred or not local or multiple or isinstance(self.bound, Tensor):
                entry_ids = entry_ids.clamp(lowest_id, self.num_constraints - 1)
            if multiple:
                entry_ids, samples = self.memberships(entry_ids)
        compute_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        primal = values.to(compute_dtype)
        dual = None if dual_values is None else dual_values.detach().to(compute_dtype)
        overall = dual_overall = None
        if self.to_overall:
            overall, dual_overall = self._overall_means(reduction, primal, dual)
        violations = self.signed(primal, entry_ids, samples, overall)
        recorded = (violations.detach() if dual is None else self.signed(dual, entry_ids, samples, dual_overall)).float()
        checked = [recorded] if dual is None else [recorded, violations.detach()]
        if overall is not None and not local:
            # The global mean is non-finite on every rank when one rank's values are: check before it.
            checked = [self.signed(t.detach(), entry_ids, samples, None).float() for t in (primal, dual) if t is not None]
        if local and not deferred:
            code = None
            verdict = host_verdict(checked, given_ids, lowest_id, self.num_constraints)
            if verdict:
                if verdict == ERROR_NONFINITE and self.skip_nonfinite:
                    return None
                raise_for_code(self.name, self.kind, verdict, self.num_constraints, given_ids)
        else:
            code = nonfinite_error(checked)
            if given_ids is not None:
                code = code + ids_error(given_ids, lowest_id, self.num_constraints)
            if not local:
                if self._agree(reduction, code=code):
                    return None
                code = None
        # Recorded ids must not alias the caller's buffer: reusing it before step() must not redirect the update.
        owned_ids = entry_ids.clone() if entry_ids is ids else entry_ids
        return Measured(Recording(owned_ids, recorded, code), primal, violations, entry_ids, samples is not None)

    def uses_fused_forward(self) -> bool:
        """Whether ``fused_forward`` computes this block's calls (when the backend has the op, one process)."""
        return self.formulation == "lagrangian" and self.kind == "grouped"

    def fused_forward(self, values: Tensor, ids: Optional[Tensor], dual_values: Optional[Tensor], multipliers: Tensor,
                      deferred: bool) -> Optional[tuple[Recording, Tensor]]:
        """``measure`` then ``term`` of a grouped Lagrangian call in one process, as one native op.

        The same semantics as the torch path (tests/test_fused_forward.py holds it to it), at O(batch)
        whatever K: groups come from a hash table sized by the batch instead of a sort.  The term uses
        the multipliers as they are at the call (blocks that update them in the call use the torch path).
        """
        self.check_static(values, ids, dual_values)
        # No gradient reaches dual_values: the op's autograd gives none to any input but the values.
        term, _, entry_ids, recorded, code = grouped_forward(
            values, ids, dual_values, multipliers, self._bound_rows, self._bound_scalar, self.sign, self.to_overall)
        if not deferred:
            verdict = int(code)
            if verdict:
                if verdict == ERROR_NONFINITE and self.skip_nonfinite:
                    return None
                raise_for_code(self.name, self.kind, verdict, self.num_constraints, ids)
            code = None
        return Recording(entry_ids, recorded, code), term

    def _agree(self, reduction: Reduction, code: Optional[Tensor] = None,
               error: Optional[ConstraintInputError] = None) -> bool:
        """Data parallelism: every rank learns whether any rank's input was invalid or non-finite.

        Raises on every rank when one is invalid (or non-finite and the policy is to raise); returns
        True when the call is to be skipped on every rank.
        """
        if code is None:
            status = torch.tensor([1.0, 0.0], dtype=torch.float64, device=self.device)
        else:
            status = torch.stack([(code & ERROR_IDS_OUT_OF_RANGE) > 0, (code & ERROR_NONFINITE) > 0]).double()
        invalid_ranks, nonfinite_ranks = (int(x) for x in reduction.agree(status).tolist())
        if invalid_ranks:
            if error is not None:
                raise error
            if status[0] > 0:
                raise_for_code(self.name, self.kind, ERROR_IDS_OUT_OF_RANGE, self.num_constraints)
            self.fail(f"invalid input on {invalid_ranks} other rank(s)")
        if nonfinite_ranks:
            if not self.skip_nonfinite:
                self.fail(nonfinite_message(f" on {nonfinite_ranks} of {reduction.world_size} ranks"))
            return True
        return False

    # ----------------------------------------------------------------------------------------------
    # Violations

    def signed(self, values: Tensor, ids: Tensor, samples: Optional[Tensor], overall: Optional[Tensor]) -> Tensor:
        """s * (v - overall - b_k) for each entry; 0 for padding (``memberships``)."""
        if overall is not None:
            values = values - overall
        if samples is not None:
            values = values[samples]
        bound = self.bound[ids] if isinstance(self.bound, Tensor) else self.bound
        return self._without_padding(bound - values if self.sign < 0 else values - bound, ids, samples is not None)

    @staticmethod
    def _without_padding(per_entry: Tensor, ids: Tensor, padded: bool) -> Tensor:
        """``per_entry`` with 0 for the padding entries (id -1) of (B, M) ids: they add nothing anywhere."""
        return torch.where(ids >= 0, per_entry, 0.0) if padded else per_entry

    def _overall_means(self, reduction: Reduction, primal: Tensor,
                       dual: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The batch mean of the values (over samples, not memberships): differentiable when local."""
        if reduction.is_local:
            return primal.mean(), None if dual is None else dual.mean()
        sums = torch.stack([primal.detach().sum(dtype=torch.float64),
                            primal.new_zeros((), dtype=torch.float64) if dual is None else dual.sum(dtype=torch.float64),
                            torch.tensor(float(primal.numel()), dtype=torch.float64, device=primal.device)])
        totals = reduction.sum(sums)
        mean = (totals[0] / totals[2]).to(primal.dtype)
        return mean, None if dual is None else (totals[1] / totals[2]).to(primal.dtype)

    # ----------------------------------------------------------------------------------------------
    # Loss terms

    def term(self, measured: Measured, multipliers: Tensor, reduction: Reduction, uses_triton: bool) -> Tensor:
        """The block's loss term for the multipliers as they are now (dual-first: after this call's update)."""
        primal, violations, ids = measured.primal, measured.violations, measured.ids
        world = reduction.world_size
        if self.formulation == "lagrangian":
            if self.kind == "dense":
                return lagrangian_term(violations, ids, multipliers, use_triton=uses_triton)
            if self.kind == "indexed":
                term = lagrangian_term(violations, ids, multipliers, use_triton=uses_triton)
                return term if world == 1 else world * term
            counts, _ = reduction.group_totals(ids, self.num_constraints, violations.dtype, padded=measured.padded)
            weights = counts.reciprocal() if world == 1 else world / counts
            # Padding's multiplier: any in range (its violation is 0); Triton's gather does not wrap -1 as torch's.
            gathered_ids = ids.clamp(min=0) if measured.padded else ids
            term = lagrangian_term(violations, gathered_ids, multipliers, weights, use_triton=uses_triton)
            if self.to_overall and not reduction.is_local:
                slopes = self._without_padding(multipliers.detach()[ids].to(counts.dtype), ids, measured.padded)
                term = term + self._overall_mean_gradient(reduction, primal, (slopes / counts).sum())
            return term
        if self.kind == "indexed":
            groups = segments(ids, self.num_constraints, violations.dtype)
            g = groups.sums(violations)
            term = self.penalty_values(multipliers.detach()[groups.ids].to(g.dtype), g).sum()
            return term if world == 1 else world * term
        if reduction.is_local:
            if self.kind == "dense":
                return self.penalty_values(multipliers.detach().to(violations.dtype), violations).sum()
            groups = segments(ids, self.num_constraints, violations.dtype, padded=measured.padded)
            g = groups.sums(violations) / groups.counts.clamp(min=1)
            return self.penalty_values(multipliers.detach()[groups.ids].to(g.dtype), g).sum()
        return self._global_penalty(primal, violations, ids, multipliers, reduction, measured.padded)

    def _global_penalty(self, primal: Tensor, violations: Tensor, ids: Tensor, multipliers: Tensor,
                        reduction: Reduction, padded: bool) -> Tensor:
        """Data parallel: the penalty of the global estimates; its gradient is W x this rank's share."""
        world = reduction.world_size
        lam = multipliers.detach()[ids].to(violations.dtype)
        if self.kind == "dense":
            local = violations.detach().double()
            estimate = (reduction.sum(local) / world).to(violations.dtype) + (violations - violations.detach()) / world
            term = self.penalty_values(lam, estimate).sum()
            return term.detach() + world * (term - term.detach())
        global_counts, global_sums = reduction.group_totals(ids, self.num_constraints, violations.dtype,
                                                            violations.detach(), padded)
        groups = segments(ids, self.num_constraints, violations.dtype, padded=padded)
        local_sums = groups.per_entry(groups.sums(violations))
        local_counts = groups.per_entry(groups.counts)
        g = global_sums / global_counts + (local_sums - local_sums.detach()) / global_counts
        per_entry = self.penalty_values(lam, g)
        # Value: each group once over all ranks (its entries here weigh n_here / N); gradient: once per rank.
        value = world * (per_entry.detach() / global_counts).sum()
        carrier = (per_entry / local_counts).sum()
        term = value + world * (carrier - carrier.detach())
        if self.to_overall:
            slopes = self._without_padding(self.penalty_slopes(lam, g.detach()), ids, padded)
            term = term + self._overall_mean_gradient(reduction, primal, (slopes / global_counts).sum())
        return term

    def _overall_mean_gradient(self, reduction: Reduction, primal: Tensor, local_slope_sum: Tensor) -> Tensor:
        """Zero-valued term with the gradient of the global mean in sum_k f(g_k), g_k = s (mean_k - mean - b_k).

        d/dv_i of the mean part is -s sum_{k touched} f'(g_k) / N over every rank's groups: this
        rank's entries give sum_e f'(g_e) / N_e, the reduction the sum over ranks.
        """
        local = torch.stack([local_slope_sum.detach().double(),
                             torch.tensor(float(primal.numel()), dtype=torch.float64, device=primal.device)])
        total_slope, count = reduction.sum(local)
        local_sum = primal.sum()
        scale = (-self.sign * reduction.world_size * total_slope / count).to(primal.dtype)
        return scale * (local_sum - local_sum.detach())

    def penalty_values(self, lam: Tensor, g: Tensor) -> Tensor:
        """The non-Lagrangian formulations' term of each constraint with estimate g and multiplier lam."""
        c = self.penalty
        if self.formulation == "penalty":
            return c * g
        if self.formulation == "quadratic":
            excess = g if self.is_equality else torch.relu(g)
            return 0.5 * c * excess * excess
        # Augmented Lagrangian, Nocedal & Wright (17.64-65).
        if self.is_equality:
            return lam * g + 0.5 * c * g * g
        return (torch.relu(lam + c * g) ** 2 - lam * lam) / (2 * c)

    def penalty_slopes(self, lam: Tensor, g: Tensor) -> Tensor:
        """d penalty_values / d g."""
        c = self.penalty
        if self.formulation == "penalty":
            return torch.full_like(g, c)
        if self.formulation == "quadratic":
            return c * (g if self.is_equality else torch.relu(g))
        if self.is_equality:
            return lam + c * g
        return torch.relu(lam + c * g)
