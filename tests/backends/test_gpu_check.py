"""bench/gpu_check.py runs on a rented GPU, unattended: what of it the CPU can run is run here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_succeeds():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_the_capture_check_sees_replays_that_keep_the_captured_learning_rates(one_thread):
    """Section 4 compares graph replays with eager steps whose lr and dual_lr tensors change in place between
    steps.  A replay that kept the captured values would compute the run whose schedule stops at the capture:
    it must differ from the eager run by more than the check's tolerance."""
    warmup, steps = 3, 4
    batches = gpu_check._batches(warmup + steps, device="cpu")
    scheduled = gpu_check.eager_run("reference", batches, warmup, device="cpu", sync_check=False)
    stale = gpu_check.eager_run("reference", batches, warmup, device="cpu", schedule_until=warmup, sync_check=False)
    again = gpu_check.eager_run("reference", batches, warmup, device="cpu", sync_check=False)
    assert all(torch.equal(a, b) for a, b in zip(scheduled, again))
    assert max(float((a - b).abs().max()) for a, b in zip(scheduled, stale)) > 1e-4
