"""``fused-lagrangian demo``: one constrained run against a penalty sweep, on fairness constraints.

The main job: UCI Adult, race x sex x age groups, demographic parity epsilon = 0.05 to the overall rate,
a small MLP trained full-batch with LagrangianAdamW.  It trains

  (a) the unconstrained model,
  (b) a fixed-penalty sweep: the quadratic penalty (c/2) * sum_k relu(g_k)^2 for every c of the grid,
  (c) post-processing: the unconstrained model with one decision threshold per group, fitted on the
      training rows to hold the constraints (Hardt et al. 2016; the form of the most accurate parity-
      constrained classifier, and the usual baseline for an in-training method),
  (d) one Lagrangian run (multipliers moved by the hard rates, the sigmoid surrogate drives the model),
  (e) the same Lagrangian run at 0.3x and 3x its dual_lr (how much the result depends on that setting),

then prints train and test metrics and writes report.json and PNG plots to ``--out``.  Many groups:
``--groups race,sex,age,education`` (687 groups); overlapping groups: ``--marginals race,sex`` (each race and
each sex constrained too, besides the intersections: a row in three groups).

Why the quadratic penalty is the baseline: the linear penalty c * g_k rewards over-satisfying a constraint,
and on a two-sided parity constraint the upper and lower terms cancel exactly (their sum is the constant
-2 c K epsilon), so it cannot move the model at all.  The squared hinge is what practitioners use.

Which groups are constrained, and how tightly.  Groups with fewer than ``--min-group-size`` (10) training
rows are left out (they still count in the overall rate): a group of one row has a rate of 0 or 1.  On
Adult this leaves 51 of the 59 race x sex x age groups constrained.  A group of n rows cannot measure its
rate closer than about 1.96 sqrt(r (1 - r) / n) (r the base rate): 0.27 at n = 10, 0.05 at n = 290.
``--slack 1.96`` (the default) gives each group the bound max(epsilon, that half-width): large groups keep
epsilon, small ones are not held tighter than their rows can show.  Measured (seed 0, lr 0.01 and no dual
warm-up, report.json of ``--runs lagrangian --threads 1`` with and without ``--slack 0``): without it the run
swings (train max violation up to 0.12 after half of the steps, because the hard rates of 10-row groups jump by
0.1 and their multipliers keep moving; accuracy 0.809); with it at most 0.008 after half of the steps, last
iterate 0.007, accuracy 0.819.
The two-dataset scheme of Cotter et al. (ICML 2019), ``--held-out 0.3`` (multipliers driven by a held-out
30% of each group, library helper ``fairness.split_for_constraints``), improved the test violation of the
large groups at the default dual_lr only, and left the run infeasible on train: it is an option, not the
default (numbers in the README).

Honest test numbers.  Each group's test rate comes with its 95% Wilson interval; "#CI out" counts the
groups whose interval lies entirely outside overall +- bound, a violation that the test split's sampling
noise cannot explain.  The test max violation is also reported over groups with >= 100 test rows,
against epsilon itself: a rate of 4 test rows says almost nothing about the model.
The report states the splits' own sampling noise as well: how far the unconstrained model's group rates
(minus the overall rate) move between train and test in those large groups.  A run that holds a group at
its bound on train can exceed epsilon on test by about that much, whichever way it was trained.

Model selection is the same for every constrained run: each step's full-batch forward already yields the
hard train rates of the current parameters, so a run returns its most accurate train-feasible iterate
(max violation <= tolerance) of its last 20% of steps, and its last iterate when there is none (the "best
iterate" of Cotter et al., JMLR 2019, restricted to the end of training so that the nearly all-negative
initial model, trivially feasible, never wins); ``--select-window 0`` returns the last iterate.  With
``--batch-size N`` the iterates are judged once per epoch on the whole training split.

Learning rates and the dual rule, measured with ``--select-window 0 --threads 1`` over seeds x dual_lr
0.3x/1x/3x (tables in the README).  The schedule is the lever: the lr falls along a cosine to 1% over the first
half of the steps (``--anneal-fraction 0.5``) and holds there, so the multipliers settle while the model only
fine-tunes (with a cosine over the whole run the rows that a lower bound holds over the threshold fell back and
returned every ~16 steps: train max violation after half of the steps 0.055, median, full batch).  Full batch
runs at lr 0.005 and keeps the multipliers at 0 for the first 10% of the steps (``--dual-warmup 0.1``): an
early model predicts almost nobody positive, which satisfies every parity constraint, and with the 246 groups
of ``--groups race,sex,age,education`` runs at lr 0.01 that constrained from the first step stayed there on 2
of 5 seeds.  Seeds 0-5 x 0.3/1/3x dual_lr on the default groups: 16 of 18 last iterates feasible, none
over-satisfied, at most 0.032 after half of the steps (lr 0.01 without the warm-up: also 16 of 18, but swings
up to 0.28); 687 groups, seeds 0-4 at 1x: 5 of 5 feasible.  Minibatches (``--batch-size 1024``) keep lr 0.003,
no warm-up and the library's own dual rule for grouped blocks (running estimate, nuPI kp 20): 9 of 9 feasible,
at most 0.012 after half of the steps.  Full batch keeps kp 10 and dual_lr 0.05.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path
from typing import Optional

import torch

from fused_lagrangian import fairness

from .demo_problem import load_problem
from .demo_report import format_report, summarize, write_outputs
from .demo_training import RunSpec, thresholds_run, train_run
from .group_thresholds import RATE_CONSTRAINTS

GROUP_KEYS = ("race", "sex", "age", "marital", "education")
DEFAULT_PENALTIES = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
RUN_KINDS = ("unconstrained", "penalties", "thresholds", "lagrangian", "sensitivity")
SENSITIVITY_SCALES = (0.3, 3.0)
DEFAULT_STEPS = 1500
FULL_BATCH_LR, MINIBATCH_LR = 5e-3, 3e-3
FULL_BATCH_KP = 10.0  # minibatches: None, the library's default dual rule for grouped blocks
FULL_BATCH_DUAL_WARMUP = 0.1  # minibatches: 0 (measured: 7 of 9 runs feasible with it, 9 of 9 without)
TRAIN_ROWS_HINT = 30_162  # Adult's training rows: minibatch runs default to about DEFAULT_STEPS steps


# --------------------------------------------------------------------------------------------------
# Command line.

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    # Plain text: the docstring's reStructuredText literals (``x``) read as x on a terminal.
    parser = argparse.ArgumentParser(prog="fused-lagrangian demo", description=__doc__.replace("``", ""),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--groups", default="race,sex,age",
                        help=f"comma list of {','.join(GROUP_KEYS)} (Adult only; race,sex,age: 59 groups)")
    parser.add_argument("--marginals", default="",
                        help="comma list of attributes whose marginal groups (e.g. race,sex: each race, each sex) "
                             "are constrained too, overlapping the intersectional groups of --groups (Adult only)")
    parser.add_argument("--constraint", choices=fairness.CONSTRAINTS, default="dp",
                        help="dp: demographic parity, eo: equal opportunity, group-loss: bounded group loss")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="bound of the constraint (None: 0.05 for dp and eo, 0.4 for group-loss)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="a run is feasible when its max violation over epsilon is at most this")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training rows (None: 1500 full-batch steps, or about 1500 steps of "
                             "--batch-size)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (None: the full batch)")
    parser.add_argument("--held-out", type=float, default=0.0,
                        help="fraction of each group's training rows held out to drive the multipliers (the "
                             "two-dataset scheme of Cotter et al. 2019); the Lagrangian runs fit the rest")
    parser.add_argument("--held-out-min-rows", type=int, default=200,
                        help="--held-out splits only groups with at least this many training rows; the rows of "
                             "smaller groups both fit the model and drive the multipliers")
    parser.add_argument("--held-out-mode", choices=("held-out", "both"), default="held-out",
                        help="held-out: the multipliers see the held-out rows only; both: also every training row "
                             "(a second pair of blocks), so the run is train-feasible too")
    parser.add_argument("--slack", type=float, default=1.96,
                        help="z > 0: each group's bound is max(epsilon, z * sqrt(r (1 - r) / n_k)), r the base "
                             "rate, n_k its training rows: small groups are not held tighter than their rows can "
                             "measure (0: epsilon for every group)")
    parser.add_argument("--runs", default="unconstrained,penalties,thresholds,lagrangian,sensitivity",
                        help="which runs: unconstrained, penalties (the sweep), thresholds (post-processing: "
                             "the unconstrained model with per-group thresholds fitted on train; dp and eo "
                             "with one group per row only), lagrangian, sensitivity (the Lagrangian run at "
                             "0.3x and 3x dual_lr)")
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
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (None: 0.005 full batch, 0.003 with --batch-size; see 'Learning "
                             "rates' above)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW (decoupled) weight decay")
    parser.add_argument("--dual-lr", type=float, default=5e-2, help="multiplier learning rate")
    parser.add_argument("--kp", type=float, default=None,
                        help="nuPI proportional gain (0: plain projected ascent; None: 10 full batch, and with "
                             "--batch-size the library's default for grouped blocks, nuPI kp 20: the running "
                             "estimate lags, and a larger proportional gain makes up for it)")
    parser.add_argument("--augmented", type=float, default=0.0,
                        help="c > 0: the Lagrangian runs use the augmented Lagrangian with penalty c (a quadratic "
                             "term on the sigmoid rates besides the multipliers; 0: the plain Lagrangian)")
    parser.add_argument("--estimator", choices=("auto", "batch", "running"), default="auto",
                        help="the multipliers' violation estimate: this step's batch, or a running estimate "
                             "pooled over steps (auto: batch for full-batch training, running for minibatches)")
    parser.add_argument("--select-window", type=float, default=0.2,
                        help="a constrained run returns its most accurate train-feasible iterate of this final "
                             "fraction of its steps, else its last iterate (0: always the last iterate)")
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--final-lr-fraction", type=float, default=0.01, help="cosine schedule: final lr / lr")
    parser.add_argument("--anneal-fraction", type=float, default=0.5,
                        help="cosine schedule: the lr falls to its final value over this first fraction of the "
                             "steps and holds there (1: a cosine over the whole run)")
    parser.add_argument("--dual-warmup", type=float, default=None,
                        help="the Lagrangian runs keep their multipliers at their init (dual_lr 0) for this first "
                             "fraction of the steps, so that the constraints start from a model that predicts "
                             "(None: 0.1 full batch, 0 with --batch-size; 0: from the first step)")
    parser.add_argument("--record-every", type=int, default=10, help="steps between points of the plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="demo_out", help="folder for report.json and the plots")
    parser.add_argument("--backend", default="auto", help="fused_step backend (auto, reference, native, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (one line per finished run instead)")
    args = parser.parse_args(argv)
    if args.min_group_size is None:
        args.min_group_size = 10 if args.dataset == "adult" else 50
    if args.epsilon is None:
        args.epsilon = 0.4 if args.constraint == "group-loss" else 0.05
    args.groups = tuple(key.strip() for key in args.groups.split(",") if key.strip())
    args.marginals = tuple(key.strip() for key in args.marginals.split(",") if key.strip())
    unknown = [key for key in args.groups + args.marginals if key not in GROUP_KEYS]
    if unknown:
        parser.error(f"--groups: unknown {unknown}; choose from {','.join(GROUP_KEYS)}")
    try:
        args.penalties = tuple(float(c) for c in args.penalties.split(",") if c.strip())
    except ValueError:
        parser.error(f"--penalties must be a comma list of numbers, got {args.penalties!r}")
    if any(c <= 0 for c in args.penalties):
        parser.error("--penalties must be positive")
    args.runs = tuple(run.strip() for run in args.runs.split(",") if run.strip())
    if set(args.runs) - set(RUN_KINDS) or "lagrangian" not in args.runs:
        parser.error(f"--runs: a comma list of {','.join(RUN_KINDS)} that includes lagrangian, got {args.runs}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not 0.0 <= args.held_out < 1.0:
        parser.error("--held-out must be in [0, 1)")
    if args.held_out and args.constraint == "group-loss":
        parser.error("--held-out drives parity constraints (dp, eo) only")
    if args.epochs is None:
        args.epochs = DEFAULT_STEPS if args.batch_size is None else max(1, round(
            DEFAULT_STEPS * args.batch_size / TRAIN_ROWS_HINT))
    if args.lr is None:
        args.lr = FULL_BATCH_LR if args.batch_size is None else MINIBATCH_LR
    if args.kp is None and args.batch_size is None:
        args.kp = FULL_BATCH_KP
    if args.augmented < 0:
        parser.error("--augmented must be >= 0")
    if not 0.0 < args.anneal_fraction <= 1.0:
        parser.error("--anneal-fraction must be in (0, 1]")
    if args.dual_warmup is None:
        args.dual_warmup = FULL_BATCH_DUAL_WARMUP if args.batch_size is None else 0.0
    if not 0.0 <= args.dual_warmup < 1.0:
        parser.error("--dual-warmup must be in [0, 1)")
    if args.epochs < 1 or args.record_every < 1:
        parser.error("--epochs and --record-every must be >= 1")
    return args


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    specs = [RunSpec("unconstrained", None)] if "unconstrained" in args.runs else []
    if "penalties" in args.runs:
        specs += [RunSpec(f"penalty c={c:g}", args.penalty_formulation, c) for c in args.penalties]
    if "thresholds" in args.runs and thresholds_apply(args):
        specs.append(RunSpec("group thresholds", "thresholds"))
    specs.append(RunSpec("lagrangian", "lagrangian"))
    if "sensitivity" in args.runs:
        specs += [RunSpec(f"lagrangian x{scale:g}", "lagrangian", dual_lr_scale=scale) for scale in SENSITIVITY_SCALES]
    return specs


def thresholds_apply(args: argparse.Namespace) -> bool:
    """Per-group thresholds hold rate constraints (dp, eo) of disjoint groups: with --marginals a row sits in
    several groups and one threshold per row no longer follows from its group."""
    return args.constraint in RATE_CONSTRAINTS and not args.marginals


def reproducible_command(argv: list[str]) -> str:
    """The command line that reproduces the report (output folder and progress bars left out)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--out":
            skip = True
        elif item != "--no-progress" and not item.startswith("--out="):
            kept.append(item)
    return " ".join(["fused-lagrangian demo", *map(shlex.quote, kept)])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = reproducible_command(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    problem = load_problem(args)
    specs = run_specs(args)
    if "thresholds" in args.runs and not thresholds_apply(args):
        print("group thresholds: not run (they hold dp or eo over groups with one group per row)")
    results = []
    for number, spec in enumerate(specs, start=1):
        counter = f"run {number} of {len(specs)}"
        if spec.formulation == "thresholds":
            unconstrained = next((r for r in results if r.spec.formulation is None), None)
            results.append(thresholds_run(args, problem, unconstrained))
        else:
            results.append(train_run(args, problem, spec, progress=not args.no_progress, counter=counter))
        if args.no_progress:  # one line per finished run, so a long demo is never silent
            print(f"{counter}: {spec.label} done in {results[-1].wall_s:.1f} s", flush=True)
    summary = summarize(args, problem, results, time.perf_counter() - start)
    print(format_report(args, problem, results, summary))
    report = write_outputs(args, problem, results, summary, command)
    print(f"\nwrote {Path(args.out) / 'report.json'}, {report['plots']['training']}, {report['plots']['tradeoff']}")
    return 0
