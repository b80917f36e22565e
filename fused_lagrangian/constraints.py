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
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from .contract import DualFlag, dual_state_rows
from .memory import constraint_state
from .ops import lagrangian_term

if TYPE_CHECKING:
    from .optim import LagrangianOptimizer

KINDS = ("dense", "indexed", "grouped")
SENSES = {"<=": 1.0, ">=": -1.0, "==": 1.0}
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


class ConstraintInputError(ValueError):
    """Bad input to a constraint block; raised before any parameter or multiplier changes."""


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
        self._check_estimator(check)

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
        flags = DualFlag(0)
        if self.reduces_by_mean:
            flags |= DualFlag.MEAN
        if self.dual_rule == "nupi":
            flags |= DualFlag.NUPI
        if self.restart_on_feasible:
            flags |= DualFlag.RESTART
        if self.formulation in ("penalty", "quadratic"):
            flags |= DualFlag.FROZEN
        elif self.estimator == "running":
            flags |= DualFlag.RUNNING
        return int(flags)

    @property
    def dual_hparams(self) -> list[float]:
        lower = -self.max_multiplier if self.is_equality else 0.0
        return [_as_float(self.dual_lr), self.kp, self.ki, self.nu, self.damping, lower, self.max_multiplier,
                self.estimate_decay]


