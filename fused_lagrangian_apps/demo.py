"""``fused-lagrangian demo``: one constrained run against a penalty sweep, on fairness constraints.

The main job: UCI Adult, race x sex x age groups, demographic parity epsilon = 0.05 to the overall rate,
a small MLP trained full-batch with LagrangianAdam.  It trains

  (a) the unconstrained model,
  (b) a fixed-penalty sweep: the quadratic penalty (c/2) * sum_k relu(g_k)^2 for every c of the grid,
  (c) one Lagrangian run (multipliers moved by the hard rates, the sigmoid surrogate drives the model),

then prints train and test metrics and writes report.json and PNG plots to ``--out``.

Why the quadratic penalty is the baseline: the linear penalty c * g_k rewards over-satisfying a constraint,
and on a two-sided parity constraint the upper and lower terms cancel exactly (their sum is the constant
-2 c K epsilon), so it cannot move the model at all.  The squared hinge is what practitioners use.

Groups with fewer than ``--min-group-size`` (10) training rows are left out of the constraint (they still
count in the overall rate): a group of one row has a rate of 0 or 1, so constraining it would force the
overall positive rate under epsilon + tolerance, i.e. a nearly trivial classifier.  On Adult this leaves
51 of the 59 race x sex x age groups constrained.  The multipliers follow nuPI (K_P = 10, nu = 0): the
proportional term damps the oscillations that plain ascent shows on hard rates.

Model selection is the same for every constrained run: each step's full-batch forward already yields the
hard train rates of the current parameters, so a run returns its most accurate train-feasible iterate
(max violation <= tolerance) of its last 20% of steps, and its last iterate when there is none (the "best
iterate" of Cotter et al., JMLR 2019, and of TF Constrained Optimization, restricted to the end of training
so that the nearly all-negative initial model, trivially feasible, never wins).  Hard rates of groups of
ten rows move in steps of 0.1, so no gradient method can promise that the very last step lands feasible;
report.json also holds every run's last iterate, and the best feasible iterate of the whole run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_lagrangian import fairness
from fused_lagrangian import LagrangianAdam

GROUP_KEYS = ("race", "sex", "age", "marital", "education")
DEFAULT_PENALTIES = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


# --------------------------------------------------------------------------------------------------
# The problem: data split, groups and which groups are constrained.

@dataclasses.dataclass
class Problem:
    name: str
    x_train: Tensor
    y_train: Tensor
    g_train: Tensor
    x_test: Tensor
    y_test: Tensor
    g_test: Tensor
    group_names: list[str]
    num_groups: int
    constrained: Tensor  # bool per group: enough rows of the constraint's population in train

    @property
    def sizes_train(self) -> Tensor:
        return torch.bincount(self.g_train, minlength=self.num_groups)

    @property
    def sizes_test(self) -> Tensor:
        return torch.bincount(self.g_test, minlength=self.num_groups)


def load_problem(args: argparse.Namespace) -> Problem:
    if args.dataset == "adult":
        from .datasets import load_adult

        data = load_adult(group_by=args.groups)
        problem = Problem(f"UCI Adult, groups {' x '.join(args.groups)}", data.x_train, data.y_train,
                          data.g_train, data.x_test, data.y_test, data.g_test, data.group_names, data.num_groups,
                          constrained=torch.zeros(0, dtype=torch.bool))
    else:
        from .datasets import make_synthetic

        train, test = make_synthetic(args.rows, seed=args.seed).train_test_split(0.2)
        problem = Problem(f"synthetic, {args.rows:,} rows", train.x, train.y, train.g, test.x, test.y, test.g,
                          train.group_names, train.num_groups, constrained=torch.zeros(0, dtype=torch.bool))
    in_constraint = problem.g_train[problem.y_train > 0.5] if args.constraint == "eo" else problem.g_train
    rows_in_constraint = torch.bincount(in_constraint, minlength=problem.num_groups)
    problem.constrained = rows_in_constraint >= args.min_group_size
    return problem


# --------------------------------------------------------------------------------------------------
# One training run.

@dataclasses.dataclass
class RunSpec:
    label: str
    formulation: Optional[str]  # None: unconstrained
    penalty: float = 0.0


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    selected_step: int
    train: dict
    test: dict
    last_train: dict
    last_test: dict
    wall_s: float
    history: dict
    rates: dict  # per group hard positive rates of the selected model, train and test
    best_feasible_anywhere: Optional[dict]  # the most accurate train-feasible iterate of the whole run

    def to_json(self) -> dict:
        return {
            "label": self.spec.label,
            "formulation": self.spec.formulation or "unconstrained",
            "penalty": self.spec.penalty if self.spec.formulation in ("quadratic", "penalty") else None,
            "selected_step": self.selected_step,
            "train": self.train,
            "test": self.test,
            "last_iterate": {"train": self.last_train, "test": self.last_test},
            "best_feasible_iterate_anywhere": self.best_feasible_anywhere,
            "wall_s": self.wall_s,
        }


def build_model(num_features: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # every run starts from the same weights: only the formulation differs
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def constraint_term(args: argparse.Namespace, problem: Problem, opt: LagrangianAdam,
                    spec: RunSpec) -> tuple[Callable[[Tensor, Tensor, Tensor], Tensor], list]:
    """The loss term of ``spec`` for a batch (logits, labels, group ids), and its blocks."""
    options: dict = {"formulation": spec.formulation}
    if spec.formulation == "lagrangian":
        options.update(dual_lr=args.dual_lr)
        if args.kp:
            options.update(dual_rule="nupi", kp=args.kp, ki=1.0)
    else:
        options.update(dual_lr=0.0, penalty=spec.penalty)
    k, eps, keep = problem.num_groups, args.epsilon, problem.constrained
    if args.constraint in fairness.PARITY_CONSTRAINTS:
        helper = fairness.demographic_parity if args.constraint == "dp" else fairness.equal_opportunity
        parity = helper(opt, k, eps, constrained=keep, **options)
        return (lambda logits, labels, groups: parity(logits, groups, labels)), list(parity.blocks)
    block = fairness.bounded_group_loss(opt, k, eps, **options)

    def group_loss(logits: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        rows = keep[groups]
        return block(losses[rows], ids=groups[rows])

    return group_loss, [block]


def train_run(args: argparse.Namespace, problem: Problem, spec: RunSpec, progress: bool) -> RunResult:
    from tqdm import tqdm

    model = build_model(problem.x_train.shape[1], args.hidden, args.seed)
    opt = LagrangianAdam(model.parameters(), lr=args.lr, backend=args.backend)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs, eta_min=args.lr * args.final_lr_fraction)
                if args.lr_schedule == "cosine" else None)
    term, blocks = (None, []) if spec.formulation is None else constraint_term(args, problem, opt, spec)
    selection = _Selection(args, problem, model, enabled=term is not None)
    x, y, g = problem.x_train, problem.y_train, problem.g_train
    history: dict = {"step": [], "accuracy": [], "max_violation": [], "multipliers": []}
    start = time.perf_counter()
    for step in tqdm(range(args.epochs), desc=f"{spec.label:>16}", disable=not progress, leave=False):
        logits = model(x).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        if term is not None:
            loss = loss + term(logits, y, g)
        accuracy, violation = selection.consider(step, logits.detach())
        if step % args.record_every == 0:
            history["step"].append(step)
            history["accuracy"].append(accuracy)
            history["max_violation"].append(violation)
            history["multipliers"].append([b.multipliers[problem.constrained].tolist() for b in blocks])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
    with torch.no_grad():
        selection.consider(args.epochs, model(x).squeeze(1))
    wall = time.perf_counter() - start
    last_train, last_test = evaluate(args, problem, model)
    selected_step = selection.restore_best()
    train, test = evaluate(args, problem, model) if selected_step != args.epochs else (last_train, last_test)
    return RunResult(spec, selected_step, train, test, last_train, last_test, wall, history, _rates(problem, model),
                     selection.anywhere)


class _Selection:
    """Keeps the most accurate train-feasible iterate of the final window of a constrained run.

    Each step's full-batch forward already holds the hard train predictions of the current parameters, so
    judging an iterate costs a bincount.  Only the last ``select_window`` of the steps qualify: early
    iterates (the initial model predicts almost nobody positive, which is trivially feasible) would
    otherwise win for every run.
    """

    def __init__(self, args: argparse.Namespace, problem: Problem, model: nn.Module, enabled: bool) -> None:
        self.args, self.problem, self.model = args, problem, model
        self.enabled = enabled and args.select_window > 0
        self.first_step = args.epochs - math.floor(args.select_window * args.epochs)
        self.best_accuracy, self.best_step, self.best_state = -math.inf, args.epochs, None
        # For the report only: the most accurate feasible iterate of the whole run, early ones included.
        self.anywhere: Optional[dict] = None

    def consider(self, step: int, logits: Tensor) -> tuple[float, float]:
        accuracy, violation = _train_score(self.args, self.problem, logits)
        if not self.enabled or violation > self.args.tolerance:
            return accuracy, violation
        if self.anywhere is None or accuracy > self.anywhere["accuracy"]:
            self.anywhere = {"step": step, "accuracy": accuracy, "max_violation": violation}
        if step >= self.first_step and accuracy > self.best_accuracy:
            self.best_accuracy, self.best_step = accuracy, step
            self.best_state = copy.deepcopy(self.model.state_dict())
        return accuracy, violation

    def restore_best(self) -> int:
        """Loads the selected iterate into the model; returns its step (``epochs``: the last iterate)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.best_step


