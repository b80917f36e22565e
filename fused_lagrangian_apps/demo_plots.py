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

    from .demo import RunResult


def plot_training(results: list["RunResult"], args: "argparse.Namespace", path: Path) -> Path:
    """Max train violation of every run, and the Lagrangian run's multipliers, over training."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    penalties = [r for r in results if r.spec.formulation not in (None, "lagrangian")]
    colors = plt.cm.viridis([i / max(1, len(penalties) - 1) for i in range(len(penalties))])
    for run, color in zip(penalties, colors):
        top.plot(run.history["step"], run.history["max_violation"], color=color, lw=1, alpha=0.8, label=run.spec.label)
    for run in results:
        if run.spec.formulation is None:
            top.plot(run.history["step"], run.history["max_violation"], color="grey", ls=":", label=run.spec.label)
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
    bottom.set_xlabel("step (full batch)")
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
    """Accuracy against max violation for every run, train and test."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, split in zip(axes, ("train", "test")):
        for run in results:
            metrics = getattr(run, split)
            x, y = metrics["max_violation"], metrics["accuracy"]
            if run.spec.formulation == "lagrangian":
                axis.scatter(x, y, marker="*", s=220, color="crimson", zorder=3, label="lagrangian (1 run)")
            elif run.spec.formulation is None:
                axis.scatter(x, y, marker="x", s=60, color="grey", label="unconstrained")
            else:
                axis.scatter(x, y, marker="o", s=30, color="tab:blue",
                             label="penalty sweep" if run is _first_penalty(results) else None)
                axis.annotate(f"c={run.spec.penalty:g}", (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
        axis.axvline(args.tolerance, color="black", ls="--", lw=1)
        axis.set_xscale("symlog", linthresh=1e-2)
        axis.set_xlim(0, 1.5 * max([args.tolerance] + [getattr(r, split)["max_violation"] for r in results]))
        axis.margins(y=0.1)
        axis.set_xlabel(f"max violation over epsilon ({split})")
        axis.set_ylabel(f"accuracy ({split})")
        axis.set_title(f"{split}: left of the dashed line = feasible")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _first_penalty(results: list["RunResult"]):
    return next((r for r in results if r.spec.formulation not in (None, "lagrangian")), None)
