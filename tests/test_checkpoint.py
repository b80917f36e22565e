"""Checkpoints: stop at step 50, save, load in a fresh process, continue to 100: bitwise equal to a run
that never stopped.  The problem has several blocks (dense, indexed, grouped, one of them dual-first),
stateful dual rules (nuPI) and Adam, which is where checkpointing goes wrong (Cooper keeps the
multipliers and the dual optimizer's state in different objects).

This file is also the fresh process: ``python test_checkpoint.py resume CHECKPOINT OUT BACKEND``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fused_lagrangian import LagrangianAdam

STOP, END = 50, 100
REPO_ROOT = Path(__file__).resolve().parents[1]


def build(backend: str):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = LagrangianAdam(model.parameters(), lr=1e-2, amsgrad=True, backend=backend)
    optimizer.add_constraint("rate", num_constraints=2, sense="<=", bound=torch.tensor([0.4, 0.6]), dual_lr=0.2,
                             dual_rule="nupi", kp=2.0, ki=1.0, nu=0.5)
    optimizer.add_constraint("rows", kind="indexed", num_constraints=64, bound=0.3, dual_lr=0.1,
                             dual_rule="nupi", kp=1.0, ki=0.5, nu=0.2, max_multiplier=5.0)
    optimizer.add_constraint("groups", kind="grouped", num_constraints=5, sense="==", dual_lr=0.3, to_overall=True)
    optimizer.add_constraint("scale", num_constraints=1, sense=">=", bound=0.1, dual_lr=0.5, ordering="dual_first")
    return model, optimizer


def train(model, optimizer, steps: range) -> None:
    blocks = optimizer.constraints
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(32, 4, generator=generator)
        y = (torch.rand(32, generator=generator) < 0.5).float()
        rows = torch.randint(0, 64, (32,), generator=generator)
        groups = torch.randint(0, 5, (32,), generator=generator)
        logits = model(x).flatten()
        per_sample = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        probabilities = torch.sigmoid(logits)
        loss = (per_sample.mean()
                + blocks["rate"](torch.stack([probabilities.mean(), (probabilities * y).mean()]))
                + blocks["rows"](per_sample, ids=rows)
                + blocks["groups"](probabilities, ids=groups, dual_values=(logits > 0).float())
                + blocks["scale"](logits.std().reshape(1)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model, optimizer) -> dict:
    """Every tensor a resumed run must reproduce: parameters, primal state, multipliers, dual state."""
    tensors = {f"param.{name}": p.detach().clone() for name, p in model.named_parameters()}
    for index, p in enumerate(model.parameters()):
        for key, value in optimizer.state[p].items():
            tensors[f"state.{index}.{key}"] = value.clone()
    for name, block in optimizer.constraints.items():
        tensors[f"{name}.multipliers"] = block.multipliers.clone()
        tensors[f"{name}.dual_state"] = block.dual_state.clone()
    return tensors


def save_checkpoint(model, optimizer, path) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)


def resume(checkpoint_path, backend: str, map_location=None):
    model, optimizer = build(backend)
    checkpoint = torch.load(checkpoint_path, map_location=map_location)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, range(STOP, END))
    return snapshot(model, optimizer)


def assert_bitwise_equal(resumed: dict, uninterrupted: dict) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert resumed[key].dtype == value.dtype and resumed[key].device == value.device, key
        assert torch.equal(resumed[key], value), key


@pytest.fixture(scope="module")
def uninterrupted_and_checkpoint(backend, tmp_path_factory):
    model, optimizer = build(backend)
    train(model, optimizer, range(STOP))
    path = tmp_path_factory.mktemp(backend) / "step50.pt"
    save_checkpoint(model, optimizer, path)
    train(model, optimizer, range(STOP, END))
    assert all((block.multipliers != 0).any() for block in optimizer.constraints.values())
    return snapshot(model, optimizer), path


def test_resume_in_a_fresh_process_is_bitwise_equal(backend, uninterrupted_and_checkpoint, tmp_path):
    uninterrupted, checkpoint = uninterrupted_and_checkpoint
    out = tmp_path / "resumed.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, __file__, "resume", str(checkpoint), str(out), backend], check=True, env=env,
                   timeout=300)
    assert_bitwise_equal(torch.load(out), uninterrupted)


def test_resume_with_map_location_cpu(backend, uninterrupted_and_checkpoint):
    uninterrupted, checkpoint = uninterrupted_and_checkpoint
    assert_bitwise_equal(resume(checkpoint, backend, map_location="cpu"), uninterrupted)


def test_resume_is_not_trivially_equal(backend, uninterrupted_and_checkpoint):
    """The comparison can fail: resuming without the optimizer's state diverges from the uninterrupted run."""
    uninterrupted, checkpoint = uninterrupted_and_checkpoint
    model, optimizer = build(backend)
    model.load_state_dict(torch.load(checkpoint)["model"])
    train(model, optimizer, range(STOP, END))
    resumed = snapshot(model, optimizer)
    assert not all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


if __name__ == "__main__":
    _, command, checkpoint_path, out_path, backend_name = sys.argv
    assert command == "resume"
    torch.save(resume(checkpoint_path, backend_name), out_path)
