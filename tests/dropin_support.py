"""Shared by the drop-in tests: torch.optim counterparts, snapshots of everything a step may change."""

from __future__ import annotations

import torch

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD

PAIRS = {
    "SGD": (LagrangianSGD, torch.optim.SGD),
    "Adam": (LagrangianAdam, torch.optim.Adam),
    "AdamW": (LagrangianAdamW, torch.optim.AdamW),
}

# One option set per class that exercises every state tensor (momentum with dampening, amsgrad).
RICH_OPTIONS = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.25, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=0.1, maximize=True),
}


def snapshot(optimizer) -> dict:
    """Clones of every parameter, state tensor, multiplier and dual state, and the pending sample counts."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "state": [{key: value.clone() if isinstance(value, torch.Tensor) else value
                   for key, value in optimizer.state.get(p, {}).items()} for p in params],
        "multipliers": {name: (block.multipliers.clone(), block.dual_state.clone())
                        for name, block in optimizer.constraints.items()},
        "pending": {name: sum(ids.numel() for ids in block._pending_ids)
                    for name, block in optimizer.constraints.items()},
    }


def assert_same(actual, expected, atol: float = 0.0) -> None:
    """Equal structure and values; tensors bitwise (atol=0) or within atol."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key], atol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            assert_same(a, b, atol)
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        if atol == 0:
            assert torch.equal(actual, expected), (actual - expected).abs().max()
        else:
            torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    else:
        assert actual == expected


def assert_params_equal(ours, theirs, atol: float = 0.0) -> None:
    """Parameter lists (or modules) equal: bitwise for atol=0."""
    ours = list(ours.parameters()) if isinstance(ours, torch.nn.Module) else list(ours)
    theirs = list(theirs.parameters()) if isinstance(theirs, torch.nn.Module) else list(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_same(a.detach(), b.detach(), atol)


def tolerance(dtype: torch.dtype) -> float:
    """What "equals torch.optim" means: bitwise for float64 and complex (the exact path), 1e-6 for fp32."""
    return 0.0 if dtype in (torch.float64, torch.complex64, torch.complex128) else 1e-6
