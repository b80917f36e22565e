"""Comparisons of the snapshots ``dist_worker.snapshot`` takes (parameters, multipliers, dual state)."""

from __future__ import annotations

import torch


def state_tensors(snapshot: dict) -> dict[str, torch.Tensor]:
    tensors = {f"param{i}": p for i, p in enumerate(snapshot["params"])}
    for key in ("multipliers", "dual_state"):
        tensors.update({f"{key}.{name}": t for name, t in snapshot[key].items()})
    return tensors


def assert_bitwise_equal(a: dict, b: dict) -> None:
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"{name} differs: max |diff| {(ta[name] - tb[name]).abs().max()}"


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0.0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
