"""A large constrained run: a million rows, 540 group-parity constraints and one loss bound per row.

    python examples/large_synthetic.py                          # 10^6 rows, 4 epochs of batch 4096
    python examples/large_synthetic.py --rows 10000000 --epochs 1

Synthetic data (``fused_lagrangian_apps.datasets.make_synthetic``: 5 races x 2 sexes x 6 age bins x 9 regions = 540
long-tailed groups with group-specific base rates).  One LagrangianAdam carries three blocks, all moved in
the same ``step()``:

  demographic parity   two grouped blocks of 540 constraints: |rate_k - overall| <= epsilon
  per-row loss bound   an indexed block of one constraint per training row: loss_i <= --loss-bound

Each mini-batch passes its rows' group ids and row ids; only the constraints it touches move, so a step
costs O(batch) whatever the number of rows.  Prints the time of each phase and the constraint metrics of
the final model on a full pass over train and test (and of an unconstrained model with ``--baseline``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fused_lagrangian import LagrangianAdam
from fused_lagrangian_apps.datasets import make_synthetic
from fused_lagrangian.fairness import demographic_parity, fairness_metrics, per_sample_loss_bound


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epsilon", type=float, default=0.05, help="demographic parity bound")
    parser.add_argument("--loss-bound", type=float, default=2.0, help="per-row cross-entropy bound")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dual-lr", type=float, default=0.02, help="parity multipliers")
    # A row's term is lambda_i * loss_i, summed over the batch, next to a mean loss of weight 1/batch per row:
    # a small step keeps the per-row multipliers on that scale (0.05 lets them swamp the objective).
    parser.add_argument("--row-dual-lr", type=float, default=1e-3, help="per-row multipliers")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--baseline", action="store_true", help="also train without constraints, for comparison")
    return parser.parse_args()


def train(args: argparse.Namespace, train_data, constrained: bool) -> tuple[nn.Module, dict]:
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(train_data.x.shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    optimizer = LagrangianAdam(model.parameters(), lr=args.lr, backend=args.backend)
    num_rows = len(train_data.y)
    if constrained:
        parity = demographic_parity(optimizer, train_data.num_groups, args.epsilon, dual_lr=args.dual_lr)
        row_bound = per_sample_loss_bound(optimizer, num_rows, args.loss_bound, dual_lr=args.row_dual_lr)
    generator = torch.Generator().manual_seed(args.seed)
    steps, start = 0, time.perf_counter()
    for _ in range(args.epochs):
        for rows in torch.randperm(num_rows, generator=generator).split(args.batch_size):
            logits = model(train_data.x[rows]).squeeze(1)
            losses = F.binary_cross_entropy_with_logits(logits, train_data.y[rows], reduction="none")
            loss = losses.mean()
            if constrained:
                loss = loss + parity(logits, train_data.g[rows]) + row_bound(losses, ids=rows)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    seconds = time.perf_counter() - start
    timing = {"steps": steps, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps}
    if constrained:
        timing["row_multipliers_nonzero"] = int((row_bound.multipliers > 0).sum())
        timing["parity_multiplier_max"] = float(torch.cat([b.multipliers for b in parity.blocks]).max())
    return model, timing


@torch.no_grad()
def evaluate(model: nn.Module, data, args: argparse.Namespace) -> dict:
    logits = torch.cat([model(chunk).squeeze(1) for chunk in data.x.split(1 << 18)])
    metrics = fairness_metrics(logits, data.y, data.g, data.num_groups, "dp", args.epsilon)
    losses = F.binary_cross_entropy_with_logits(logits, data.y, reduction="none")
    metrics["rows_over_loss_bound"] = float((losses > args.loss_bound).float().mean())
    return metrics


def describe(name: str, split: str, m: dict) -> str:
    return (f"{name:<14} {split:<5} accuracy {m['accuracy']:.4f}  DP gap {m['dp_gap']:.4f}  "
            f"max violation {m['max_violation']:.4f}  groups violated {m['groups_violated']:>3}  "
            f"worst-group error {m['worst_group_error']:.3f}  rows over loss bound {m['rows_over_loss_bound']:.3%}")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    data = make_synthetic(args.rows, seed=args.seed)
    train_data, test_data = data.train_test_split(0.1)
    generated = time.perf_counter() - start
    sizes = train_data.group_sizes
    print(f"synthetic: {args.rows:,} rows ({len(train_data.y):,} train) generated in {generated:.1f} s; "
          f"{data.num_groups} groups, train sizes {int(sizes.min())} to {int(sizes.max()):,}; "
          f"threads {torch.get_num_threads()}")
    print(f"constraints: 2 x {data.num_groups} parity (epsilon {args.epsilon}) + {len(train_data.y):,} per-row "
          f"(loss <= {args.loss_bound}); batch {args.batch_size}, {args.epochs} epochs")
    runs = [("unconstrained", False)] if args.baseline else []
    runs.append(("lagrangian", True))
    for name, constrained in runs:
        model, timing = train(args, train_data, constrained)
        print(f"{name:<14} {timing['steps']} steps in {timing['seconds']:.1f} s "
              f"({timing['ms_per_step']:.2f} ms/step)"
              + (f"; nonzero row multipliers {timing['row_multipliers_nonzero']:,}, "
                 f"max parity multiplier {timing['parity_multiplier_max']:.3f}" if constrained else ""))
        print(describe(name, "train", evaluate(model, train_data, args)))
        print(describe(name, "test", evaluate(model, test_data, args)))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
