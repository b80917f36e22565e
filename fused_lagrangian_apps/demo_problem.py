"""The demo's problem: data split, groups, which groups are constrained and their bounds."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from fused_lagrangian import fairness


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
    # The two-dataset scheme (``--held-out``): training rows the loss fits, and held-out training rows
    # whose hard rates move the multipliers.  None: every training row does both.
    primal_rows: Optional[Tensor] = None
    constraint_rows: Optional[Tensor] = None

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
    if args.held_out > 0:
        problem.primal_rows, problem.constraint_rows = fairness.split_for_constraints(
            problem.g_train, args.held_out, min_group_rows=args.held_out_min_rows, seed=args.seed)
    return problem
