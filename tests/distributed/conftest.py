"""Starts the distributed checks once per session: 2 real processes, gloo on CPU, all scenarios in one job
(process start and torch import dominate the cost)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_worker import SCENARIOS, result_path

WORKER = Path(__file__).with_name("dist_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
TIMEOUT_S = 300


class DistributedRun:
    def __init__(self, out_dir: Path, returncodes: list[int]) -> None:
        self.out_dir = out_dir
        self.returncodes = returncodes

    def results(self, scenario: str) -> list[dict]:
        """What each rank saved for ``scenario``; fails the test with the workers' output otherwise."""
        results = []
        for rank in range(WORLD_SIZE):
            path = result_path(str(self.out_dir), scenario, rank)
            result = torch.load(path, weights_only=False) if os.path.exists(path) else None
            if result is None or "error" in result:
                pytest.fail(f"scenario {scenario!r} on rank {rank} did not finish "
                            f"(exit codes {self.returncodes}):\n{(result or {}).get('error', '')}\n{self.log_tail()}")
            results.append(result)
        return results

    def log_tail(self) -> str:
        return "\n".join(f"--- rank {rank} ---\n" + (self.out_dir / f"rank{rank}.log").read_text()[-3000:]
                         for rank in range(WORLD_SIZE))


@pytest.fixture(scope="session")
def distributed_run(tmp_path_factory) -> DistributedRun:
    out_dir = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    processes = []
    for rank in range(WORLD_SIZE):
        with open(out_dir / f"rank{rank}.log", "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(rank), str(WORLD_SIZE), str(out_dir), *SCENARIOS],
                env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return DistributedRun(out_dir, [p.returncode for p in processes])


@pytest.fixture(scope="session")
def single_process_run() -> dict:
    """The oracle: the same training in this process (no torch.distributed), global batches at once."""
    from dist_worker import reference_run

    return reference_run()
