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
from typing import Optional, Union

import torch
from torch import Tensor

from .contract import DualFlag
from .formulation import LOCAL, SENSE_SIGNS, BlockContext, Formulation
from .memory import constraint_state
from .validation import ERROR_NONFINITE, ConstraintInputError, raise_for_code

__all__ = ["ConstraintBlock", "ConstraintInputError", "ConstraintSpec"]

KINDS = ("dense", "indexed", "grouped")
SENSES = tuple(SENSE_SIGNS)
FORMULATIONS = ("lagrangian", "augmented", "penalty", "quadratic")
DUAL_RULES = ("ascent", "nupi")
ORDERINGS = ("simultaneous", "dual_first")
NONFINITE_POLICIES = ("raise", "skip")


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
    dual_rule: str = "ascent"
    kp: float = 0.0
    ki: float = 1.0
    nu: float = 0.0
    max_multiplier: float = math.inf
    damping: float = 0.0
    restart_on_feasible: bool = False
    ordering: str = "simultaneous"
    to_overall: bool = False
    nonfinite: str = "raise"
    init: float = 0.0

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"constraint block {self.name!r}: {message}")

        check(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        check(self.sense in SENSES, f"sense must be one of {tuple(SENSES)}, got {self.sense!r}")
        check(self.formulation in FORMULATIONS, f"formulation must be one of {FORMULATIONS}")
        check(self.dual_rule in DUAL_RULES, f"dual_rule must be one of {DUAL_RULES}")
        check(self.ordering in ORDERINGS, f"ordering must be one of {ORDERINGS}")
        check(self.nonfinite in NONFINITE_POLICIES, f"nonfinite must be one of {NONFINITE_POLICIES}")
        check(int(self.num_constraints) > 0, "num_constraints must be positive")
        check(self.dual_lr >= 0, "dual_lr must be >= 0")
        check(self.penalty > 0 or self.formulation == "lagrangian", "penalty must be > 0")
        check(-1 < self.nu < 1, "nu must be in (-1, 1)")
        check(self.max_multiplier >= 0, "max_multiplier must be >= 0")
        check(not self.to_overall or self.kind == "grouped", "to_overall applies to grouped blocks")
        check(math.isfinite(self.init), "init must be finite")
        check(self.sense != "==" or not self.restart_on_feasible, "restart_on_feasible needs an inequality")
        self.num_constraints = int(self.num_constraints)

    @property
    def is_equality(self) -> bool:
        return self.sense == "=="

    @property
    def reduces_by_mean(self) -> bool:
        return self.kind != "indexed"

    @property
    def dual_flags(self) -> int:
        flags = DualFlag(0)
        if self.reduces_by_mean:
            flags |= DualFlag.MEAN
        if self.dual_rule == "nupi":
            flags |= DualFlag.NUPI
        if self.restart_on_feasible:
            flags |= DualFlag.RESTART
        if self.formulation in ("penalty", "quadratic"):
            flags |= DualFlag.FROZEN
        return int(flags)

    @property
    def dual_hparams(self) -> list[float]:
        lower = -self.max_multiplier if self.is_equality else 0.0
        return [self.dual_lr, self.kp, self.ki, self.nu, self.damping, lower, self.max_multiplier]


class ConstraintBlock:
    """K constraints with their multipliers; call it with this batch's values to get its loss term.

    The forward math is ``formulation.Formulation``'s; the block holds the state (multipliers, dual
    state, what was recorded for the next step) and talks to its owner only through a
    ``formulation.BlockContext``.  Input checks and when they raise: see ``validation.py``.
    """

    def __init__(self, context: BlockContext, spec: ConstraintSpec, device: torch.device) -> None:
        self.spec = spec
        self._context = context
        k = spec.num_constraints
        self.multipliers = constraint_state(k, float(spec.init), device)
        if not spec.is_equality:
            self.multipliers.clamp_(0.0, spec.max_multiplier)
        self.dual_state = constraint_state(k if spec.dual_rule == "nupi" else 0, 0.0, device)
        self._bound = spec.bound.to(device=device, dtype=torch.float32) if isinstance(spec.bound, Tensor) else float(spec.bound)
        if isinstance(self._bound, Tensor) and self._bound.shape != (k,):
            raise ValueError(f"constraint block {spec.name!r}: bound must be a float or have shape ({k},)")
        self._formulation = Formulation(spec.name, spec.kind, k, spec.sense, spec.formulation, spec.penalty,
                                        spec.to_overall, spec.nonfinite, self._bound, device)
        self._pending_ids: list[Tensor] = []
        self._pending_violations: list[Tensor] = []
        self.nonfinite_skipped = 0
        # Deferred checks: (error bits, non-finite calls) since the host last read them, on the device.
        self._unreported_errors: Optional[Tensor] = None
        # (statistics of the last step, this block's row): read only by report(), so the step never
        # pays for slicing it.
        self.last_stats: Optional[tuple[Tensor, int]] = None

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
        measured = self._formulation.measure(values, ids, dual_values, reduction, context.deferred_checks(self.device))
        if measured is None:
            self.nonfinite_skipped += 1
            return torch.zeros((), dtype=values.dtype, device=values.device)
        recording = measured.recording
        if recording.error is not None:
            self._note_error(recording.error)
        if record:
            self._pending_ids.append(recording.ids)
            self._pending_violations.append(recording.violations)
            context.recorded(self, recording)
        if not want_term:
            return None
        return self._formulation.term(measured, self.multipliers, reduction, context.uses_triton(self.device))

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
        lowest, highest = torch.aminmax(lam)  # no K-sized temporary, unlike lam.abs()
        return {
            "kind": self.spec.kind,
            "num_constraints": self.spec.num_constraints,
            "observed": int(observed),
            "max_violation": float(max_violation),
            "num_violated": int(violated),
            "multiplier_mean": float(lam.mean()),
            "multiplier_max": max(abs(float(lowest)), abs(float(highest))),
            "multiplier_nonzero": int(torch.count_nonzero(lam)),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def state_dict(self) -> dict:
        return {
            "kind": self.spec.kind,
            "num_constraints": self.spec.num_constraints,
            "multipliers": self.multipliers.clone(),
            "dual_state": self.dual_state.clone(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("kind", "num_constraints"):
            if state[key] != getattr(self.spec, key):
                raise ValueError(f"constraint block {self.name!r}: checkpoint has {key}={state[key]!r}, "
                                 f"this block has {getattr(self.spec, key)!r}")
        if state["dual_state"].shape != self.dual_state.shape:
            raise ValueError(f"constraint block {self.name!r}: checkpoint dual state does not match the dual rule")
        # copy_ keeps the block's device and tensor identity (map_location="cpu" checkpoints load on GPU too).
        self.multipliers.copy_(state["multipliers"])
        self.dual_state.copy_(state["dual_state"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.discard_pending()

