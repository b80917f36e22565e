"""Benchmarks: fused_lagrangian against what users would pick instead, on identical tensors.

    fused-lagrangian bench [--quick] [--out DIR]        (or, from a source checkout: python -m bench)

writes ``results.json``, ``results.md`` and PNG plots to DIR.  Candidates: every available fused
backend, cooper-optim 1.0.1, hand-written PyTorch, torch's fused optimizer alone (the floor) and an
in-place read-modify-write pass over the same bytes (the ceiling).  ``sweeps.py`` says what is swept,
``targets.py`` which targets are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable, Iterable, Optional

import torch

from fused_lagrangian import backends
from . import machine, plots, report, targets
from .contention import QUIET_FRACTION, QuietPolicy
from .block_call_candidates import block_call_candidates
from .problems import (BlockCallProblem, FlatProblem, SmallModelData, SmallModelProblem, StepData, TrainingData,
                       TrainingProblem)
from .runner import run_case
from .small_model_candidates import small_model_candidates
from .step_candidates import flat_candidates, step_candidates
from .sweeps import SWEEPS, Case, cases
from .training_candidates import training_candidates

QUICK = dict(repetitions=7, sample_seconds=0.03)
FULL = dict(repetitions=15, sample_seconds=0.08)


def quiet_policy(quick: bool) -> QuietPolicy:
    """The quick run keeps its 2-minute budget; the full run waits out other processes (20 min at most)."""
    return QuietPolicy() if quick else QuietPolicy(attempts=3, max_wait_s=120, budget_s=1200)


def fused_backends(device: torch.device) -> list[str]:
    """Backends that run natively on ``device`` (Triton's CPU interpreter is a test tool, not a backend to time)."""
    return [name for name in backends.names()
            if backends.unavailable_reason(name, device.type) is None
            and not (name == "triton" and device.type != "cuda")]


def run_cases(selected: Iterable[Case], out_dir: str, *, repetitions: int, sample_seconds: float, mode: str,
              command: str, device: str = "cpu", quiet: Optional[QuietPolicy] = None,
              log: Callable[[str], None] = print) -> dict:
    """Runs ``selected`` cases, writes results.json, results.md and the plots to ``out_dir``; returns the results."""
    quiet = quiet or QuietPolicy()
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(device)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    results = {
        "schema": report.SCHEMA,
        "mode": mode,
        "command": command,
        "machine": machine.describe(device),
        "settings": {"repetitions": repetitions, "sample_seconds": sample_seconds,
                     "quiet_policy": dataclasses.asdict(quiet), "quiet_fraction": QUIET_FRACTION},
        "load_average_start": machine.load_average(),
        "cases": [],
    }
    names = fused_backends(device)
    selected = list(selected)
    try:
        for number, case in enumerate(selected, 1):
            if isinstance(case.problem, TrainingProblem):
                factories = training_candidates(TrainingData(case.problem, device), names)
                bytes_per_step = None
            elif isinstance(case.problem, BlockCallProblem):
                factories = block_call_candidates(case.problem, device, names)
                bytes_per_step = None
            elif isinstance(case.problem, SmallModelProblem):
                factories = small_model_candidates(SmallModelData(case.problem, device), names)
                bytes_per_step = None
            elif isinstance(case.problem, FlatProblem):
                factories = flat_candidates(case.problem, device, names)
                bytes_per_step = case.problem.step_problem(1).primal_bytes + 16 * case.problem.batch
            else:
                factories = step_candidates(StepData(case.problem, device), names)
                bytes_per_step = case.problem.primal_bytes + case.problem.dual_bytes
            record = run_case(case.sweep, case.config, factories, repetitions=repetitions,
                              sample_seconds=sample_seconds, threads=case.threads, bytes_per_step=bytes_per_step,
                              device=device, quiet=quiet)
            results["cases"].append(record)
            log(f"[{number}/{len(selected)}] {case.sweep}: {report.case_label(record)} ({record['wall_s']:.1f} s"
                f"{report.contention_note(record)})")
            width = max(18, *(len(name) for name in record["results"]))
            for name in report.ordered(record["results"]):
                entry = record["results"][name]
                ratio = entry["ratio_to_torch_fused"]  # None where a case has no floor (the block call)
                log(f"    {name:<{width}} {entry['median_s'] * 1e3:10.3f} ms" + (f"  x{ratio:.2f}" if ratio else ""))
    finally:
        torch.set_num_threads(threads)
    results["load_average_end"] = machine.load_average()
    results["targets"] = targets.evaluate(results["cases"])
    results["wall_s"] = time.perf_counter() - start
    results["plots"] = plots.draw(results, out_dir)
    report.write_json(results, os.path.join(out_dir, "results.json"))
    report.write_markdown(results, os.path.join(out_dir, "results.md"))
    for target in results["targets"]:
        log(targets.format_line(target))
    return results


def run_bench(quick: bool = False, out_dir: str = "bench-results", *, device: str = "cpu",
              sweeps: Optional[list[str]] = None, command: Optional[str] = None,
              log: Callable[[str], None] = print) -> dict:
    """The quick (< 2 min on 2 cores) or full run of every sweep, or of the named ``sweeps`` only."""
    selected = [case for case in cases(quick) if sweeps is None or case.sweep in sweeps]
    settings = QUICK if quick else FULL
    if command is None:
        command = "fused-lagrangian bench" + (" --quick" if quick else "") + f" --out {out_dir}"
    return run_cases(selected, out_dir, mode="quick" if quick else "full", command=command, device=device,
                     quiet=quiet_policy(quick), log=log, **settings)


def main(argv: Optional[list[str]] = None) -> int:
    """``fused-lagrangian bench [--quick] [--out DIR] [--device D] [--sweeps ...]``; returns the exit status.

    A missed target is a result, printed and written to the report, not a failure of the command.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fused-lagrangian bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes on 2 CPU cores")
    parser.add_argument("--out", default="bench-results", help="folder for results.json, results.md and plots")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, help="run only these sweeps")
    args = parser.parse_args(argv)
    command = " ".join(["fused-lagrangian bench", *argv])
    run_bench(args.quick, args.out, device=args.device, sweeps=args.sweeps, command=command)
    return 0
