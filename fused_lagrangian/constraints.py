"""Constraint blocks: the user's vocabulary.

A block is a set of K constraints of one kind that share a sense, a formulation and a dual rule:

    dense    K constraints, all measured every step:         values (K,)
    indexed  one constraint per sample id (e.g. per row):   values (B,), ids (B,) in [0, K), duplicates summed
    grouped  one constraint per group:                       values (B,), ids (B,) in [0, K), mean per group

Calling a block records the (detached) per-sample violations for the next ``step()`` and returns the
term the block adds to the loss.  The multipliers live in the block; the optimizer's ``step()`` moves
them, together with the parameters, in one call of the backend's ``fused_step``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Optional, Union

import torch
from torch import Tensor

from .contract import DualFlag, dual_state_rows
from .formulation import LOCAL, SENSE_SIGNS, BlockContext, Formulation, Recording
from .memory import available_bytes, constraint_state
from .touched import TRACK_FROM, TouchedConstraints, multiplier_summary
from .validation import ERROR_NONFINITE, ConstraintInputError, raise_for_code

__all__ = ["ConstraintBlock", "ConstraintInputError", "ConstraintSpec"]

KINDS = ("dense", "indexed", "grouped")
SENSES = tuple(SENSE_SIGNS)
FORMULATIONS = ("lagrangian", "augmented", "penalty", "quadratic")
DUAL_RULES = ("ascent", "nupi")
ESTIMATORS = ("batch", "running")
# Dual options a block gets when they are left unset (None), by kind; bench/dual_sensitivity.py measures
# the grouped defaults against the alternatives.  Grouped blocks see each group through a few samples per
# batch: a running estimate pools them over steps, and nuPI's proportional term (kp ~ twice the estimate's
# memory of 1 / (1 - decay) observations) damps the oscillation that the estimate's lag would cause.
# Dense and indexed blocks keep plain projected ascent on this step's values.
DUAL_DEFAULTS = {
    "grouped": dict(dual_rule="nupi", kp=20.0, estimator="running"),
    "dense": dict(dual_rule="ascent", kp=0.0, estimator="batch"),
    "indexed": dict(dual_rule="ascent", kp=0.0, estimator="batch"),
}
ORDERINGS = ("simultaneous", "dual_first")
NONFINITE_POLICIES = ("raise", "skip")
# ConstraintSpec.dual_flags's bits as plain ints.
_MEAN_FLAG, _NUPI_FLAG, _RESTART_FLAG, _FROZEN_FLAG, _RUNNING_FLAG = (
    flag.value for flag in (DualFlag.MEAN, DualFlag.NUPI, DualFlag.RESTART, DualFlag.FROZEN, DualFlag.RUNNING))


@dataclasses.dataclass
class ConstraintSpec:
    """Everything that defines a block; validated once at ``add_constraint``."""

    name: str
    kind: str
    num_constraints: int
    sense: str = "<="
    bound: Union[float, Tensor] = 0.0
    dual_lr: float = 1e-2
    formulation: str = "lagrangian"
    penalty: float = 1.0  # c of the augmented Lagrangian and of the penalty baselines
    dual_rule: Optional[str] = None  # None: DUAL_DEFAULTS of the kind
    kp: Optional[float] = None  # None: DUAL_DEFAULTS of the kind
    ki: float = 1.0
    nu: float = 0.0
    max_multiplier: float = math.inf
    damping: float = 0.0
    restart_on_feasible: bool = False
    # "dual_first": the multipliers move at the block call, so an iteration GradScaler then skips still
    # moves them (their violations come from the forward values, not the overflowing gradients).
    ordering: str = "simultaneous"
    to_overall: bool = False
    nonfinite: str = "raise"
    init: float = 0.0
    # What the dual rule reads as g_k: this step's batch estimate, or a running (exponentially weighted,
    # decay ``estimate_decay`` per step in which the constraint is observed) ratio estimate S_k / N_k.
    estimator: Optional[str] = None  # None: DUAL_DEFAULTS of the kind
    estimate_decay: float = 0.9

    def __post_init__(self) -> None:
        self._apply_dual_defaults()

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"constraint block {self.name!r}: {message}")

        check(isinstance(self.name, str) and bool(self.name), "the name must be a non-empty string")
        check(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        check(self.sense in SENSES, f"sense must be one of {tuple(SENSES)}, got {self.sense!r}")
        check(self.formulation in FORMULATIONS, f"formulation must be one of {FORMULATIONS}")
        check(self.dual_rule in DUAL_RULES, f"dual_rule must be one of {DUAL_RULES}")
        check(self.ordering in ORDERINGS, f"ordering must be one of {ORDERINGS}")
        check(self.nonfinite in NONFINITE_POLICIES, f"nonfinite must be one of {NONFINITE_POLICIES}")
        count = _whole_number(self.num_constraints)
        check(count is not None, f"num_constraints must be a whole number, got {self.num_constraints!r}")
        check(count > 0, f"num_constraints must be positive, got {count}")
        self.num_constraints = count
        # Every number the dual update reads must be finite: one NaN or inf turns multipliers into NaN.
        for option in ("dual_lr", "kp", "ki", "damping", "penalty", "nu", "init"):
            value = _real_number(getattr(self, option))
            check(value is not None and math.isfinite(value),
                  f"{option} must be a finite number, got {getattr(self, option)!r}")
        max_multiplier = _real_number(self.max_multiplier)
        check(max_multiplier is not None and max_multiplier >= 0,
              f"max_multiplier must be a number >= 0 (inf for no cap), got {self.max_multiplier!r}")
        check(self.dual_lr >= 0, f"dual_lr must be >= 0, got {self.dual_lr!r}")
        check(self.damping >= 0, f"damping must be >= 0, got {self.damping!r}")
        check(self.penalty > 0 or self.formulation == "lagrangian", f"penalty must be > 0, got {self.penalty!r}")
        check(-1 < self.nu < 1, f"nu must be in (-1, 1), got {self.nu!r}")
        lower = -max_multiplier if self.is_equality else 0.0
        check(lower <= self.init <= max_multiplier,
              f"init={self.init!r} is outside the multipliers' range [{lower}, {max_multiplier}] "
              f"({'equality' if self.is_equality else 'inequality'} block, max_multiplier={max_multiplier})")
        check(not self.to_overall or self.kind == "grouped", "to_overall applies to grouped blocks")
        check(self.sense != "==" or not self.restart_on_feasible, "restart_on_feasible needs an inequality")
        self.bound = self._checked_bound(check)
        self._check_estimator(check)

    def _checked_bound(self, check) -> Union[float, Tensor]:
        """A finite float, or a finite (num_constraints,) real tensor with a value per constraint."""
        bound, k = self.bound, self.num_constraints
        expected = f"a float or a tensor of shape ({k},)"
        if isinstance(bound, (list, tuple)):
            check(False, f"bound must be {expected}, got a Python {type(bound).__name__}; "
                  "pass torch.tensor(bound) for one bound per constraint")
        if isinstance(bound, Tensor):
            check(bound.device.type != "meta", "bound is on the meta device, which holds no values; "
                  "pass a tensor with values (e.g. on the CPU: the block moves it to its own device)")
            check(not (bound.is_complex() or bound.dtype == torch.bool), f"bound must be real, got {bound.dtype}")
            if bound.dim() > 0:
                check(tuple(bound.shape) == (k,), f"bound must be {expected}, got shape {tuple(bound.shape)}")
                nonfinite = (~torch.isfinite(bound)).nonzero().flatten().tolist()
                if nonfinite:
                    check(False, f"bound must be finite: {len(nonfinite)} NaN or inf entries, first at index "
                          f"{nonfinite[0]}")
                return bound
        value = _real_number(bound)
        check(value is not None, f"bound must be {expected}, got {type(bound).__name__}")
        check(math.isfinite(value), f"bound must be finite, got {bound!r}")
        return value

    def _apply_dual_defaults(self) -> None:
        for option, value in DUAL_DEFAULTS.get(self.kind, DUAL_DEFAULTS["dense"]).items():
            if getattr(self, option) is None:
                setattr(self, option, value)

    def _check_estimator(self, check) -> None:
        check(self.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        check(0.0 <= self.estimate_decay < 1.0, f"estimate_decay must be in [0, 1), got {self.estimate_decay!r}")
        check(self.estimator == "batch" or self.kind != "indexed",
              "estimator='running' pools a group's samples over steps; indexed blocks have one constraint per "
              "sample and sum its duplicates, so they take estimator='batch'")

    @property
    def is_equality(self) -> bool:
        return self.sense == "=="

    @property
    def reduces_by_mean(self) -> bool:
        return self.kind != "indexed"

    @property
    def dual_flags(self) -> int:
        # Read at every step: int arithmetic on the members' values, taken once (each DualFlag operation,
        # and each read of a member's value, costs more than the rest of the property).
        flags = _MEAN_FLAG if self.reduces_by_mean else 0
        if self.dual_rule == "nupi":
            flags |= _NUPI_FLAG
        if self.restart_on_feasible:
            flags |= _RESTART_FLAG
        if self.formulation in ("penalty", "quadratic"):
            flags |= _FROZEN_FLAG
        elif self.estimator == "running":
            flags |= _RUNNING_FLAG
        return flags

    @property
    def dual_hparams(self) -> list:
        """contract.DualSlot order; a tensor dual_lr (driven by a scheduler, see schedules.py) stays a tensor,
        read by the step's hyperparameter table without a host sync."""
        lower = -self.max_multiplier if self.is_equality else 0.0
        return [self.dual_lr, self.kp, self.ki, self.nu, self.damping, lower, self.max_multiplier,
                self.estimate_decay]


