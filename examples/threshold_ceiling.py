"""How accurate can a parity-constrained classifier be on the demo's test split?  A ceiling from the scores.

Under demographic parity (or equal opportunity) the most accurate constrained classifier thresholds the
scores group by group (Hardt et al. 2016).  This script trains the demo's unconstrained model and fits one
threshold per group twice, under the constraints of training: on the training rows (the demo's "group
thresholds" baseline, a real method) and on the test rows themselves, with their labels (not a method: no
classifier may see them).  The second fit is about the most accurate rule of that form on these scores that
holds the constraints on the test split: what is left between the two is what fitting on one sample of each
group costs on another.

    python examples/threshold_ceiling.py                                     # the default demo's groups
    python examples/threshold_ceiling.py --groups race,sex,age,education     # the 687-group mode

Any ``fused-lagrangian demo`` option that sets the problem or the unconstrained model applies.
"""

from __future__ import annotations

import sys

import torch

from fused_lagrangian import fairness
from fused_lagrangian_apps.demo import parse_args, thresholds_apply
from fused_lagrangian_apps.demo_problem import load_problem
from fused_lagrangian_apps.demo_training import RunSpec, fit_thresholds, split_logits, train_run


def metrics_on_test(args, problem, logits, fit) -> tuple[float, float, float]:
    """Test accuracy, max violation over the constrained groups (their bounds) and over those with
    >= large_group_rows test rows (epsilon), as the demo reports them."""
    shifted = fit.shift(logits, problem.g_test)
    large_groups = problem.constrained & (problem.sizes_test >= args.large_group_rows)
    every = fairness.fairness_metrics(shifted, problem.y_test, problem.g_test, problem.num_groups,
                                      args.constraint, problem.epsilon, problem.constrained)
    large = fairness.fairness_metrics(shifted, problem.y_test, problem.g_test, problem.num_groups,
                                      args.constraint, args.epsilon, large_groups)
    return every["accuracy"], every["max_violation"], large["max_violation"]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not thresholds_apply(args):
        raise SystemExit("group thresholds hold dp or eo over groups with one group per row")
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = load_problem(args)
    model = train_run(args, problem, RunSpec("unconstrained", None), progress=False).model
    train_logits, test_logits = split_logits(problem, model)
    fit_train = fit_thresholds(args, problem, train_logits, problem.y_train, problem.g_train)
    # On test: the constraints of training (every constrained group to its own bound) on the test rows.
    fit_test = fit_thresholds(args, problem, test_logits, problem.y_test, problem.g_test)
    print(f"{problem.name}: {problem.num_groups} groups, {int(problem.constrained.sum())} constrained, "
          f"epsilon {args.epsilon}")
    for name, fit in (("fitted on train (the demo's baseline)", fit_train),
                      ("fitted on test, with its labels (a ceiling)", fit_test)):
        accuracy, violation, large = metrics_on_test(args, problem, test_logits, fit)
        print(f"  group thresholds {name}: test accuracy {accuracy:.4f}, test max violation {violation:.4f} "
              f"(groups with >= {args.large_group_rows} test rows: {large:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
