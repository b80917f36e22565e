"""Feasible learning on UCI Adult: every training row's loss <= epsilon, one multiplier per row.

    python examples/feasible_learning.py                       # 30,162 constraints, mini-batches of 512
    python examples/feasible_learning.py --epochs 1 --batch-size 4096

Feasible learning (Ramirez et al., 2025) replaces "minimise the average loss" by "bring every sample's loss
under epsilon": min 0 s.t. loss_i <= epsilon for each training row i.  That is an indexed block of
``num_constraints = rows`` multipliers; each mini-batch passes its rows' losses with their row ids, and only
those rows' multipliers move in ``step()``.  The multipliers then weight the rows (hard rows get large
weights), so no per-sample weighting code is needed.  For comparison the script also trains the same MLP
by plain ERM (mean loss) and prints both loss distributions.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fused_lagrangian import LagrangianAdam
from fused_lagrangian_apps.datasets import load_adult
from fused_lagrangian.fairness import per_sample_loss_bound


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


def train(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, feasible_learning: bool) -> tuple:
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(x.shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    optimizer = LagrangianAdam(model.parameters(), lr=args.lr, backend=args.backend)
    # init=1: with no objective, zero multipliers would give no gradient before the first dual step.
    bound = per_sample_loss_bound(optimizer, len(y), args.epsilon, dual_lr=args.dual_lr, init=1.0) \
        if feasible_learning else None
    generator = torch.Generator().manual_seed(args.seed)
    steps, start = 0, time.perf_counter()
    for _ in range(args.epochs):
        for rows in torch.randperm(len(y), generator=generator).split(args.batch_size):
            losses = F.binary_cross_entropy_with_logits(model(x[rows]).squeeze(1), y[rows], reduction="none")
            loss = bound(losses, ids=rows) if bound is not None else losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return model, bound, steps, time.perf_counter() - start


@torch.no_grad()
def describe(name: str, model: nn.Module, data, epsilon: float) -> str:
    def split(x, y) -> tuple[float, torch.Tensor]:
        logits = model(x).squeeze(1)
        return float(((logits > 0).float() == y).float().mean()), \
            F.binary_cross_entropy_with_logits(logits, y, reduction="none")

    train_accuracy, train_losses = split(data.x_train, data.y_train)
    test_accuracy, test_losses = split(data.x_test, data.y_test)
    q = torch.quantile(train_losses, torch.tensor([0.5, 0.9, 0.99]))
    return (f"{name:<18} rows with loss <= {epsilon:g}: train {float((train_losses <= epsilon).float().mean()):6.2%}"
            f"  test {float((test_losses <= epsilon).float().mean()):6.2%} | train loss mean "
            f"{float(train_losses.mean()):.3f} p50 {q[0]:.3f} p90 {q[1]:.3f} p99 {q[2]:.3f} max "
            f"{float(train_losses.max()):.2f} | accuracy train {train_accuracy:.4f} test {test_accuracy:.4f}")


def main() -> None:
    args = parse_args()
    data = load_adult()
    print(f"UCI Adult: {len(data.y_train):,} training rows = {len(data.y_train):,} constraints "
          f"(loss_i <= {args.epsilon:g}), batch {args.batch_size}, {args.epochs} epochs")
    for name, feasible_learning in (("ERM (mean loss)", False), ("feasible learning", True)):
        model, bound, steps, seconds = train(args, data.x_train, data.y_train, feasible_learning)
        print(describe(name, model, data, args.epsilon))
        print(f"{'':<18} {steps} steps in {seconds:.1f} s ({1e3 * seconds / steps:.2f} ms/step)")
        if bound is not None:
            lam = bound.multipliers
            print(f"{'':<18} multipliers: mean {float(lam.mean()):.3f}, max {float(lam.max()):.3f}, "
                  f"rows at 0 (constraint slack) {float((lam == 0).float().mean()):.2%}")


if __name__ == "__main__":
    main()
