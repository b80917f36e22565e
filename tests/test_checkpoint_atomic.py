"""checkpoint.save_atomic: the file at the path is the old checkpoint or the new one, never a torn one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fused_lagrangian import LagrangianAdam
from fused_lagrangian.checkpoint import save_atomic


def trained_state(steps: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend="reference")
    block = optimizer.add_constraint("weights", num_constraints=3, dual_lr=0.1)
    for _ in range(steps):
        (model.weight.sum() + block(model.weight[0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def assert_same_checkpoint(loaded, expected) -> None:
    """Equal structure, equal values, tensors bitwise."""
    assert type(loaded) is type(expected)
    if isinstance(expected, dict):
        assert list(loaded) == list(expected)
        for key in expected:
            assert_same_checkpoint(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same_checkpoint(a, b)
    elif isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and torch.equal(loaded, expected)
    else:
        assert loaded == expected


def test_round_trip_and_replace(tmp_path):
    path = tmp_path / "last.pt"
    first, second = trained_state(1), trained_state(3)
    save_atomic(first, path)
    assert_same_checkpoint(torch.load(path), first)
    save_atomic(second, str(path))
    assert_same_checkpoint(torch.load(path), second)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    old = trained_state(1)
    save_atomic(old, path)
    old_bytes = path.read_bytes()

    def torn_save(obj, file, **_):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        save_atomic(trained_state(3), path)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["last.pt"]


def test_keeps_the_replaced_files_permissions(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    os.chmod(path, 0o640)
    save_atomic({"x": torch.ones(2)}, path)
    assert os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_process_killed_mid_write_leaves_the_old_file_loadable(tmp_path):
    """A real kill -9 during the write: the old checkpoint still loads, bit for bit."""
    path = tmp_path / "last.pt"
    old = trained_state(1)
    save_atomic(old, path)
    started = tmp_path / "started"
    # The child writes a large checkpoint through a file object that stalls after its first chunk.
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import io, pathlib, time, torch
        from fused_lagrangian import checkpoint

        real_fdopen = checkpoint.os.fdopen

        class Stalling(io.FileIO):
            def write(self, data):
                written = super().write(data)
                pathlib.Path({str(started)!r}).touch()
                time.sleep(60)
                return written

        def fdopen(descriptor, mode):
            return Stalling(descriptor, "wb")

        checkpoint.os.fdopen = fdopen
        checkpoint.save_atomic({{"weights": torch.randn(1 << 20)}}, {str(path)!r})
    """)], env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])})
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert child.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        temporaries = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        assert temporaries, "the new checkpoint is written next to the old one, not over it"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert_same_checkpoint(torch.load(path), old)