def _train_score(args: argparse.Namespace, problem: Problem, logits: Tensor) -> tuple[float, float]:
    predictions = (logits > 0).float()
    losses = (F.binary_cross_entropy_with_logits(logits, problem.y_train, reduction="none")
              if args.constraint == "group-loss" else None)
    excess = fairness.constraint_excess(args.constraint, predictions, problem.y_train, losses, problem.g_train,
                                        problem.num_groups, args.epsilon)
    accuracy = float((predictions == problem.y_train).float().mean())
    return accuracy, fairness.max_violation(excess, problem.constrained)


@torch.no_grad()
def evaluate(args: argparse.Namespace, problem: Problem, model: nn.Module) -> tuple[dict, dict]:
    def split(x: Tensor, y: Tensor, g: Tensor) -> dict:
        logits = model(x).squeeze(1)
        metrics = fairness.fairness_metrics(logits, y, g, problem.num_groups, args.constraint, args.epsilon,
                                            problem.constrained)
        metrics["feasible"] = metrics["max_violation"] <= args.tolerance
        # Rates of groups of a few rows are mostly noise on a held-out split; this view leaves them out.
        large = problem.constrained & (torch.bincount(g, minlength=problem.num_groups) >= args.large_group_rows)
        metrics["large_groups"] = int(large.sum())
        metrics["max_violation_large_groups"] = fairness.fairness_metrics(
            logits, y, g, problem.num_groups, args.constraint, args.epsilon, large)["max_violation"]
        return metrics

    return (split(problem.x_train, problem.y_train, problem.g_train),
            split(problem.x_test, problem.y_test, problem.g_test))


