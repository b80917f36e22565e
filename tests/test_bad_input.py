"""Bad input to a block raises a ConstraintInputError naming the block, before anything changes.

After the error, parameters, multipliers and optimizer state are exactly as before, and training that
goes on with good input equals a run that never saw the bad input.  With ``nonfinite="skip"`` a
non-finite update is dropped and counted in ``report()`` instead.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fused_lagrangian import ConstraintInputError, LagrangianAdam

NAN, INF = math.nan, math.inf
BATCH = 6


def build(backend: str, nonfinite: str = "raise"):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
    optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
    options = dict(dual_lr=0.1, nonfinite=nonfinite)
    optimizer.add_constraint("dense_block", num_constraints=3, dual_rule="nupi", kp=1.0, **options)
    optimizer.add_constraint("indexed_block", kind="indexed", num_constraints=10, **options)
    optimizer.add_constraint("grouped_block", kind="grouped", num_constraints=4, sense="==", **options)
    optimizer.add_constraint("first_block", num_constraints=1, ordering="dual_first", **options)
    return model, optimizer


def good_inputs(model, step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    out = model(torch.randn(BATCH, 3, generator=generator)).flatten()
    return {
        "dense_block": dict(values=torch.stack([out.mean(), out.max(), -out.min()])),
        "indexed_block": dict(values=out, ids=torch.randint(0, 10, (BATCH,), generator=generator)),
        "grouped_block": dict(values=torch.sigmoid(out), ids=torch.randint(0, 4, (BATCH,), generator=generator),
                              dual_values=(out > 0).float()),
        "first_block": dict(values=out.mean().reshape(1) + 0.5),
    }


def train(model, optimizer, steps: range) -> None:
    for step in steps:
        inputs = good_inputs(model, step)
        loss = sum(optimizer.constraints[name](**kwargs) for name, kwargs in inputs.items())
        loss = loss + (model.weight ** 2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def everything(model, optimizer) -> dict:
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def assert_identical(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def values(*numbers, dtype=torch.float32, device="cpu"):
    return torch.tensor(numbers, dtype=dtype, device=device)


def ids(*numbers, dtype=torch.int64, device="cpu"):
    return torch.tensor(numbers, dtype=dtype, device=device)


BAD_INPUTS = {
    "dense wrong length": ("dense_block", dict(values=values(1, 2, 3, 4)), "shape"),
    "dense 2-D": ("dense_block", dict(values=torch.ones(3, 1)), "shape"),
    "dense given ids": ("dense_block", dict(values=values(1, 2, 3), ids=ids(0, 1, 2)), "no ids"),
    "indexed 2-D": ("indexed_block", dict(values=torch.ones(2, 2), ids=torch.zeros(2, 2, dtype=torch.int64)),
                    "1-D"),
    "indexed ids shape": ("indexed_block", dict(values=values(1, 2, 3), ids=ids(1, 2)), "shape"),
    "indexed no ids": ("indexed_block", dict(values=values(1, 2, 3)), "ids are required"),
    "dual_values shape": ("grouped_block", dict(values=values(1, 2), ids=ids(0, 1), dual_values=values(1, 2, 3)),
                          "dual_values must match"),
    "values int": ("dense_block", dict(values=values(1, 2, 3, dtype=torch.int64)), "floating-point"),
    "ids float": ("indexed_block", dict(values=values(1, 2), ids=values(1, 2)), "int64"),
    "dual_values int": ("grouped_block", dict(values=values(1, 2), ids=ids(0, 1),
                                              dual_values=values(1, 0, dtype=torch.int64)), "floating-point"),
    "values on another device": ("dense_block", dict(values=values(1, 2, 3, device="meta")), "meta"),
    "ids on another device": ("indexed_block", dict(values=values(1, 2), ids=ids(1, 2, device="meta")), "meta"),
    "dual_values on another device": ("grouped_block", dict(values=values(1, 2), ids=ids(0, 1),
                                                            dual_values=values(1, 0, device="meta")), "device"),
    "id -1": ("indexed_block", dict(values=values(1, 2), ids=ids(3, -1)), "out of range"),
    "id K": ("indexed_block", dict(values=values(1, 2), ids=ids(10, 3)), "out of range"),
    "group id K": ("grouped_block", dict(values=values(1, 2), ids=ids(0, 4)), "out of range"),
    "NaN value": ("indexed_block", dict(values=values(1, NAN), ids=ids(1, 2)), "NaN or inf"),
    "inf value": ("dense_block", dict(values=values(1, INF, 3)), "NaN or inf"),
    "-inf value dual-first": ("first_block", dict(values=values(-INF)), "NaN or inf"),
    "NaN value dual-first": ("first_block", dict(values=values(NAN)), "NaN or inf"),
    "NaN dual_values": ("grouped_block", dict(values=values(1, 2), ids=ids(0, 1), dual_values=values(NAN, 1)),
                        "NaN or inf"),
    "inf dual_values": ("grouped_block", dict(values=values(1, 2), ids=ids(0, 1), dual_values=values(1, INF)),
                        "NaN or inf"),
}


@pytest.fixture(scope="module")
def clean_run(backend):
    model, optimizer = build(backend)
    train(model, optimizer, range(6))
    return everything(model, optimizer)


@pytest.mark.parametrize("entry", ["call", "observe"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_block_and_changes_nothing(backend, clean_run, case, entry):
    name, kwargs, reason = BAD_INPUTS[case]
    model, optimizer = build(backend)
    train(model, optimizer, range(3))
    before = everything(model, optimizer)

    block = optimizer.constraints[name]
    with pytest.raises(ConstraintInputError, match=f"'{name}'.*{reason}"):
        block(**kwargs) if entry == "call" else block.observe(**kwargs)
    assert_identical(everything(model, optimizer), before)

    # A training loop that catches the error abandons the batch and goes on.
    train(model, optimizer, range(3, 6))
    assert_identical(everything(model, optimizer), clean_run)


@pytest.mark.parametrize("where", ["values", "dual_values"])
def test_skip_policy_drops_nonfinite_updates_and_counts_them(backend, where):
    model, optimizer = build(backend, nonfinite="skip")
    train(model, optimizer, range(2))
    block = optimizer.constraints["grouped_block"]
    multipliers = block.multipliers.clone()
    weight = model.weight.detach().clone()

    good = dict(values=values(0.5, 0.25), ids=ids(0, 1), dual_values=values(1, 0))
    bad = dict(good, **{where: values(NAN, 1)})
    for _ in range(2):
        term = block(**bad)
        assert term.item() == 0.0
        ((model.weight ** 2).sum() + term).backward()
        optimizer.step()
        optimizer.zero_grad()

    assert torch.equal(block.multipliers, multipliers)
    assert not torch.equal(model.weight, weight)  # the rest of the step went ahead
    assert optimizer.report()["grouped_block"]["nonfinite_skipped"] == 2
    assert all(optimizer.report()[name]["nonfinite_skipped"] == 0 for name in optimizer.constraints
               if name != "grouped_block")

    ((model.weight ** 2).sum() + block(**good)).backward()
    optimizer.step()
    assert not torch.equal(block.multipliers, multipliers)  # good input still moves the multipliers
    assert optimizer.report()["grouped_block"]["nonfinite_skipped"] == 2
