"""One training run of the demo: the model, its loss terms, the loop (full batch or minibatches) and the
choice of the iterate it returns."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_lagrangian import BestIterate, DualLearningRates, LagrangianAdamW, fairness

from .demo_problem import Problem
from .group_thresholds import GroupThresholds, fit_group_thresholds


@dataclasses.dataclass
class RunSpec:
    label: str
    formulation: Optional[str]  # None: unconstrained; "thresholds": the post-processing baseline
    penalty: float = 0.0
    dual_lr_scale: float = 1.0  # the sensitivity runs: the same Lagrangian run with dual_lr times this

    @property
    def is_penalty(self) -> bool:
        return self.formulation in ("quadratic", "penalty")


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    selected_step: int
    total_steps: int
    train: dict
    test: dict
    last_train: dict
    last_test: dict
    wall_s: float
    history: dict
    rates: dict  # per group hard positive rates of the selected model, train and test
    best_feasible_anywhere: Optional[dict]  # the most accurate train-feasible iterate of the whole run
    max_violation_second_half: float  # the largest train max violation evaluated after half of the steps
    model: Optional[nn.Module] = dataclasses.field(default=None, repr=False)  # the returned iterate

    def to_json(self) -> dict:
        return {
            "label": self.spec.label,
            "formulation": self.spec.formulation or "unconstrained",
            "penalty": self.spec.penalty if self.spec.is_penalty else None,
            "dual_lr_scale": self.spec.dual_lr_scale if self.spec.formulation == "lagrangian" else None,
            "selected_step": self.selected_step,
            "total_steps": self.total_steps,
            "train": self.train,
            "test": self.test,
            "last_iterate": {"train": self.last_train, "test": self.last_test},
            "best_feasible_iterate_anywhere": self.best_feasible_anywhere,
            "train_max_violation_after_half_of_the_steps": self.max_violation_second_half,
            "wall_s": self.wall_s,
        }


def build_model(num_features: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # every run starts from the same weights: only the formulation differs
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


Term = Callable[..., Tensor]


def dual_estimator(args: argparse.Namespace) -> str:
    """What the multipliers read as a group's violation.  A full batch measures every group exactly at each
    step, so pooling over steps ("running") would only add lag; minibatches see a rare group through a few
    rows, and the running estimate pools them (the library's default for grouped blocks)."""
    if args.estimator != "auto":
        return args.estimator
    return "batch" if args.batch_size is None else "running"


def constraint_term(args: argparse.Namespace, problem: Problem, opt: LagrangianAdamW,
                    spec: RunSpec) -> tuple[Term, list]:
    """The loss term of ``spec`` for a batch (logits, labels, group ids[, held-out rows]), and its blocks."""
    options: dict = {"formulation": spec.formulation}
    if spec.formulation == "lagrangian":
        options.update(dual_lr=args.dual_lr * spec.dual_lr_scale, estimator=dual_estimator(args))
        if args.augmented > 0:
            options.update(formulation="augmented", penalty=args.augmented)
        if args.kp == 0:
            options.update(dual_rule="ascent", kp=0.0)
        elif args.kp is not None:  # None: the library's default rule for grouped blocks
            options.update(dual_rule="nupi", kp=args.kp, ki=1.0)
    else:
        options.update(dual_lr=0.0, penalty=spec.penalty)
    k, eps, keep = problem.num_groups, problem.epsilon, problem.constrained
    if args.constraint in fairness.PARITY_CONSTRAINTS:
        helper = fairness.demographic_parity if args.constraint == "dp" else fairness.equal_opportunity
        parity = helper(opt, k, eps, constrained=keep, **options)
        # --held-out-mode both: a second pair of blocks holds every training row (primal and held out) to the
        # bound too, so the run is train-feasible as well as feasible on rows it does not fit.  (Rows of the
        # small groups that are not split appear on both sides and count twice in that estimate.)
        both = uses_held_out(args, problem, spec) and args.held_out_mode == "both"
        on_all_rows = (helper(opt, k, eps, constrained=keep, name=f"{args.constraint}_all_rows", **options)
                       if both else None)

        def parity_term(logits: Tensor, labels: Tensor, groups: Tensor, held_out=None) -> Tensor:
            if held_out is None:
                return parity(logits, groups, labels)
            held_logits, held_labels, held_groups = held_out
            term = parity(logits, groups, labels, held_out_logits=held_logits, held_out_group_ids=held_groups,
                          held_out_labels=held_labels)
            if on_all_rows is not None:
                term = term + on_all_rows(
                    logits, groups, labels, held_out_logits=torch.cat([logits.detach(), held_logits.detach()]),
                    held_out_group_ids=torch.cat([groups, held_groups]),
                    held_out_labels=torch.cat([labels, held_labels]))
            return term

        blocks = list(parity.blocks) + ([] if on_all_rows is None else list(on_all_rows.blocks))
        return parity_term, blocks
    block = fairness.bounded_group_loss(opt, k, eps, **options)

    def group_loss(logits: Tensor, labels: Tensor, groups: Tensor, held_out=None) -> Tensor:
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        rows = keep[groups]
        return block(losses[rows], ids=groups[rows])

    return group_loss, [block]


def uses_held_out(args: argparse.Namespace, problem: Problem, spec: RunSpec) -> bool:
    """Only multipliers can be driven by held-out rows: the Lagrangian runs use them, the baselines fit all rows."""
    return problem.constraint_rows is not None and spec.formulation == "lagrangian"


def steps_per_epoch(args: argparse.Namespace, num_rows: int) -> int:
    return 1 if args.batch_size is None else math.ceil(num_rows / args.batch_size)


class _Batches:
    """Row indices of each step: a fresh permutation per epoch of the rows the loss fits, and a batch of the
    held-out rows of proportional size (the two-dataset scheme) cycling the same way."""

    def __init__(self, fit_rows: Tensor, held_out_rows: Optional[Tensor], batch_size: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.fit = self._cycle(fit_rows, batch_size)
        self.held_out = None
        if held_out_rows is not None:
            held_batch = max(1, round(batch_size * held_out_rows.numel() / fit_rows.numel()))
            self.held_out = self._cycle(held_out_rows, held_batch)

    def _cycle(self, rows: Tensor, size: int) -> Iterator[Tensor]:
        while True:
            order = rows[torch.randperm(rows.numel(), generator=self.generator)]
            yield from order.split(size)

    def next(self) -> tuple[Tensor, Optional[Tensor]]:
        return next(self.fit), None if self.held_out is None else next(self.held_out)


class CosineThenHold:
    """lr factor at step t: a cosine from 1 down to ``floor`` over the first ``fraction`` of ``total_steps``,
    then ``floor``.  The multipliers keep moving at full speed while the model only fine-tunes, so the
    constraints settle in the second part instead of swinging with large primal steps."""

    def __init__(self, total_steps: int, fraction: float, floor: float) -> None:
        self.anneal_steps = max(1.0, fraction * total_steps)
        self.floor = floor

    def __call__(self, step: int) -> float:
        progress = min(step / self.anneal_steps, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DualWarmup:
    """dual_lr factor at step t: 0 for the first ``fraction`` of ``total_steps``, then 1.  The multipliers stay
    at their initial value while the model first learns to predict: early in training a model predicts almost
    nobody positive, which satisfies every parity constraint, and with many small groups (whose terms, means
    over a few rows, outweigh the loss row by row) a run that starts constraining there can stay there."""

    def __init__(self, total_steps: int, fraction: float) -> None:
        self.warm_steps = math.floor(fraction * total_steps)

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.warm_steps else 1.0


def train_run(args: argparse.Namespace, problem: Problem, spec: RunSpec, progress: bool,
              counter: str = "") -> RunResult:
    from tqdm import tqdm

    model = build_model(problem.x_train.shape[1], args.hidden, args.seed)
    opt = LagrangianAdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, backend=args.backend)
    held_out = uses_held_out(args, problem, spec)
    x, y, g = problem.x_train, problem.y_train, problem.g_train
    fit_rows = problem.primal_rows if held_out else torch.arange(len(y))
    per_epoch = steps_per_epoch(args, fit_rows.numel())
    total_steps = args.epochs * per_epoch
    schedule = (torch.optim.lr_scheduler.LambdaLR(opt, CosineThenHold(total_steps, args.anneal_fraction,
                                                                      args.final_lr_fraction))
                if args.lr_schedule == "cosine" else None)
    term, blocks = (None, []) if spec.formulation is None else constraint_term(args, problem, opt, spec)
    # The library's dual-lr schedules: a torch LambdaLR over the blocks' dual learning rates.
    dual_schedule = (torch.optim.lr_scheduler.LambdaLR(DualLearningRates(opt),
                                                       DualWarmup(total_steps, args.dual_warmup))
                     if spec.formulation == "lagrangian" and args.dual_warmup > 0 else None)
    selection = _Selection(args, problem, model, total_steps, enabled=term is not None)
    batches = (None if args.batch_size is None else
               _Batches(fit_rows, problem.constraint_rows if held_out else None, args.batch_size, args.seed))
    history: dict = {"step": [], "accuracy": [], "max_violation": [], "multipliers": []}

    def record(step: int, logits: Tensor) -> None:
        accuracy, violation = selection.consider(step, logits)
        if step % args.record_every == 0 or batches is not None:
            history["step"].append(step)
            history["accuracy"].append(accuracy)
            history["max_violation"].append(violation)
            history["multipliers"].append([b.multipliers[problem.constrained].tolist() for b in blocks])

    start = time.perf_counter()
    for step in tqdm(range(total_steps), desc=f"{counter} {spec.label:>16}".strip(), disable=not progress, leave=False):
        if batches is None:  # full batch: this step's forward over every training row also judges the iterate
            logits_all = model(x).squeeze(1)
            record(step, logits_all.detach())
            rows, held_rows = (problem.primal_rows, problem.constraint_rows) if held_out else (None, None)
            logits = logits_all if rows is None else logits_all[rows]
            held_logits = None if held_rows is None else logits_all[held_rows]
        else:
            if step % per_epoch == 0:
                with torch.no_grad():
                    record(step, model(x).squeeze(1))
            rows, held_rows = batches.next()
            logits = model(x[rows]).squeeze(1)
            held_logits = None
            if held_rows is not None:
                with torch.no_grad():
                    held_logits = model(x[held_rows]).squeeze(1)
        labels, groups = (y, g) if rows is None else (y[rows], g[rows])
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if term is not None:
            held = None if held_rows is None else (held_logits, y[held_rows], g[held_rows])
            loss = loss + term(logits, labels, groups, held)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
        if dual_schedule is not None:
            dual_schedule.step()
    with torch.no_grad():
        record(total_steps, model(x).squeeze(1))
    wall = time.perf_counter() - start
    logits = split_logits(problem, model)
    last_train, last_test = train, test = evaluate(args, problem, *logits)
    selected_step = selection.restore_best()
    if selected_step != total_steps:  # an earlier iterate was loaded into the model
        logits = split_logits(problem, model)
        train, test = evaluate(args, problem, *logits)
    return RunResult(spec, selected_step, total_steps, train, test, last_train, last_test, wall, history,
                     _rates(problem, *logits), selection.anywhere, selection.max_violation_second_half, model)


def thresholds_run(args: argparse.Namespace, problem: Problem, unconstrained: Optional[RunResult]) -> RunResult:
    """The post-processing baseline: the unconstrained model (``unconstrained``'s, else trained here) with
    per-group thresholds fitted to the training rows (``group_thresholds``).  Its wall time counts both."""
    if unconstrained is None:
        unconstrained = train_run(args, problem, RunSpec("unconstrained", None), progress=False)
    start = time.perf_counter()
    train_logits, test_logits = split_logits(problem, unconstrained.model)
    fit = fit_thresholds(args, problem, train_logits, problem.y_train, problem.g_train)
    train_logits, test_logits = fit.shift(train_logits, problem.g_train), fit.shift(test_logits, problem.g_test)
    train, test = evaluate(args, problem, train_logits, test_logits)
    wall = unconstrained.wall_s + time.perf_counter() - start
    steps = unconstrained.total_steps
    return RunResult(RunSpec("group thresholds", "thresholds"), steps, steps, train, test, train, test, wall,
                     {"step": [], "accuracy": [], "max_violation": [], "multipliers": []},
                     _rates(problem, train_logits, test_logits), None, train["max_violation"])


def fit_thresholds(args: argparse.Namespace, problem: Problem, logits: Tensor, labels: Tensor,
                   group_ids: Tensor) -> GroupThresholds:
    """Per-group thresholds on these rows under the problem's constraints (bounds, constrained groups) and the
    run's tolerance."""
    return fit_group_thresholds(logits, labels, group_ids, problem.num_groups, problem.epsilon, problem.constrained,
                                args.constraint, args.tolerance)


@torch.no_grad()
def split_logits(problem: Problem, model: nn.Module) -> tuple[Tensor, Tensor]:
    return model(problem.x_train).squeeze(1), model(problem.x_test).squeeze(1)


class _Selection:
    """The iterate a constrained run returns: the most accurate train-feasible iterate of the final window,
    kept by the library's ``selection.BestIterate``; the last iterate when no iterate there is feasible.

    Every evaluation (each full-batch step, whose forward already holds the hard train predictions; once per
    epoch with minibatches) is recorded for the report.  Only the last ``select_window`` of the steps are
    candidates: early iterates (the initial model predicts almost nobody positive, which is trivially
    feasible) would otherwise win for every run.
    """

    def __init__(self, args: argparse.Namespace, problem: Problem, model: nn.Module, total_steps: int,
                 enabled: bool) -> None:
        self.args, self.problem, self.model = args, problem, model
        self.total_steps = total_steps
        self.first_step = total_steps - math.floor(args.select_window * total_steps)
        self.best = (BestIterate(self._score_of_model, tolerance=args.tolerance)
                     if enabled and args.select_window > 0 else None)
        self._current: Optional[tuple[float, float]] = None
        # For the report only: the most accurate feasible iterate of the whole run, early ones included.
        self.anywhere: Optional[dict] = None
        self.max_violation_second_half = 0.0

    def _score_of_model(self, model: nn.Module) -> tuple[float, float]:
        return self._current  # the score of this step's forward, computed once in consider()

    def consider(self, step: int, logits: Tensor) -> tuple[float, float]:
        accuracy, violation = self._current = _train_score(self.args, self.problem, logits)
        if 2 * step >= self.total_steps:
            self.max_violation_second_half = max(self.max_violation_second_half, violation)
        if self.best is None or violation > self.args.tolerance:
            return accuracy, violation
        if self.anywhere is None or accuracy > self.anywhere["accuracy"]:
            self.anywhere = {"step": step, "accuracy": accuracy, "max_violation": violation}
        if step >= self.first_step:
            self.best.consider(step, self.model)
        return accuracy, violation

    def restore_best(self) -> int:
        """Loads the selected iterate into the model; returns its step (``total_steps``: the last iterate)."""
        if self.best is None or self.best.best is None:
            return self.total_steps
        return self.best.load_into(self.model).step


def _train_score(args: argparse.Namespace, problem: Problem, logits: Tensor) -> tuple[float, float]:
    predictions = (logits > 0).float()
    losses = (F.binary_cross_entropy_with_logits(logits, problem.y_train, reduction="none")
              if args.constraint == "group-loss" else None)
    excess = fairness.constraint_excess(args.constraint, predictions, problem.y_train, losses, problem.g_train,
                                        problem.num_groups, problem.epsilon)
    accuracy = float((predictions == problem.y_train).float().mean())
    return accuracy, fairness.max_violation(excess, problem.constrained)


@torch.no_grad()
def evaluate(args: argparse.Namespace, problem: Problem, train_logits: Tensor,
             test_logits: Tensor) -> tuple[dict, dict]:
    def split(logits: Tensor, y: Tensor, g: Tensor) -> dict:
        metrics = fairness.fairness_metrics(logits, y, g, problem.num_groups, args.constraint, problem.epsilon,
                                            problem.constrained)
        metrics["feasible"] = metrics["max_violation"] <= args.tolerance
        metrics["tightest_excess"] = _tightest_excess(args, problem, logits, y, g)
        # Rates of groups of a few rows are mostly noise on a held-out split; this view leaves them out.
        large = problem.constrained & (fairness.group_sizes(g, problem.num_groups) >= args.large_group_rows)
        metrics["large_groups"] = int(large.sum())
        # Judged against epsilon itself, not a looser per-group bound (--slack): the groups whose test rates
        # mean something are held to the bound the user asked for.
        metrics["max_violation_large_groups"] = fairness.fairness_metrics(
            logits, y, g, problem.num_groups, args.constraint, args.epsilon, large)["max_violation"]
        metrics["groups_outside_bound_by_interval"] = _groups_outside_by_interval(args, problem, logits, y, g)
        return metrics

    return (split(train_logits, problem.y_train, problem.g_train),
            split(test_logits, problem.y_test, problem.g_test))


def _tightest_excess(args: argparse.Namespace, problem: Problem, logits: Tensor, y: Tensor, g: Tensor) -> float:
    """max_k (measure_k - epsilon) over constrained groups, signed: below 0 the tightest constraint holds with
    that much room (how far the model over-satisfies the constraints)."""
    predictions = (logits > 0).float()
    losses = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    excess = fairness.constraint_excess(args.constraint, predictions, y, losses, g, problem.num_groups, problem.epsilon)
    excess = excess[problem.constrained]
    excess = excess[~torch.isnan(excess)]
    return float(excess.max()) if excess.numel() else math.nan


def _groups_outside_by_interval(args: argparse.Namespace, problem: Problem, logits: Tensor, y: Tensor,
                                g: Tensor) -> Optional[int]:
    """Constrained groups whose 95% Wilson interval of the rate lies outside overall ± epsilon (parity only)."""
    if args.constraint not in fairness.PARITY_CONSTRAINTS:
        return None
    predictions = (logits > 0).float()
    if args.constraint == "eo":
        positive = y > 0.5
        predictions, g = predictions[positive], g[positive]
    _, low, high, _ = fairness.rate_intervals(predictions, g, problem.num_groups)
    outside = fairness.parity_excluded(low, high, float(predictions.mean()), problem.epsilon)
    return int((outside & problem.constrained).sum())


def _rates(problem: Problem, train_logits: Tensor, test_logits: Tensor) -> dict:
    predictions = {"train": (train_logits > 0).float(), "test": (test_logits > 0).float()}
    groups = {"train": problem.g_train, "test": problem.g_test}
    rates = {split: fairness.group_rates(p, groups[split], problem.num_groups).tolist()
             for split, p in predictions.items()}
    # The overall rate is over rows (with overlapping groups, not over memberships).
    rates.update({f"overall_{split}": float(p.mean()) for split, p in predictions.items()})
    return rates