@torch.no_grad()
def _rates(problem: Problem, model: nn.Module) -> dict:
    def rates(x: Tensor, g: Tensor) -> list:
        return fairness.group_rates((model(x).squeeze(1) > 0).float(), g, problem.num_groups).tolist()

    return {"train": rates(problem.x_train, problem.g_train), "test": rates(problem.x_test, problem.g_test)}


# --------------------------------------------------------------------------------------------------
# The report.

def summarize(args: argparse.Namespace, problem: Problem, results: list[RunResult], wall_s: float) -> dict:
    sweep = [r for r in results if r.spec.formulation == args.penalty_formulation]
    lagrangian = next(r for r in results if r.spec.formulation == "lagrangian")
    best_penalty = max((r for r in sweep if r.train["feasible"]), key=lambda r: r.train["accuracy"], default=None)
    closest_penalty = min(sweep, key=lambda r: r.train["max_violation"], default=None)
    early = max((r for r in sweep if r.best_feasible_anywhere), default=None,
                key=lambda r: r.best_feasible_anywhere["accuracy"])
    gap = None if best_penalty is None else best_penalty.train["accuracy"] - lagrangian.train["accuracy"]
    sizes_train, sizes_test, keep = problem.sizes_train, problem.sizes_test, problem.constrained
    return {
        "num_runs": len(results),
        "sweep_runs": len(sweep),
        "sweep_feasible": sum(r.train["feasible"] for r in sweep),
        "best_feasible_penalty": _brief(best_penalty),
        "least_violating_penalty": _brief(closest_penalty),
        "best_feasible_penalty_iterate_anywhere": early and {"run": early.spec.label, **early.best_feasible_anywhere},
        "lagrangian": {**_brief(lagrangian), "feasible": lagrangian.train["feasible"],
                       "last_iterate_max_violation": lagrangian.last_train["max_violation"]},
        "accuracy_gap_to_best_feasible_penalty": gap,
        # The criterion: feasible on train, and within 2 points of the best feasible penalty run.
        "criterion_met": bool(lagrangian.train["feasible"] and (gap is None or gap <= 0.02)),
        "num_groups": problem.num_groups,
        "constrained_groups": int(keep.sum()),
        "unconstrained_small_groups": int((~keep & (sizes_train > 0)).sum()),
        "smallest_constrained_group_train": int(sizes_train[keep].min()),
        "smallest_constrained_group_test": int(sizes_test[keep].min()),
        "wall_s": wall_s,
    }


