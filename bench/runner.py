"""Runs one benchmark case: builds every candidate, times them interleaved, checks they agree.

A case's record holds, per candidate, the median seconds per step with min and max over the
repetitions, the ratio to torch's fused optimizer (candidate 4), the fraction of the bandwidth
ceiling (ceiling time / candidate time) and the effective bandwidth.  Candidates that could not be
built are listed with the reason, never silently dropped.
"""

from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch

from .contention import QUIET_FRACTION, CpuMeter, QuietPolicy
from .timing import time_interleaved

FLOOR = "torch_fused"
CEILING = "ceiling"
# The plainest implementation of the dual update: the oracle the others' multipliers are compared to.
DUAL_ORACLE = "unfused"
# Steps every candidate takes before the agreement check (and before timing, as warm-up).
AGREEMENT_STEPS = 3
MAX_STEPS_PER_SAMPLE = 1000


def run_case(sweep: str, config: dict, factories: dict[str, Callable], *, repetitions: int, sample_seconds: float,
             threads: int, bytes_per_step: Optional[int], device: torch.device,
             quiet: Optional[QuietPolicy] = None) -> dict:
    """Times ``factories``' candidates; retries (per ``quiet``) while other processes load the machine."""
    quiet = quiet or QuietPolicy()
    torch.set_num_threads(threads)
    candidates, skipped = {}, {}
    for name, factory in factories.items():
        try:
            candidates[name] = factory()
        except Exception as error:  # a missing extra or an unbuilt backend: report it, keep going
            skipped[name] = f"{type(error).__name__}: {error}"
    start = time.perf_counter()
    inner = _steps_per_sample(candidates, sample_seconds, device)
    agreement = _agreement(candidates)
    steps = {name: c.step for name, c in candidates.items()}
    attempts = []
    for _ in range(max(1, quiet.attempts)):
        quiet.wait()
        meter = CpuMeter().start()
        timings = time_interleaved(steps, repetitions=repetitions, inner=inner, warmup=1, device=device)
        others = meter.others_fraction()
        attempts.append((others or 0.0, others, timings))
        if others is None or others < QUIET_FRACTION:
            break
    # Every attempt advanced every candidate by the same steps, so any attempt's candidates still agree.
    _, others, timings = min(attempts, key=lambda attempt: attempt[0])
    wall = time.perf_counter() - start
    results = {}
    for name, timing in timings.items():
        results[name] = {
            "median_s": timing.median,
            "min_s": timing.min,
            "max_s": timing.max,
            "samples_s": timing.samples,
            "steps_per_sample": inner[name],
        }
    _add_ratios(results, bytes_per_step)
    record = {
        "sweep": sweep,
        "config": config,
        "threads": threads,
        "repetitions": repetitions,
        "bytes_per_step": bytes_per_step,
        "results": results,
        "skipped": skipped,
        "agreement": agreement,
        "wall_s": wall,
        "others_cpu_fraction": others,
        "attempts": len(attempts),
    }
    del candidates
    gc.collect()
    return record


def _steps_per_sample(candidates: dict, sample_seconds: float, device: torch.device) -> dict[str, int]:
    """Per candidate, how many consecutive steps make one sample last about ``sample_seconds``.

    Every candidate takes its first AGREEMENT_STEPS steps here (they double as warm-up); the last one,
    past the one-time allocations of optimizer state, sizes its samples.  Sizing each candidate on its
    own step (not on the slowest one's) keeps a fast step's samples long: timed one step at a time, it
    would run with the cache the previous candidate left, and the same step would cost twice as much
    next to a candidate that streams hundreds of MB as next to one that does not.
    """
    inner = {}
    for name, candidate in candidates.items():
        for _ in range(AGREEMENT_STEPS - 1):
            candidate.step()
        start = time.perf_counter()
        candidate.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = max(time.perf_counter() - start, 1e-6)
        inner[name] = int(max(1, min(MAX_STEPS_PER_SAMPLE, round(sample_seconds / elapsed))))
    return inner


def _add_ratios(results: dict, bytes_per_step: Optional[int]) -> None:
    floor = results.get(FLOOR, {}).get("median_s")
    ceiling = results.get(CEILING, {}).get("median_s")
    for entry in results.values():
        median = entry["median_s"]
        entry["ratio_to_torch_fused"] = median / floor if floor else None
        entry["fraction_of_ceiling"] = ceiling / median if ceiling else None
        entry["effective_GBps"] = bytes_per_step / median / 1e9 if bytes_per_step else None


@torch.no_grad()
def _agreement(candidates: dict) -> dict:
    """Max abs difference of each candidate's parameters to the floor's and multipliers to the oracle's.

    Taken after the first AGREEMENT_STEPS steps, the same for every candidate on the same inputs: a
    large difference means a benchmark that does not compute what it claims, whatever its speed.  (Not
    after the timed steps: over hundreds of Adam steps, rounding differences grow on coordinates whose
    gradient is near zero, and would hide a real disagreement among them.)
    """
    agreement = {}
    floor = candidates.get(FLOOR)
    for name, candidate in candidates.items():
        if name == CEILING:
            continue
        # A variant "<candidate> @<problem>" is checked against the oracle of the same problem.
        _, at, variant = name.partition(" @")
        oracle_name = DUAL_ORACLE + at + variant
        oracle = candidates.get(oracle_name)
        entry = {}
        if floor is not None and not candidate.multipliers() and name != FLOOR:
            entry["params_vs_torch_fused"] = _max_abs_diff(candidate.params, floor.params)
        if oracle is not None and candidate.multipliers() and name != oracle_name:
            entry["multipliers_vs_unfused"] = _max_abs_diff(candidate.multipliers(), oracle.multipliers())
            entry["params_vs_unfused"] = _max_abs_diff(candidate.params, oracle.params)
        if entry:
            agreement[name] = entry
    return agreement


def _max_abs_diff(a: list, b: list) -> float:
    return max((float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b) if x.numel()),
               default=0.0)
