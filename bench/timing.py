"""Interleaved timing: every candidate runs once per repetition, in a rotating order.

Timing candidates one after another lets a change in the machine's state (another process, frequency,
page cache) land on one candidate only; interleaving spreads it over all of them, and the median over
repetitions discards the outliers.  Each sample is the mean over a candidate's ``inner`` consecutive
steps, sized so that every sample lasts about as long: a fast step is timed well above the timer's
resolution, and mostly with its own data in cache rather than whatever the previous candidate left.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Timing:
    """Seconds per step over the repetitions of one candidate."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], *, repetitions: int, inner: dict[str, int],
                     warmup: int = 2, device: Optional[torch.device] = None) -> dict[str, Timing]:
    """Per-step seconds of each step function; candidate ``name`` runs ``warmup + repetitions * inner[name]`` steps."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    _synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        # Rotating the start spreads "first after the previous candidate" effects evenly.
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(inner[name]):
                step()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: Timing(samples[name]) for name in names}