def _brief(run: Optional[RunResult]) -> Optional[dict]:
    if run is None:
        return None
    return {"run": run.spec.label, "accuracy": run.train["accuracy"], "max_violation": run.train["max_violation"]}


def group_table(problem: Problem, results: list[RunResult]) -> list[dict]:
    by_label = {r.spec.label: r for r in results}
    rows = []
    for k in range(problem.num_groups):
        row = {"group": problem.group_names[k], "train_size": int(problem.sizes_train[k]),
               "test_size": int(problem.sizes_test[k]), "constrained": bool(problem.constrained[k])}
        for label in ("unconstrained", "lagrangian"):
            if label in by_label:
                rates = by_label[label].rates
                row[f"{label}_rate_train"] = rates["train"][k]
                row[f"{label}_rate_test"] = rates["test"][k]
        rows.append(row)
    return rows


def format_report(args: argparse.Namespace, problem: Problem, results: list[RunResult], summary: dict) -> str:
    gap_name = {"dp": "DP gap", "eo": "EO gap", "group-loss": "DP gap"}[args.constraint]
    gap_key = "eo_gap" if args.constraint == "eo" else "dp_gap"
    lines = [
        f"{problem.name}: {problem.num_groups} groups, {summary['constrained_groups']} constrained "
        f"(>= {args.min_group_size} rows), {summary['unconstrained_small_groups']} smaller left out; "
        f"constraint {args.constraint}, epsilon {args.epsilon}, feasible = max violation <= {args.tolerance}",
        f"train {len(problem.y_train):,} rows, test {len(problem.y_test):,} rows; smallest constrained group: "
        f"{summary['smallest_constrained_group_train']} train rows, {summary['smallest_constrained_group_test']} "
        f"test rows; MLP hidden {args.hidden}, LagrangianAdam lr {args.lr}, {args.epochs} full-batch epochs",
        "",
    ]
    large = f"viol>={args.large_group_rows}"
    header = (f"{'run':<16} {'step':>5} | {'acc':>6} {gap_name:>7} {'max viol':>8} {'#viol':>5} {'worst err':>9} "
              f"{'feas':>4} | {'acc':>6} {gap_name:>7} {'max viol':>8} {'#viol':>5} {large:>9} {'worst err':>9} "
              f"| {'time s':>6}")
    lines += [f"{'':<16} {'':>5} | {'TRAIN':^46} | {'TEST':^50} |", header, "-" * len(header)]
    for r in results:
        tr, te = r.train, r.test
        lines.append(
            f"{r.spec.label:<16} {r.selected_step:>5} | {tr['accuracy']:>6.4f} {tr[gap_key]:>7.4f} "
            f"{tr['max_violation']:>8.4f} {tr['groups_violated']:>5d} {tr['worst_group_error']:>9.4f} "
            f"{'yes' if tr['feasible'] else 'no':>4} | {te['accuracy']:>6.4f} {te[gap_key]:>7.4f} "
            f"{te['max_violation']:>8.4f} {te['groups_violated']:>5d} {te['max_violation_large_groups']:>9.4f} "
            f"{te['worst_group_error']:>9.4f} | {r.wall_s:>6.1f}")
    lines += [
        f"step: iterate returned (most accurate train-feasible one of the last {args.select_window:.0%} of steps, "
        f"else the last); #viol: groups over epsilon; viol>={args.large_group_rows}: max violation over groups "
        f"with >= {args.large_group_rows} rows in the split; worst err: worst group's error rate",
        "",
    ]
    best, closest, early = (summary[key] for key in ("best_feasible_penalty", "least_violating_penalty",
                                                     "best_feasible_penalty_iterate_anywhere"))
    lines.append(f"penalty sweep ({summary['sweep_runs']} runs): {summary['sweep_feasible']} feasible on train"
                 + (f"; best feasible: {best['run']}, accuracy {best['accuracy']:.4f}" if best else "")
                 + (f"; least violating: {closest['run']}, max violation {closest['max_violation']:.4f}, "
                    f"accuracy {closest['accuracy']:.4f}" if closest else ""))
    if early:
        lines.append(f"  any iterate allowed (early ones too), the best train-feasible penalty iterate: {early['run']} "
                     f"at step {early['step']}, accuracy {early['accuracy']:.4f}")
    lagrangian, gap = summary["lagrangian"], summary["accuracy_gap_to_best_feasible_penalty"]
    lines.append(
        f"lagrangian (1 run): accuracy {lagrangian['accuracy']:.4f}, "
        f"{'feasible' if lagrangian['feasible'] else 'INFEASIBLE'} on train (max violation "
        f"{lagrangian['max_violation']:.4f}; last iterate {lagrangian['last_iterate_max_violation']:.4f})"
        + (f", {-100 * gap:+.2f} points vs the best feasible penalty run" if gap is not None else ""))
    lines.append(f"criterion (feasible on train, within 2 points of the best feasible penalty run): "
                 f"{'met' if summary['criterion_met'] else 'NOT met'}; {summary['num_runs']} runs, "
                 f"{summary['wall_s']:.1f} s")
    lines += ["", "largest test-set gaps of the lagrangian run (constrained groups):"]
    lines += _worst_test_groups(args, problem, results)
    return "\n".join(lines)