class ConstraintBlock:
    """K constraints with their multipliers; call it with this batch's values to get its loss term.

    The forward math is ``formulation.Formulation``'s; the block holds the state (multipliers, dual
    state, what was recorded for the next step) and talks to its owner only through a
    ``formulation.BlockContext``.  Input checks and when they raise: see ``validation.py``.
    """

    def __init__(self, context: BlockContext, spec: ConstraintSpec, device: torch.device) -> None:
        self.spec = spec
        self._context = context
        self.multipliers, self.dual_state = self._allocate_state(device)
        self._bound = spec.bound.to(device=device, dtype=torch.float32) if isinstance(spec.bound, Tensor) else float(spec.bound)
        self._formulation = Formulation(spec.name, spec.kind, spec.num_constraints, spec.sense, spec.formulation,
                                        spec.penalty, spec.to_overall, spec.nonfinite, self._bound, device)
        # The fused op's term uses the multipliers as of the call: dual-first blocks update them in between.
        self._fused_forward = self._formulation.uses_fused_forward() and spec.ordering != "dual_first"
        self._pending_ids: list[Tensor] = []
        self._pending_violations: list[Tensor] = []
        self.nonfinite_skipped = 0
        # Deferred checks: (error bits, non-finite calls) since the host last read them, on the device.
        self._unreported_errors: Optional[Tensor] = None
        # (statistics of the last step, this block's row): read only by report(), so the step never
        # pays for slicing it.
        self.last_stats: Optional[tuple[Tensor, int]] = None
        # The ids the steps moved, so report() reads those, not all K (None: small or dense, scanned whole).
        self.touched = (TouchedConstraints(self.multipliers, float(spec.init))
                        if spec.kind != "dense" and spec.num_constraints >= TRACK_FROM else None)

    def _allocate_state(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Multipliers (filled with ``init``) and dual state; a block that cannot fit fails before allocating."""
        spec = self.spec
        k = spec.num_constraints
        rows, _ = dual_state_rows(spec.dual_flags & ~DualFlag.FROZEN)
        needed = 4 * k * (1 + rows)  # float32
        what = f"constraint block {spec.name!r}: num_constraints={k} needs {_bytes_text(needed)} of float32 " \
               f"multiplier{' and dual' if rows else ''} state on {device}"
        available = available_bytes(device)
        if available is not None and needed > available:
            raise ConstraintMemoryError(f"{what}; {_bytes_text(available)} available")
        try:
            return constraint_state(k, float(spec.init), device), _dual_state(spec, device)
        except RuntimeError as error:  # the allocator's own out-of-memory (torch.OutOfMemoryError included)
            raise ConstraintMemoryError(f"{what}, which could not be allocated: {error}") from error

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return self.multipliers.device

    def __repr__(self) -> str:
        s = self.spec
        return f"ConstraintBlock({s.name!r}, kind={s.kind}, K={s.num_constraints}, sense={s.sense!r}, {s.formulation})"

    # ----------------------------------------------------------------------------------------------
    # Forward

    def __call__(self, values: Tensor, ids: Optional[Tensor] = None, dual_values: Optional[Tensor] = None) -> Tensor:
        """Records this batch for the next ``step()`` (when grad is enabled) and returns the block's loss term.

        ``ids``: one constraint id per sample (indexed, grouped), or for grouped blocks a (B, M) tensor
        of each sample's groups padded with -1 (a sample in several groups counts in each group's mean;
        ``to_overall`` still subtracts the mean over the B samples).
        """
        return self._forward(values, ids, dual_values, record=torch.is_grad_enabled())

    @torch.no_grad()
    def observe(self, values: Tensor, ids: Optional[Tensor] = None, dual_values: Optional[Tensor] = None) -> None:
        """Records this batch for the next ``step()`` and adds nothing to the loss.

        For multipliers whose term reaches the loss some other way, or a dual estimate measured on other
        samples than the loss; validation, non-finite policy and data parallelism are those of a call.
        """
        self._forward(values, ids, dual_values, record=True, want_term=False)

    def _forward(self, values: Tensor, ids: Optional[Tensor], dual_values: Optional[Tensor], record: bool,
                 want_term: bool = True) -> Optional[Tensor]:
        context = self._context
        # Calls that record nothing (evaluation, maybe on one rank only) stay local: no collective.
        reduction = context.reduction() if record else LOCAL
        formulation = self._formulation
        device = formulation.device  # the multipliers' (self.device builds it anew at every read)
        if self._fused_forward and reduction.is_local and context.native_forward(device):
            fused = formulation.fused_forward(values, ids, dual_values, self.multipliers, context.deferred_checks(device))
            if fused is None:
                self.nonfinite_skipped += 1
                return torch.zeros((), dtype=values.dtype, device=values.device)
            recording, term = fused
            self._record(recording, record, context)
            return term if want_term else None
        measured = formulation.measure(values, ids, dual_values, reduction, context.deferred_checks(device))
        if measured is None:
            self.nonfinite_skipped += 1
            return torch.zeros((), dtype=values.dtype, device=values.device)
        self._record(measured.recording, record, context)
        if not want_term:
            return None
        return formulation.term(measured, self.multipliers, reduction, context.uses_triton(device))

    def _record(self, recording: Recording, record: bool, context: BlockContext) -> None:
        if recording.error is not None:
            self._note_error(recording.error)
        if record:
            self._pending_ids.append(recording.ids)
            self._pending_violations.append(recording.violations)
            context.recorded(self, recording)

    def _note_error(self, code: Tensor) -> None:
        nonfinite = (code & ERROR_NONFINITE) > 0
        if self._unreported_errors is None:
            self._unreported_errors = torch.stack([code.long(), nonfinite.long()])
        else:
            bits, calls = self._unreported_errors
            self._unreported_errors = torch.stack([bits | code.long(), calls + nonfinite.long()])

    def raise_input_errors(self) -> None:
        """Reads the deferred checks' verdict (a host sync): raises the ConstraintInputError of a bad call,
        or counts the calls skipped as non-finite (``nonfinite="skip"``)."""
        if self._unreported_errors is None:
            return
        bits, nonfinite_calls = self._unreported_errors.tolist()
        self._unreported_errors = None
        if bits & ERROR_NONFINITE and self.spec.nonfinite == "skip":
            self.nonfinite_skipped += nonfinite_calls
            bits &= ~ERROR_NONFINITE
        raise_for_code(self.name, self.spec.kind, bits, self.spec.num_constraints)

    # ----------------------------------------------------------------------------------------------
    # What the optimizer's step consumes.

    def take_pending(self) -> tuple[Tensor, Tensor]:
        """The (ids, violations) recorded since the last step, concatenated; clears them."""
        if not self._pending_ids:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return empty, torch.empty(0, dtype=torch.float32, device=self.device)
        ids = torch.cat(self._pending_ids) if len(self._pending_ids) > 1 else self._pending_ids[0]
        violations = torch.cat(self._pending_violations) if len(self._pending_violations) > 1 else self._pending_violations[0]
        self.discard_pending()
        return ids, violations

    def restore_pending(self, ids: Tensor, violations: Tensor) -> None:
        """Puts back what ``take_pending`` returned, ahead of anything recorded since (a step that raised)."""
        if ids.numel():
            self._pending_ids.insert(0, ids)
            self._pending_violations.insert(0, violations)

    def discard_pending(self) -> None:
        self._pending_ids.clear()
        self._pending_violations.clear()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending_ids)

    # ----------------------------------------------------------------------------------------------
    # Reporting and checkpoints.

    def report(self) -> dict:
        self.raise_input_errors()
        lam = self.multipliers
        observed, max_violation, violated = (0, 0.0, 0)
        if self.last_stats is not None:
            stats, row = self.last_stats
            observed, max_violation, violated = stats[row].tolist()
        touched = None if self.touched is None else self.touched.ids(lam)
        mean, largest, nonzero = multiplier_summary(lam, touched, float(self.spec.init))
        return {
            "kind": self.spec.kind,
            "num_constraints": self.spec.num_constraints,
            "observed": int(observed),
            "max_violation": float(max_violation),
            "num_violated": int(violated),
            "multiplier_mean": mean,
            "multiplier_max": largest,
            "multiplier_nonzero": nonzero,
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def state_dict(self) -> dict:
        return {
            "kind": self.spec.kind,
            "num_constraints": self.spec.num_constraints,
            "sense": self.spec.sense,
            "dual_rule": self.spec.dual_rule,
            "multipliers": self.multipliers.clone(),
            "dual_state": self.dual_state.clone(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Loads a ``state_dict()``; checks all of it first, so a refused checkpoint changes nothing."""
        dual_state = self.check_state_dict(state)
        # copy_ keeps the block's device and tensor identity (map_location="cpu" checkpoints load on GPU too).
        self.multipliers.copy_(state["multipliers"])
        self.dual_state.copy_(dual_state)
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.discard_pending()

    def check_state_dict(self, state: dict) -> Tensor:
        """Raises ValueError naming the block and the entry when ``state`` does not fit this block exactly;
        returns the checkpoint's dual state in this block's layout (older layouts upgraded)."""
        spec = self.spec

        def fail(message: str) -> None:
            raise ValueError(f"constraint block {spec.name!r}: checkpoint {message}")

        if not isinstance(state, dict):
            fail(f"entry is a {type(state).__name__}, not a dict")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            fail(f"lacks {missing}")
        # sense and dual_rule are written since this version; older checkpoints are checked by shape alone.
        for key in ("kind", "num_constraints", "sense", "dual_rule"):
            if key in state and state[key] != getattr(spec, key):
                fail(f"has {key}={state[key]!r}, this block has {getattr(spec, key)!r}")
        _check_state_tensor(fail, "multipliers", state["multipliers"], self.multipliers.shape)
        lower, upper = (-spec.max_multiplier if spec.is_equality else 0.0), spec.max_multiplier
        multipliers = state["multipliers"]
        if multipliers.numel() and (float(multipliers.min()) < lower or float(multipliers.max()) > upper):
            fail(f"multipliers lie outside this {'equality' if spec.is_equality else 'inequality'} block's range "
                 f"[{lower}, {upper}]: min {float(multipliers.min())}, max {float(multipliers.max())}")
        dual_state = state["dual_state"]
        if isinstance(dual_state, Tensor) and dual_state.shape != self.dual_state.shape:
            upgraded = _dual_state_from_checkpoint(self, dual_state)
            if upgraded is None:
                fail(f"dual_state has shape {tuple(dual_state.shape)}; this block's dual rule ({spec.dual_rule}) "
                     f"and estimator ({spec.estimator}) keep {tuple(self.dual_state.shape)}")
            _check_state_tensor(fail, "dual_state", dual_state, dual_state.shape)
            dual_state = upgraded
        _check_state_tensor(fail, "dual_state", dual_state, self.dual_state.shape)
        skipped = state["nonfinite_skipped"]
        if isinstance(skipped, bool) or _whole_number(skipped) is None or _whole_number(skipped) < 0:
            fail(f"nonfinite_skipped must be a count >= 0, got {skipped!r}")
        return dual_state


