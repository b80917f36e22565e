"""Dual rules on a minibatch problem with rare groups: is the last iterate feasible, and not over-satisfied?

    python bench/dual_sensitivity.py                        # every rule, dual_lr 0.01 / 0.03 / 0.1, seeds 0-5
    python bench/dual_sensitivity.py --rules default ascent --seeds 0 1 2

The problem (public, synthetic, generated here): logistic regression on Gaussian features shifted per
group, 10 groups whose sizes range from 30% to 1.5% of 60,000 rows, labels with a per-group offset, and
one true-positive-rate constraint per group, TPR_k >= 0.8.  The dual reads hard 0/1 predictions
(``dual_values``), the primal the sigmoid scores.  Minibatches of 100 hold ~0.5-1 positives of the
rarest groups.  Each run trains LagrangianAdam (lr 4e-4, 12,000 steps) with one grouped block; the
script reports, on the full training split, the last iterate's max violation over the groups:
feasible when <= 0.005, over-satisfied when < -0.02 (the tightest constraint pushed past its bound).

Runs are independent but share each step's Python work: the models of all (dual_lr, seed) pairs of a
rule are rows of one weight matrix (Adam is elementwise, the losses add), and each dual_lr has one
grouped block whose constraint ids are (seed, group) pairs, so each run's multipliers see only its own
samples.  The tests run the same problem (tests/test_dual_defaults.py).
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
PRIMAL_LR = 4e-4
STEPS = 12_000
BATCH_SIZE = 100


@dataclasses.dataclass
class RareGroups:
    x: torch.Tensor  # (N, d) features
    y: torch.Tensor  # (N,) 0/1 labels
    group: torch.Tensor  # (N,) int64

    @property
    def num_groups(self) -> int:
        return len(GROUP_SHARES)


def rare_groups(seed: int = 0, num_rows: int = 60_000, num_features: int = 8) -> RareGroups:
    """Gaussian features shifted per group, labels from a logistic model with a per-group offset.  The model
    sees the group only through the features, so the constraints compete for the shared weights."""
    g = torch.Generator().manual_seed(1000 + seed)
    k = len(GROUP_SHARES)
    group = torch.multinomial(torch.tensor(GROUP_SHARES), num_rows, replacement=True, generator=g)
    shift = torch.randn(k, num_features, generator=g) * 0.5
    features = torch.randn(num_rows, num_features, generator=g) + shift[group]
    w = torch.randn(num_features, generator=g)
    offset = torch.linspace(-1.5, 0.0, k)[torch.randperm(k, generator=g)]
    y = torch.bernoulli(torch.sigmoid(features @ w * 0.7 + offset[group]), generator=g)
    return RareGroups(features, y, group)


def tpr_violations(weight: torch.Tensor, bias: torch.Tensor, data: RareGroups) -> torch.Tensor:
    """(runs, groups): TPR_target - TPR_k with hard predictions on the whole split, for each row of weights."""
    with torch.no_grad():
        positives = data.y == 1
        predicted = (data.x[positives] @ weight.T + bias > 0).float()  # (P, runs)
        hits = torch.zeros(data.num_groups, weight.shape[0]).index_add_(0, data.group[positives], predicted)
        counts = torch.bincount(data.group[positives], minlength=data.num_groups).float()
    return (TPR_TARGET - hits / counts[:, None]).T


def train_runs(datasets: list[RareGroups], dual_lrs: list[float], dual_options: Optional[dict] = None,
               steps: int = STEPS, lr: float = PRIMAL_LR, backend: str = "auto") -> torch.Tensor:
    """Trains one run per (dual_lr, dataset) with ``dual_options`` (None: the library defaults); returns the
    (len(dual_lrs), len(datasets)) max violations of the last iterates on their full training splits."""
    num_seeds, num_features = len(datasets), datasets[0].x.shape[1]
    k = datasets[0].num_groups
    runs = len(dual_lrs) * num_seeds  # run r = (dual_lr r // num_seeds, dataset r % num_seeds)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(0.1 * torch.randn(num_features).repeat(runs, 1))
    bias = torch.nn.Parameter(torch.zeros(runs))
    optimizer = fl.LagrangianAdam([weight, bias], lr=lr, backend=backend)
    blocks = [optimizer.add_constraint(f"tpr_{dual_lr}", kind="grouped", num_constraints=num_seeds * k, sense=">=",
                                       bound=TPR_TARGET, dual_lr=dual_lr, **(dual_options or {}))
              for dual_lr in dual_lrs]
    generators = [torch.Generator().manual_seed(seed) for seed in range(num_seeds)]
    orders = [torch.randperm(d.y.numel(), generator=g) for d, g in zip(datasets, generators)]
    position = 0
    for _ in range(steps):
        if position + BATCH_SIZE > datasets[0].y.numel():
            orders = [torch.randperm(d.y.numel(), generator=g) for d, g in zip(datasets, generators)]
            position = 0
        batches = [order[position:position + BATCH_SIZE] for order in orders]
        position += BATCH_SIZE
        x = torch.stack([d.x[b] for d, b in zip(datasets, batches)])  # (seeds, B, d)
        y = torch.stack([d.y[b] for d, b in zip(datasets, batches)])
        group = torch.stack([d.group[b] for d, b in zip(datasets, batches)])
        # logits[l, s, i] of run (l, s) on sample i of dataset s's batch
        w = weight.view(len(dual_lrs), num_seeds, num_features)
        logits = torch.einsum("lsd,sbd->lsb", w, x) + bias.view(len(dual_lrs), num_seeds, 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.expand_as(logits), reduction="none").mean(dim=2).sum()
        positives = y == 1
        ids = (torch.arange(num_seeds)[:, None] * k + group)[positives]
        for l, block in enumerate(blocks):
            scores = torch.sigmoid(logits[l][positives])
            loss = loss + block(scores, ids=ids, dual_values=(scores > 0.5).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    violations = torch.stack([tpr_violations(weight[r:r + 1], bias[r:r + 1], datasets[r % num_seeds])[0].max()
                              for r in range(runs)])
    return violations.view(len(dual_lrs), num_seeds)


RULES = {
    # name: add_constraint options; None: the library defaults (grouped: running estimate, nuPI kp 20)
    "default": None,
    "ascent": dict(estimator="batch", dual_rule="ascent", kp=0.0),
    "optimistic": dict(estimator="batch", dual_rule="nupi", kp=1.0),
    "nupi_kp20_nu0.9": dict(estimator="batch", dual_rule="nupi", kp=20.0, nu=0.9),
    "running0.9": dict(estimator="running", estimate_decay=0.9, dual_rule="ascent", kp=0.0),
    "running0.99": dict(estimator="running", estimate_decay=0.99, dual_rule="ascent", kp=0.0),
    "running0.9+optimistic": dict(estimator="running", estimate_decay=0.9, dual_rule="nupi", kp=1.0),
    "running0.9+kp10": dict(estimator="running", estimate_decay=0.9, dual_rule="nupi", kp=10.0),
    "running0.9+kp40": dict(estimator="running", estimate_decay=0.9, dual_rule="nupi", kp=40.0),
    "running0.99+kp200": dict(estimator="running", estimate_decay=0.99, dual_rule="nupi", kp=200.0),
}


def passes(violation: float) -> bool:
    return -OVER_SATISFIED <= violation <= FEASIBLE


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--dual-lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    datasets = [rare_groups(seed) for seed in args.seeds]
    print(f"rare groups: {len(GROUP_SHARES)} TPR >= {TPR_TARGET} constraints, batch {BATCH_SIZE}, {args.steps} steps "
          f"of LagrangianAdam lr {PRIMAL_LR}; last iterate's max violation on the full training split")
    print(f"cell: worst / best over seeds {args.seeds}, then how many seeds end in [-{OVER_SATISFIED}, {FEASIBLE}]")
    print(f"{'rule':<24}" + "".join(f"{'dual_lr ' + str(lr):>26}" for lr in args.dual_lrs) + f"{'all':>8}")
    start = time.perf_counter()
    for name in args.rules:
        violations = train_runs(datasets, args.dual_lrs, RULES[name], steps=args.steps, backend=args.backend)
        cells = []
        for row in violations.tolist():
            cells.append(f"{max(row):+.4f} / {min(row):+.4f} {sum(map(passes, row))}/{len(row)}")
        total = sum(passes(v) for v in violations.flatten().tolist())
        print(f"{name:<24}" + "".join(f"{c:>26}" for c in cells) + f"{total:>5}/{violations.numel()}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