class ConstraintBlock:
    """K constraints with their multipliers; call it with this batch's values to get its loss term."""

    def __init__(self, optimizer: "LagrangianOptimizer", spec: ConstraintSpec, device: torch.device) -> None:
        self.spec = spec
        self._optimizer = optimizer
        k = spec.num_constraints
        self.multipliers = constraint_state(k, float(spec.init), device)
        if not spec.is_equality:
            self.multipliers.clamp_(0.0, spec.max_multiplier)
        self.dual_state = _dual_state(spec, device)
        self._bound = spec.bound.to(device=device, dtype=torch.float32) if isinstance(spec.bound, Tensor) else float(spec.bound)
        if isinstance(self._bound, Tensor) and self._bound.shape != (k,):
            raise ValueError(f"constraint block {spec.name!r}: bound must be a float or have shape ({k},)")
        self._pending_ids: list[Tensor] = []
        self._pending_violations: list[Tensor] = []
        self.nonfinite_skipped = 0
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
    # Forward: validate, record the dual estimate, return the primal term.

    def __call__(self, values: Tensor, ids: Optional[Tensor] = None, dual_values: Optional[Tensor] = None) -> Tensor:
        """Records this batch for the next ``step()`` (when grad is enabled) and returns the block's loss term."""
        recording = torch.is_grad_enabled()
        if recording:
            data_parallel = self._optimizer._data_parallel()
            if data_parallel is not None:
                return data_parallel.block_call(self, values, ids, dual_values)
        observed = self._observed_violations(values, ids, dual_values)
        if observed is None:
            return torch.zeros((), dtype=values.dtype, device=values.device)
        ids, violations, dual_source = observed
        if recording:
            self._record(ids, dual_source)
        return self._primal_term(violations, ids)

    @torch.no_grad()
    def observe(self, values: Tensor, ids: Optional[Tensor] = None, dual_values: Optional[Tensor] = None) -> None:
        """Records this batch for the next ``step()`` and adds nothing to the loss.

        For multipliers whose term reaches the loss some other way, or a dual estimate measured on other
        samples than the loss; validation, non-finite policy and data parallelism are those of a call.
        """
        data_parallel = self._optimizer._data_parallel()
        if data_parallel is not None:
            data_parallel.block_call(self, values, ids, dual_values)
            return
        observed = self._observed_violations(values, ids, dual_values)
        if observed is not None:
            ids, _, dual_source = observed
            self._record(ids, dual_source)

    def _observed_violations(self, values: Tensor, ids: Optional[Tensor],
                             dual_values: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """Validated ids, signed violations and the dual estimate's source; None when skipped as non-finite."""
        ids = self._validate(values, ids, dual_values)
        if not self._all_finite(values, dual_values):
            self.nonfinite_skipped += 1
            return None
        violations = self._signed_violation(values, ids)
        dual_source = violations if dual_values is None else self._signed_violation(dual_values, ids)
        return ids, violations, dual_source

    def _record(self, ids: Tensor, dual_source: Tensor) -> None:
        self._pending_ids.append(ids)
        self._pending_violations.append(dual_source.detach().float())
        if self.spec.ordering == "dual_first":
            self._optimizer._dual_step([self])

    def _validate(self, values: Tensor, ids: Optional[Tensor], dual_values: Optional[Tensor]) -> Tensor:
        spec = self.spec

        def fail(message: str) -> None:
            raise ConstraintInputError(f"constraint block {spec.name!r} ({spec.kind}): {message}")

        if not isinstance(values, Tensor) or not values.is_floating_point():
            fail(f"values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}")
        if values.device != self.device:
            fail(f"values are on {values.device} but the multipliers are on {self.device}")
        if spec.kind == "dense":
            if values.shape != (spec.num_constraints,):
                fail(f"values must have shape ({spec.num_constraints},), got {tuple(values.shape)}")
            if ids is not None:
                fail("dense blocks take no ids")
            ids = self._dense_ids()
        else:
            if values.dim() != 1:
                fail(f"values must be 1-D (one per sample), got shape {tuple(values.shape)}")
            if ids is None:
                fail("ids are required (one constraint id per sample)")
            if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
                fail(f"ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids))}")
            if ids.shape != values.shape:
                fail(f"ids shape {tuple(ids.shape)} does not match values shape {tuple(values.shape)}")
            if ids.device != self.device:
                fail(f"ids are on {ids.device} but the multipliers are on {self.device}")
            ids = ids.long()
            if ids.numel():
                lowest, highest = (int(bound) for bound in torch.aminmax(ids))
                if lowest < 0 or highest >= spec.num_constraints:
                    fail(f"ids out of range [0, {spec.num_constraints}): min {lowest}, max {highest}")
        if dual_values is not None:
            if not isinstance(dual_values, Tensor) or not dual_values.is_floating_point():
                fail("dual_values must be a floating-point tensor")
            if dual_values.shape != values.shape or dual_values.device != values.device:
                fail(f"dual_values must match values (shape {tuple(values.shape)}, device {values.device})")
        return ids

    def _all_finite(self, values: Tensor, dual_values: Optional[Tensor]) -> bool:
        finite = _finite(values) and (dual_values is None or _finite(dual_values))
        if not finite and self.spec.nonfinite == "raise":
            raise ConstraintInputError(
                f"constraint block {self.name!r} ({self.spec.kind}): values contain NaN or inf "
                "(pass nonfinite='skip' to skip such updates and count them in report())"
            )
        return finite

    def _dense_ids(self) -> Tensor:
        cached = getattr(self, "_arange", None)
        if cached is None:
            cached = self._arange = torch.arange(self.spec.num_constraints, device=self.device)
        return cached

    def _signed_violation(self, values: Tensor, ids: Tensor, overall_mean: Optional[Tensor] = None) -> Tensor:
        if self.spec.to_overall:
            values = values - (values.mean() if overall_mean is None else overall_mean)
        bound = self._bound[ids] if isinstance(self._bound, Tensor) else self._bound
        return bound - values if self.spec.sense == ">=" else values - bound

    def _primal_term(self, violations: Tensor, ids: Tensor) -> Tensor:
        spec = self.spec
        if spec.formulation == "lagrangian":
            weights = None
            if spec.kind == "grouped":
                counts = torch.bincount(ids, minlength=spec.num_constraints)
                weights = 1.0 / counts[ids].to(violations.dtype)
            return lagrangian_term(violations, ids, self.multipliers, weights)
        touched, g = self._per_constraint(violations, ids)
        return self._penalty_term(self.multipliers[touched].to(g.dtype), g)

    def _penalty_term(self, lam: Tensor, g: Tensor) -> Tensor:
        """The non-Lagrangian formulations' term for estimates g of the constraints with multipliers lam."""
        spec = self.spec
        c = spec.penalty
        if spec.formulation == "penalty":
            return c * g.sum()
        if spec.formulation == "quadratic":
            excess = g if spec.is_equality else torch.relu(g)
            return 0.5 * c * (excess * excess).sum()
        # Augmented Lagrangian, Nocedal & Wright (17.64-65).
        if spec.is_equality:
            return (lam * g + 0.5 * c * g * g).sum()
        return ((torch.relu(lam + c * g) ** 2 - lam * lam) / (2 * c)).sum()

    def _per_constraint(self, violations: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """This call's differentiable estimate g_k for each constraint it touches (O(batch))."""
        touched, slot = torch.unique(ids, return_inverse=True)
        g = torch.zeros(touched.numel(), dtype=violations.dtype, device=violations.device).index_add(0, slot, violations)
        if self.spec.reduces_by_mean:
            g = g / torch.bincount(slot, minlength=touched.numel()).to(g.dtype)
        return touched, g

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
        lam = self.multipliers
        observed, max_violation, violated = (0, 0.0, 0)
        if self.last_stats is not None:
            stats, row = self.last_stats
            observed, max_violation, violated = stats[row].tolist()
        return {
            "kind": self.spec.kind,
            "num_constraints": self.spec.num_constraints,
            "observed": int(observed),
            "max_violation": float(max_violation),
            "num_violated": int(violated),
            "multiplier_mean": float(lam.mean()),
            "multiplier_max": float(lam.abs().max()),
            "multiplier_nonzero": int((lam != 0).sum()),
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
        dual_state = _dual_state_from_checkpoint(self, state["dual_state"])
        # copy_ keeps the block's device and tensor identity (map_location="cpu" checkpoints load on GPU too).
        self.multipliers.copy_(state["multipliers"])
        self.dual_state.copy_(dual_state)
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.discard_pending()


def _dual_state(spec: ConstraintSpec, device: torch.device) -> Tensor:
    """Zeros in contract.py's dual-state layout: (K,) for one row (nuPI alone), (rows, K) for more."""
    rows, _ = dual_state_rows(spec.dual_flags & ~DualFlag.FROZEN)
    k = spec.num_constraints
    state = constraint_state(rows * k, 0.0, device)
    return state.view(rows, k) if rows > 1 else state


def _dual_state_from_checkpoint(block: ConstraintBlock, saved: Tensor) -> Tensor:
    """``saved`` in this block's layout.  Checkpoints from before the running estimator hold a (K,) nuPI
    state or none: their xi fills the xi row, running estimates start empty (S = N = 0)."""
    current = block.dual_state
    if saved.shape == current.shape:
        return saved
    flags = block.spec.dual_flags
    k = block.spec.num_constraints
    legacy = saved.numel() == 0 or (saved.shape == (k,) and flags & DualFlag.NUPI)
    if not (legacy and flags & DualFlag.RUNNING):
        raise ValueError(f"constraint block {block.name!r}: checkpoint dual state {tuple(saved.shape)} does not "
                         f"match this block's dual rule and estimator {tuple(current.shape)}")
    upgraded = torch.zeros_like(current)
    if saved.numel():
        upgraded[0].copy_(saved)
    return upgraded


def _as_float(value) -> float:
    # A tensor dual_lr (driven by a scheduler, see schedules.py) is read at every step, never cached.
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _finite(values: Tensor) -> bool:
    # One reduction instead of isfinite().all(): a float64 sum of finite floats cannot overflow, and
    # any NaN or inf makes it non-finite (inf - inf is NaN).  Float64 values could overflow it.
    if values.dtype == torch.float64:
        return bool(torch.isfinite(values).all())
    return math.isfinite(float(values.detach().sum(dtype=torch.float64)))