_STATE_KEYS = ("kind", "num_constraints", "multipliers", "dual_state", "nonfinite_skipped")


class ConstraintMemoryError(MemoryError, ValueError):
    """A block whose state cannot fit on its device (a MemoryError, and a ValueError like the other option checks)."""


def _bytes_text(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if count < 1024 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _check_state_tensor(fail, key: str, value, shape: torch.Size) -> None:
    """A checkpoint's multipliers or dual state: float32 (what blocks keep), exactly ``shape``, all finite."""
    if not isinstance(value, Tensor):
        fail(f"{key} is a {type(value).__name__}, not a tensor")
    if value.dtype != torch.float32:
        fail(f"{key} has dtype {value.dtype}; blocks keep float32 (convert it with .float() if that is intended)")
    if value.device.type == "meta":
        fail(f"{key} is on the meta device (no values)")
    if value.shape != shape:
        # Never broadcast: a (1,) tensor would otherwise fill all K multipliers.
        fail(f"{key} has shape {tuple(value.shape)}, this block needs {tuple(shape)}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        fail(f"{key} contains NaN or inf")

def _dual_state(spec: ConstraintSpec, device: torch.device) -> Tensor:
    """Zeros in contract.py's dual-state layout: (K,) for one row (nuPI alone), (rows, K) for more."""
    rows, _ = dual_state_rows(spec.dual_flags & ~DualFlag.FROZEN)
    k = spec.num_constraints
    state = constraint_state(rows * k, 0.0, device)
    return state.view(rows, k) if rows > 1 else state


def _dual_state_from_checkpoint(block: ConstraintBlock, saved: Tensor) -> Optional[Tensor]:
    """``saved`` in this block's layout, or None when it does not fit.  Checkpoints from before the running
    estimator hold a (K,) nuPI state or none: their xi fills the xi row, running estimates start empty."""
    current = block.dual_state
    if saved.shape == current.shape:
        return saved
    flags = block.spec.dual_flags
    k = block.spec.num_constraints
    legacy = saved.numel() == 0 or (saved.shape == (k,) and flags & DualFlag.NUPI)
    if not (legacy and flags & DualFlag.RUNNING):
        return None
    upgraded = torch.zeros_like(current)
    if saved.numel():
        upgraded[0].copy_(saved)
    return upgraded


def _real_number(value) -> Optional[float]:
    """``value`` as a float when it is a real number (Python, NumPy or a one-element real tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.device.type == "meta":
            return None
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _whole_number(value) -> Optional[int]:
    """``value`` as an int when it is a whole number (3, 3.0, 1e6, a NumPy integer), else None (2.5, "3", True)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    number = _real_number(value)
    if number is None or not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)