def _worst_test_groups(args: argparse.Namespace, problem: Problem, results: list[RunResult],
                       count: int = 5) -> list[str]:
    lagrangian = next(r for r in results if r.spec.formulation == "lagrangian")
    if args.constraint != "dp":
        return ["  (per-group rates are listed for demographic parity only)"]
    test_rates = torch.tensor(lagrangian.rates["test"], dtype=torch.float64)
    overall = float(torch.nansum(test_rates * problem.sizes_test) / problem.sizes_test.sum())
    gaps = (test_rates - overall).abs()
    gaps[~problem.constrained | torch.isnan(gaps)] = -1
    lines = []
    for k in torch.argsort(gaps, descending=True)[:count].tolist():
        if gaps[k] < 0:
            break
        lines.append(f"  {problem.group_names[k]:<40} test rate {test_rates[k]:.3f} vs overall {overall:.3f} "
                     f"({int(problem.sizes_test[k])} test rows, {int(problem.sizes_train[k])} train rows)")
    return lines


def write_outputs(args: argparse.Namespace, problem: Problem, results: list[RunResult], summary: dict) -> dict:
    from .demo_plots import plot_training, plot_tradeoff

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "training": str(plot_training(results, args, out / "training.png")),
        "tradeoff": str(plot_tradeoff(results, args, out / "tradeoff.png")),
    }
    report = {
        "config": {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()},
        "dataset": problem.name,
        "summary": summary,
        "runs": [r.to_json() for r in results],
        "groups": group_table(problem, results),
        "plots": plots,
    }
    (out / "report.json").write_text(json.dumps(_strict_json(report), indent=2, allow_nan=False))
    return report


