"""What ``report()`` costs on a block of K = 10^8 per-sample constraints, by how many the steps touched.

    python bench/report_cost.py                     # K = 1e8, batches of 4096, 10 / 100 / 700 steps
    python bench/report_cost.py --num-constraints 10000000 --steps 10 100

report() reads only the touched multipliers (fused_lagrangian/touched.py) until more than K / 32 are
touched, then all K.  Printed per row: the touched count, the median over 7 calls of report() after the
steps (the set already merged) and of a scan of all K (touched.multiplier_summary without the set), and
the first report() after the steps (it merges the queued ids).  One process, medians.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one
import fused_lagrangian as fl  # noqa: E402
from fused_lagrangian.touched import multiplier_summary  # noqa: E402


def _median_seconds(call, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-constraints", type=int, default=10**8)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 700])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(16))
    optimizer = fl.LagrangianAdam([param], lr=1e-3)
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=args.num_constraints, dual_lr=0.1)
    print(f"K = {args.num_constraints:.0e}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"{'steps':>6} {'touched':>9} {'first report s':>15} {'report s':>9} {'scan of K s':>12} {'scan / report':>14}")
    done = 0
    for steps in sorted(args.steps):
        for _ in range(steps - done):
            ids = torch.randint(0, args.num_constraints, (args.batch_size,))
            values = torch.randn(args.batch_size, requires_grad=True)
            (block(values, ids=ids) + param.sum()).backward()
            optimizer.step()
        done = steps
        first = _median_seconds(optimizer.report, repeats=1)
        report = _median_seconds(optimizer.report)
        scan = _median_seconds(lambda: multiplier_summary(block.multipliers, None, 0.0))
        touched = block.touched.ids(block.multipliers)
        count = "> K/32" if touched is None else f"{touched.numel():,}"
        print(f"{steps:>6} {count:>9} {first:>15.4f} {report:>9.4f} {scan:>12.4f} {scan / report:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
