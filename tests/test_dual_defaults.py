"""The default dual options on a public minibatch problem with rare groups (issue #12).

bench/dual_sensitivity.py's problem: logistic regression, 10 groups of 30% down to 1.5% of the rows, one
true-positive-rate constraint per group (TPR_k >= 0.8) with hard 0/1 predictions for the dual, minibatches
of 100 (~0.5-1 positives of the rarest groups).  With only ``dual_lr`` set, the last iterate must be
feasible on the full training split within 0.005 and not over-satisfied by more than 0.02, for dual_lr over a
10x range and three seeds.  The nine runs train together (see train_runs), ~20 s of CPU.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

from fused_lagrangian import backends

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "dual_sensitivity.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("dual_sensitivity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_dual_options_give_a_feasible_not_over_satisfied_last_iterate():
    bench = load_bench()
    backend = "native" if backends.unavailable_reason("native", "cpu") is None else "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        datasets = [bench.rare_groups(seed) for seed in (0, 1, 2)]
        violations = bench.train_runs(datasets, [0.01, 0.03, 0.1], dual_options=None, backend=backend)
    finally:
        torch.set_num_threads(threads)
    # rows: dual_lr 0.01, 0.03, 0.1; columns: seeds 0, 1, 2
    assert (violations <= bench.FEASIBLE).all(), f"infeasible last iterate:\n{violations}"
    assert (violations >= -bench.OVER_SATISFIED).all(), f"over-satisfied last iterate:\n{violations}"
