"""Feasible learning on UCI Adult: every training row's loss <= epsilon, one multiplier per row.

    python examples/feasible_learning.py                       # 30,162 constraints, mini-batches of 512
    python examples/feasible_learning.py --epochs 1 --batch-size 4096

Feasible learning (Ramirez et al., 2025) replaces "minimise the average loss" by "bring every sample's loss
under epsilon": min 0 s.t. loss_i <= epsilon for each training row i.  That is an indexed block of
``num_constraints = rows`` multipliers; each mini-batch passes its rows' losses with their row ids, and only
those rows' multipliers move in ``step()``.  The multipliers then weight the rows (hard rows get large
weights), so no per-sample weighting code is needed.  For comparison the script also trains the same MLP
by plain ERM (mean loss), alternating the two runs step by step so that their ms/step figures compare, and
prints both loss distributions and what they mean: the default bound is infeasible for many rows, and
the method trades the typical row's loss for the worst rows'.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_lagrangian import LagrangianAdam
from fused_lagrangian_apps.datasets import load_adult
from fused_lagrangian.fairness import per_sample_loss_bound

WARMUP_STEPS = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.5,
                        help="per-row bound on the cross-entropy (0.5: probability of the true label >= 0.61)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dual-lr", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    return parser.parse_args()


@dataclasses.dataclass
class Run:
    """One training run: its model, optimizer, the per-row bound (feasible learning only) and its clock."""

    name: str
    model: nn.Module
    optimizer: LagrangianAdam
    bound: Optional[object]
    seconds: float = 0.0
    timed_steps: int = 0


def make_run(name: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, feasible_learning: bool) -> Run:
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(x.shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    optimizer = LagrangianAdam(model.parameters(), lr=args.lr, backend=args.backend)
    # init=1: with no objective, zero multipliers would give no gradient before the first dual step.
    bound = per_sample_loss_bound(optimizer, len(y), args.epsilon, dual_lr=args.dual_lr, init=1.0) \
        if feasible_learning else None
    return Run(name, model, optimizer, bound)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> None:
    losses = F.binary_cross_entropy_with_logits(run.model(x[rows]).squeeze(1), y[rows], reduction="none")
    loss = run.bound(losses, ids=rows) if run.bound is not None else losses.mean()
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad()


def train_interleaved(runs: list[Run], args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    """Both runs see the same batches, one step each in turn, so a busy machine slows both alike and the
    ms/step figures compare; the first WARMUP_STEPS of each (backend resolution, allocations) are untimed."""
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for _ in range(args.epochs):
        for rows in torch.randperm(len(y), generator=generator).split(args.batch_size):
            for run in runs:
                start = time.perf_counter()
                train_step(run, x, y, rows)
                if step >= WARMUP_STEPS:
                    run.seconds += time.perf_counter() - start
                    run.timed_steps += 1
            step += 1


@torch.no_grad()
def measure(model: nn.Module, data, epsilon: float) -> dict:
    def split(x, y) -> tuple[float, torch.Tensor]:
        logits = model(x).squeeze(1)
        return float(((logits > 0).float() == y).float().mean()), \
            F.binary_cross_entropy_with_logits(logits, y, reduction="none")

    train_accuracy, train_losses = split(data.x_train, data.y_train)
    test_accuracy, test_losses = split(data.x_test, data.y_test)
    q = torch.quantile(train_losses, torch.tensor([0.5, 0.9, 0.99]))
    return {"train_under": float((train_losses <= epsilon).float().mean()),
            "test_under": float((test_losses <= epsilon).float().mean()),
            "mean": float(train_losses.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": float(train_losses.max()), "train_accuracy": train_accuracy, "test_accuracy": test_accuracy}


def describe(name: str, m: dict, epsilon: float) -> str:
    return (f"{name:<18} rows with loss <= {epsilon:g}: train {m['train_under']:6.2%}  test {m['test_under']:6.2%}"
            f" | train loss mean {m['mean']:.3f} p50 {m['p50']:.3f} p90 {m['p90']:.3f} p99 {m['p99']:.3f} max "
            f"{m['max']:.2f} | accuracy train {m['train_accuracy']:.4f} test {m['test_accuracy']:.4f}")


def explain(erm: dict, fl: dict, multipliers: torch.Tensor, epsilon: float) -> str:
    """What the lines above mean: whether the bound was reachable, and what the method traded for the worst rows."""
    lines = ["", "What this shows:"]
    if fl["max"] > epsilon:
        lines += [f"- The bound (every row's loss <= {epsilon:g}) is infeasible for this model: plain training leaves",
                  f"  {1 - erm['train_under']:.0%} of the rows above it, and some rows (ambiguous or mislabelled) cannot "
                  "get under it at all.",
                  f"  Their multipliers keep growing (max {float(multipliers.max()):.1f}, mean "
                  f"{float(multipliers.mean()):.2f}) and keep pulling the model towards them."]
    else:
        lines += [f"- Every training row ends with a loss <= {epsilon:g}: the bound is feasible and met."]
    lines += ["- Feasible learning trades the typical row for the worst ones:",
              f"  max training loss {erm['max']:.2f} -> {fl['max']:.2f}, p99 {erm['p99']:.2f} -> {fl['p99']:.2f}, "
              f"median {erm['p50']:.3f} -> {fl['p50']:.3f}.",
              "  A row under the bound has its multiplier fall to 0 and is no longer pushed down (there is no",
              "  objective to push it), so rows gather near epsilon, some just above it:",
              f"  {fl['train_under']:.0%} of the rows end under the bound ({erm['train_under']:.0%} with plain "
              f"training); test accuracy {erm['test_accuracy']:.3f} -> {fl['test_accuracy']:.3f}.",
              "- To get a feasible problem, pick epsilon from plain training's losses (its p90 here: "
              f"{erm['p90']:.2f}),",
              "  or bound the multipliers (max_multiplier=) or add slack (damping=) so that hopeless rows stop "
              "dominating."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    data = load_adult()
    print(f"UCI Adult: {len(data.y_train):,} training rows = {len(data.y_train):,} constraints "
          f"(loss_i <= {args.epsilon:g}), batch {args.batch_size}, {args.epochs} epochs; the two runs "
          "alternate steps on the same batches")
    runs = [make_run("ERM (mean loss)", args, data.x_train, data.y_train, feasible_learning=False),
            make_run("feasible learning", args, data.x_train, data.y_train, feasible_learning=True)]
    train_interleaved(runs, args, data.x_train, data.y_train)
    results = {}
    for run in runs:
        results[run.name] = measure(run.model, data, args.epsilon)
        print(describe(run.name, results[run.name], args.epsilon))
        print(f"{'':<18} {1e3 * run.seconds / max(run.timed_steps, 1):.2f} ms/step (mean of "
              f"{run.timed_steps} timed steps, after {WARMUP_STEPS} untimed)")
    multipliers = runs[1].bound.multipliers
    print(f"{'':<18} multipliers: mean {float(multipliers.mean()):.3f}, max {float(multipliers.max()):.3f}, "
          f"rows at 0 (constraint slack) {float((multipliers == 0).float().mean()):.2%}")
    print(explain(results["ERM (mean loss)"], results["feasible learning"], multipliers, args.epsilon))


if __name__ == "__main__":
    main()
