"""Dual rules on a minibatch problem with rare groups: is the last iterate feasible, and not over-satisfied?

    python bench/dual_sensitivity.py                 # the default dual options against the alternatives
    python bench/dual_sensitivity.py --rules default --seeds 0 1 2

The problem (public, synthetic, generated here): logistic regression on Gaussian features, 10 groups
whose sizes range from 30% to 1.5% of 40,000 rows, and one true-positive-rate constraint per group,
TPR_k >= 0.8, measured with hard 0/1 predictions for the dual (``dual_values``) and sigmoid scores for
the primal.  Minibatches of 100 hold ~0.5 positives of the rarest group.  For each rule and dual_lr the
script trains with LagrangianAdam and reports, on the full training split, the last iterate's max
violation over the groups (<= 0.005: feasible) and its over-satisfaction (-max violation, <= 0.02: the
tightest constraint is not pushed past its bound).  The tests run the same problem
(tests/test_dual_defaults.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one
import fused_lagrangian as fl  # noqa: E402

GROUP_SHARES = (0.30, 0.20, 0.14, 0.10, 0.08, 0.06, 0.05, 0.035, 0.02, 0.015)
TPR_TARGET = 0.8
FEASIBLE = 0.005  # max violation allowed on the training split
OVER_SATISFIED = 0.02  # how far below the bound the tightest constraint may end


@dataclasses.dataclass
class RareGroups:
    x: torch.Tensor  # (N, d) features, (N, d + K) with the group's one-hot
    y: torch.Tensor  # (N,) 0/1 labels
    group: torch.Tensor  # (N,) int64

    @property
    def num_groups(self) -> int:
        return len(GROUP_SHARES)


def rare_groups(seed: int = 0, num_rows: int = 60_000, num_features: int = 8, group_aware: bool = False) -> RareGroups:
    """Gaussian features shifted per group, labels from a logistic model with a per-group offset; the
    model sees the group only through the features (``group_aware`` adds its one-hot)."""
    g = torch.Generator().manual_seed(1000 + seed)
    k = len(GROUP_SHARES)
    group = torch.multinomial(torch.tensor(GROUP_SHARES), num_rows, replacement=True, generator=g)
    shift = torch.randn(k, num_features, generator=g) * 0.5
    features = torch.randn(num_rows, num_features, generator=g) + shift[group]
    w = torch.randn(num_features, generator=g)
    offset = torch.linspace(-1.5, 0.0, k)[torch.randperm(k, generator=g)]
    y = torch.bernoulli(torch.sigmoid(features @ w * 0.7 + offset[group]), generator=g)
    x = torch.cat([features, torch.nn.functional.one_hot(group, k).float()], dim=1) if group_aware else features
    return RareGroups(x, y, group)


def tpr_violations(model: torch.nn.Module, data: RareGroups) -> torch.Tensor:
    """Per group: TPR_target - TPR_k with hard predictions, on the whole split."""
    with torch.no_grad():
        predicted = (model(data.x).squeeze(1) > 0).float()
    positives = data.y == 1
    hits = torch.zeros(data.num_groups).index_add_(0, data.group[positives], predicted[positives])
    counts = torch.bincount(data.group[positives], minlength=data.num_groups).float()
    return TPR_TARGET - hits / counts


def train(data: RareGroups, dual_lr: float, steps: int = 3000, batch_size: int = 100, seed: int = 0,
          lr: float = 1e-2, backend: str = "auto", trace_every: int = 0, **dual_options):
    """LagrangianAdam with one grouped TPR block; ``dual_options`` go to add_constraint (none: the defaults).
    Returns (model, optimizer, block, trace of (step, max violation) every ``trace_every`` steps)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(data.x.shape[1], 1)
    optimizer = fl.LagrangianAdam(model.parameters(), lr=lr, backend=backend)
    block = optimizer.add_constraint("tpr", kind="grouped", num_constraints=data.num_groups, sense=">=",
                                     bound=TPR_TARGET, dual_lr=dual_lr, **dual_options)
    g = torch.Generator().manual_seed(seed)
    n = data.y.numel()
    order = torch.randperm(n, generator=g)
    trace = []
    position = 0
    for step in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=g), 0
        batch = order[position:position + batch_size]
        position += batch_size
        x, y, group = data.x[batch], data.y[batch], data.group[batch]
        logits = model(x).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        positives = y == 1
        if positives.any():
            scores = torch.sigmoid(logits[positives])
            loss = loss + block(scores, ids=group[positives], dual_values=(scores > 0.5).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if trace_every and (step + 1) % trace_every == 0:
            trace.append((step + 1, float(tpr_violations(model, data).max())))
    return model, optimizer, block, trace


RULES = {
    # name: add_constraint options (None: the library defaults)
    "default": None,
    "ascent": dict(estimator="batch", dual_rule="ascent"),
    "ascent+running": dict(estimator="running", dual_rule="ascent"),
    "optimistic": dict(estimator="batch", dual_rule="nupi", kp=1.0, ki=1.0, nu=0.0),
    "optimistic+running": dict(estimator="running", dual_rule="nupi", kp=1.0, ki=1.0, nu=0.0),
    "nupi_kp10": dict(estimator="batch", dual_rule="nupi", kp=10.0, ki=1.0, nu=0.0),
    "nupi_kp10+running": dict(estimator="running", dual_rule="nupi", kp=10.0, ki=1.0, nu=0.0),
}


def last_iterate(rule: Optional[dict], dual_lr: float, seed: int, data: RareGroups, **train_options) -> float:
    model, *_ = train(data, dual_lr, seed=seed, **(rule or {}), **train_options)
    return float(tpr_violations(model, data).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--dual-lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    datasets = {seed: rare_groups(seed) for seed in args.seeds}
    print(f"rare groups: {len(GROUP_SHARES)} TPR >= {TPR_TARGET} constraints, batch 100, {args.steps} steps, "
          f"LagrangianAdam lr 1e-2; last iterate on the full training split, seeds {args.seeds}")
    print("cell: worst max violation over seeds / worst over-satisfaction (= -max violation) over seeds; "
          f"ok = every seed has max violation in [-{OVER_SATISFIED}, {FEASIBLE}]")
    header = f"{'rule':<22}" + "".join(f"{'dual_lr ' + str(lr):>24}" for lr in args.dual_lrs)
    print(header)
    start = time.perf_counter()
    for name in args.rules:
        cells = []
        for dual_lr in args.dual_lrs:
            results = [last_iterate(RULES[name], dual_lr, seed, datasets[seed], steps=args.steps,
                                    backend=args.backend) for seed in args.seeds]
            ok = all(-OVER_SATISFIED <= r <= FEASIBLE for r in results)
            cells.append(f"{max(results):+.4f} / {-min(results):+.4f} {'ok' if ok else '--'}")
        print(f"{name:<22}" + "".join(f"{c:>24}" for c in cells), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