def _strict_json(value):
    """NaN (e.g. a rate over a split where no constrained group has a row) becomes null: valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------
# Command line.

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fused-lagrangian demo", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--groups", default="race,sex,age",
                        help=f"comma list of {','.join(GROUP_KEYS)} (Adult only; race,sex,age: 59 groups)")
    parser.add_argument("--constraint", choices=fairness.CONSTRAINTS, default="dp",
                        help="dp: demographic parity, eo: equal opportunity, group-loss: bounded group loss")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="bound of the constraint (None: 0.05 for dp and eo, 0.4 for group-loss)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="a run is feasible when its max violation over epsilon is at most this")
    parser.add_argument("--epochs", type=int, default=1500, help="full-batch steps per run")
    parser.add_argument("--dataset", choices=("adult", "synthetic"), default="adult",
                        help="the bundled UCI Adult, or make_synthetic's 540 long-tailed groups (--rows)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic data set")
    parser.add_argument("--penalties", default=",".join(f"{c:g}" for c in DEFAULT_PENALTIES),
                        help="comma list of penalty coefficients c of the sweep")
    parser.add_argument("--penalty-formulation", choices=("quadratic", "penalty"), default="quadratic",
                        help="quadratic: (c/2) relu(g)^2; penalty: c g (cancels out on two-sided parity)")
    parser.add_argument("--min-group-size", type=int, default=None,
                        help="groups with fewer training rows (positives for eo) are not constrained "
                             "(None: 10 on adult, 51 of its 59 race x sex x age groups; 50 on synthetic)")
    parser.add_argument("--large-group-rows", type=int, default=100,
                        help="the report's 'viol>=N' column only counts groups with at least N rows in the split")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the MLP")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--dual-lr", type=float, default=1e-2, help="multiplier learning rate")
    parser.add_argument("--kp", type=float, default=10.0, help="nuPI proportional gain (0: plain ascent)")
    parser.add_argument("--select-window", type=float, default=0.2,
                        help="a constrained run returns its most accurate train-feasible iterate of this final "
                             "fraction of its steps, else its last iterate (0: always the last iterate)")
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--final-lr-fraction", type=float, default=0.01, help="cosine schedule: final lr / lr")
    parser.add_argument("--record-every", type=int, default=10, help="steps between points of the plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="demo_out", help="folder for report.json and the plots")
    parser.add_argument("--backend", default="auto", help="fused_step backend (auto, reference, native, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.min_group_size is None:
        args.min_group_size = 10 if args.dataset == "adult" else 50
    if args.epsilon is None:
        args.epsilon = 0.4 if args.constraint == "group-loss" else 0.05
    args.groups = tuple(key.strip() for key in args.groups.split(",") if key.strip())
    unknown = [key for key in args.groups if key not in GROUP_KEYS]
    if unknown:
        parser.error(f"--groups: unknown {unknown}; choose from {','.join(GROUP_KEYS)}")
    try:
        args.penalties = tuple(float(c) for c in args.penalties.split(",") if c.strip())
    except ValueError:
        parser.error(f"--penalties must be a comma list of numbers, got {args.penalties!r}")
    if any(c <= 0 for c in args.penalties):
        parser.error("--penalties must be positive")
    if args.epochs < 1 or args.record_every < 1:
        parser.error("--epochs and --record-every must be >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    problem = load_problem(args)
    specs = [RunSpec("unconstrained", None)]
    specs += [RunSpec(f"penalty c={c:g}", args.penalty_formulation, c) for c in args.penalties]
    specs.append(RunSpec("lagrangian", "lagrangian"))
    results = [train_run(args, problem, spec, progress=not args.no_progress) for spec in specs]
    summary = summarize(args, problem, results, time.perf_counter() - start)
    print(format_report(args, problem, results, summary))
    report = write_outputs(args, problem, results, summary)
    print(f"\nwrote {Path(args.out) / 'report.json'}, {report['plots']['training']}, {report['plots']['tradeoff']}")
    return 0
