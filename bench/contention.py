"""How much CPU other processes took while we measured.

On a shared machine another process stalls a multi-threaded step far beyond its fair share (a thread
that is descheduled holds every other thread at the next barrier), so a timing taken while others run
is not a timing of the step.  The meter compares the machine's busy time (/proc/stat) with this
process's own CPU time; the difference is what the others used.  Where /proc/stat does not exist it
measures nothing and never waits.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

# Others using more than this fraction of all CPUs make a measurement "contended".
QUIET_FRACTION = 0.05


def _machine_busy_seconds() -> Optional[float]:
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # everything but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Fraction of all CPUs that other processes used between ``start()`` and ``others_fraction()``."""

    def start(self) -> "CpuMeter":
        self._machine = _machine_busy_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()
        return self

    def others_fraction(self) -> Optional[float]:
        machine = _machine_busy_seconds()
        if machine is None or self._machine is None:
            return None
        others = (machine - self._machine) - (time.process_time() - self._own)
        capacity = (time.perf_counter() - self._wall) * (os.cpu_count() or 1)
        return max(0.0, others / capacity) if capacity > 0 else None


def wait_for_quiet(max_wait_s: float, window_s: float = 0.5) -> Optional[float]:
    """Sleeps in windows until others use < QUIET_FRACTION of the CPUs or ``max_wait_s`` passes.

    Returns the others' fraction in the last window (None where it cannot be measured).
    """
    deadline = time.perf_counter() + max_wait_s
    while True:
        meter = CpuMeter().start()
        time.sleep(window_s)
        fraction = meter.others_fraction()
        if fraction is None or fraction < QUIET_FRACTION or time.perf_counter() >= deadline:
            return fraction


@dataclasses.dataclass
class QuietPolicy:
    """How hard a run tries to measure on a quiet machine: waits before timing, retries when contended."""

    attempts: int = 1  # timings of one case; the least contended is kept
    max_wait_s: float = 0.0  # longest wait for quiet before one timing
    budget_s: float = 0.0  # all the waiting of a run together

    def wait(self) -> None:
        allowed = min(self.max_wait_s, self.budget_s)
        if allowed <= 0:
            return
        start = time.perf_counter()
        wait_for_quiet(allowed)
        self.budget_s -= time.perf_counter() - start
