"""The demo's PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen before pyplot loads)

if TYPE_CHECKING:
    import argparse

    from .demo_training import RunResult


def plot_training(results: list["RunResult"], args: "argparse.Namespace", path: Path) -> Path:
    """Max train violation of every run, and the Lagrangian run's multipliers, over training."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    penalties = [r for r in results if r.spec.is_penalty]
    colors = plt.cm.viridis([i / max(1, len(penalties) - 1) for i in range(len(penalties))])
    for run, color in zip(penalties, colors):
        top.plot(run.history["step"], run.history["max_violation"], color=color, lw=1, alpha=0.8, label=run.spec.label)
    for run in results:
        if run.spec.formulation is None:
            top.plot(run.history["step"], run.history["max_violation"], color="grey", ls=":", label=run.spec.label)
        elif run.spec.formulation == "lagrangian" and run.spec.dual_lr_scale != 1.0:
            top.plot(run.history["step"], run.history["max_violation"], color="crimson", lw=0.8, alpha=0.5,
                     ls="--" if run.spec.dual_lr_scale > 1 else "-.", label=run.spec.label)
        elif run.spec.formulation == "lagrangian":
            top.plot(run.history["step"], run.history["max_violation"], color="crimson", lw=2, label=run.spec.label)
            top.axvline(run.selected_step, color="crimson", ls=":", lw=1, label="lagrangian: iterate returned")
            _plot_multipliers(bottom, run)
    top.axhline(args.tolerance, color="black", ls="--", lw=1, label=f"tolerance {args.tolerance:g}")
    top.set_yscale("symlog", linthresh=1e-2)
    top.set_ylim(bottom=0)
    top.set_ylabel(f"max violation over epsilon (train, hard {args.constraint})")
    top.legend(fontsize=7, ncol=2)
    top.set_title("Constraint violation during training")
    bottom.set_xlabel("step" + (" (full batch)" if args.batch_size is None else f" (batch {args.batch_size})"))
    bottom.set_ylabel("Lagrange multiplier")
    bottom.set_title("Lagrangian run: one line per constraint")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_multipliers(axis, run: "RunResult") -> None:
    steps = run.history["step"]
    per_block = [np.asarray(records) for records in zip(*run.history["multipliers"])]  # records x constraints
    names = (("upper: rate_k - overall <= eps", "lower: rate_k - overall >= -eps") if len(per_block) == 2
             else ("group bound",))
    for curves, name, color in zip(per_block, names, ("tab:red", "tab:blue")):
        axis.plot(steps, curves, color=color, lw=0.6, alpha=0.5)
        axis.plot([], [], color=color, label=name)
    axis.legend(fontsize=7)


def plot_tradeoff(results: list["RunResult"], args: "argparse.Namespace", path: Path) -> Path:
    """Accuracy against max violation for every run: train, test over all constrained groups, and test over the
    groups with at least ``large_group_rows`` test rows (where a test rate says something about the model)."""
    views = (("train", "max_violation", "train"),
             ("test", "max_violation", "test, all constrained groups"),
             ("test", "max_violation_large_groups", f"test, groups with >= {args.large_group_rows} test rows"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (split, key, title) in zip(axes, views):
        for run in results:
            metrics = getattr(run, split)
            x, y = metrics[key], metrics["accuracy"]
            if run.spec.formulation == "lagrangian":
                main = run.spec.dual_lr_scale == 1.0
                axis.scatter(x, y, marker="*", s=220 if main else 80, color="crimson", alpha=1.0 if main else 0.5,
                             zorder=3, label="lagrangian (1 run)" if main else None)
                if not main:
                    axis.annotate(f"dual_lr x{run.spec.dual_lr_scale:g}", (x, y), fontsize=7, xytext=(4, -8),
                                  textcoords="offset points", color="crimson")
            elif run.spec.formulation is None:
                axis.scatter(x, y, marker="x", s=60, color="grey", label="unconstrained")
            elif run.spec.formulation == "thresholds":
                axis.scatter(x, y, marker="D", s=50, color="tab:orange", label="group thresholds (post-processing)")
            else:
                axis.scatter(x, y, marker="o", s=30, color="tab:blue",
                             label="penalty sweep" if run is _first_penalty(results) else None)
                axis.annotate(f"c={run.spec.penalty:g}", (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
        axis.axvline(args.tolerance, color="black", ls="--", lw=1)
        axis.set_xscale("symlog", linthresh=1e-2)
        axis.set_xlim(0, 1.5 * max([args.tolerance] + [getattr(r, split)[key] for r in results]))
        axis.margins(y=0.1)
        axis.set_xlabel(f"max violation over the bound ({title})")
        axis.set_ylabel(f"accuracy ({split})")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    fig.suptitle(f"left of the dashed line ({args.tolerance:g}) = feasible", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_groups(groups: list[dict], args: "argparse.Namespace", path: Path) -> Path:
    """Each constrained group's test rate minus the overall rate, with its 95% Wilson interval, against the
    group's test rows: small groups show as what they are (wide intervals at the left)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    rows = [g for g in groups if g["constrained"] and g["test_size"] > 0]
    sizes = np.array([g["test_size"] for g in rows], dtype=float)
    for axis, label in zip(axes, ("unconstrained", "lagrangian")):
        if f"{label}_rate_test_interval" not in (rows[0] if rows else {}):
            axis.set_visible(False)
            continue
        rates = np.array([g[f"{label}_rate_test"] for g in rows])
        overall = rates[0] - rows[0][f"{label}_rate_test_minus_overall"]
        low, high = np.array([g[f"{label}_rate_test_interval"] for g in rows]).T
        outside = np.array([g[f"{label}_test_interval_outside_bound"] for g in rows], dtype=bool)
        for mask, color, name in ((~outside, "tab:blue", "interval meets the bound"),
                                  (outside, "crimson", "interval outside the bound")):
            axis.errorbar(sizes[mask], rates[mask] - overall,
                          # clipped: float rounding can put a bound a hair past a rate of exactly 0 or 1
                          yerr=np.clip([rates[mask] - low[mask], high[mask] - rates[mask]], 0, None), fmt="o",
                          ms=3, lw=0.7,
                          color=color, alpha=0.8, label=f"{name} ({int(mask.sum())})")
        axis.axhspan(-args.epsilon, args.epsilon, color="green", alpha=0.1, label=f"overall ± {args.epsilon:g}")
        bounds = np.array([g["bound"] for g in rows])
        if np.any(bounds > args.epsilon):
            looser = bounds > args.epsilon
            axis.scatter(np.repeat(sizes[looser], 2), np.concatenate([bounds[looser], -bounds[looser]]), marker="_",
                         s=40, color="green", label="a small group's looser bound (--slack)")
        axis.axvline(args.large_group_rows, color="black", ls=":", lw=1,
                     label=f"{args.large_group_rows} test rows (large groups to the right)")
        axis.set_xscale("log")
        axis.set_xlabel("test rows of the group (n)")
        axis.set_title(f"{label}: test rate - overall ({len(rows)} constrained groups)", fontsize=10)
        axis.legend(fontsize=7)
    axes[0].set_ylabel("test positive rate - overall, 95% Wilson interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _first_penalty(results: list["RunResult"]):
    return next((r for r in results if r.spec.is_penalty), None)
