"""The demo's problem: data split, groups, which groups are constrained and their bounds."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Union

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
    # Each constrained group's bound: --epsilon, or per group with --slack (a float or a (K,) tensor).
    epsilon: Union[float, Tensor] = 0.0

    @property
    def sizes_train(self) -> Tensor:
        return fairness.group_sizes(self.g_train, self.num_groups)

    @property
    def sizes_test(self) -> Tensor:
        return fairness.group_sizes(self.g_test, self.num_groups)


def load_problem(args: argparse.Namespace) -> Problem:
    if args.dataset == "adult":
        from .datasets import load_adult

        data = load_adult(group_by=args.groups)
        problem = Problem(f"UCI Adult, groups {' x '.join(args.groups)}", data.x_train, data.y_train,
                          data.g_train, data.x_test, data.y_test, data.g_test, data.group_names, data.num_groups,
                          constrained=torch.zeros(0, dtype=torch.bool))
        if args.marginals:
            _add_marginal_groups(problem, args.marginals)
    else:
        from .datasets import make_synthetic

        train, test = make_synthetic(args.rows, seed=args.seed).train_test_split(0.2)
        problem = Problem(f"synthetic, {args.rows:,} rows", train.x, train.y, train.g, test.x, test.y, test.g,
                          train.group_names, train.num_groups, constrained=torch.zeros(0, dtype=torch.bool))
    in_constraint = problem.g_train[problem.y_train > 0.5] if args.constraint == "eo" else problem.g_train
    rows_in_constraint = fairness.group_sizes(in_constraint, problem.num_groups)
    problem.constrained = rows_in_constraint >= args.min_group_size
    problem.epsilon = args.epsilon
    if args.slack and args.constraint in fairness.PARITY_CONSTRAINTS:  # a sampling half-width of a rate
        # The rate whose noise sets the half-width: the base rate for positive rates; for true positive rates,
        # unknown before training, 0.5 (the widest).
        rate = float(problem.y_train.mean()) if args.constraint == "dp" else 0.5
        problem.epsilon = fairness.size_slack(args.epsilon, rows_in_constraint, rate, args.slack)
    if args.held_out > 0:
        problem.primal_rows, problem.constraint_rows = fairness.split_for_constraints(
            problem.g_train, args.held_out, min_group_rows=args.held_out_min_rows, seed=args.seed)
    return problem


def _add_marginal_groups(problem: Problem, keys: tuple[str, ...]) -> None:
    """Overlapping groups: every row is also in one group per attribute of ``keys`` (e.g. its sex and its
    race, the marginal groups), besides its intersectional group.  Group ids become (N, 1 + len(keys))
    memberships; marginal groups are numbered after the intersectional ones."""
    from .datasets import load_adult

    train_ids, test_ids = [problem.g_train], [problem.g_test]
    for key in keys:
        marginal = load_adult(group_by=(key,))
        train_ids.append(marginal.g_train + problem.num_groups)
        test_ids.append(marginal.g_test + problem.num_groups)
        problem.group_names += [f"{key}={name}" for name in marginal.group_names]
        problem.num_groups += marginal.num_groups
    problem.g_train, problem.g_test = fairness.memberships(*train_ids), fairness.memberships(*test_ids)
    problem.name += f" and the marginal groups of {', '.join(keys)} (overlapping)"
