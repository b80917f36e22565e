"""Block options: every value that would turn multipliers into NaN (or do nothing) is refused at
``add_constraint`` with an error naming the block and the option; nothing changes and training goes on."""

from __future__ import annotations

import math

import pytest
import torch

from dropin_support import assert_same, snapshot
from fused_lagrangian import ConstraintSpec, LagrangianAdam

NAN, INF = math.nan, math.inf

# (options, words the error must contain besides the block's name)
BAD_OPTIONS = [
    (dict(bound=NAN), "bound"),
    (dict(bound=INF), "bound"),
    (dict(bound=-INF, sense=">="), "bound"),
    (dict(kind="grouped", num_constraints=3, bound=torch.tensor([0.1, NAN, 0.2])), "bound"),
    (dict(kind="grouped", num_constraints=3, bound=torch.tensor([0.1, 0.2, INF], dtype=torch.float64)), "bound"),
    (dict(kind="grouped", num_constraints=3, bound=[0.1, 0.2, 0.3]), "list"),
    (dict(kind="grouped", num_constraints=3, bound=torch.zeros(3, device="meta")), "meta"),
    (dict(kind="grouped", num_constraints=3, bound=torch.zeros(2)), "bound"),
    (dict(dual_lr=INF), "dual_lr"),
    (dict(dual_lr=NAN), "dual_lr"),
    (dict(dual_lr=-0.1), "dual_lr"),
    (dict(dual_rule="nupi", kp=NAN), "kp"),
    (dict(dual_rule="nupi", kp=INF), "kp"),
    (dict(dual_rule="nupi", ki=-INF), "ki"),
    (dict(dual_rule="nupi", nu=NAN), "nu"),
    (dict(damping=NAN), "damping"),
    (dict(damping=INF), "damping"),
    (dict(formulation="augmented", penalty=INF), "penalty"),
    (dict(max_multiplier=NAN), "max_multiplier"),
    (dict(num_constraints=2.5), "num_constraints"),
    (dict(num_constraints=True), "num_constraints"),
    (dict(num_constraints=0), "num_constraints"),
    (dict(sense="==", init=2.0, max_multiplier=1.0), "init"),
    (dict(sense="==", init=-2.0, max_multiplier=1.0), "init"),
    (dict(init=-0.5), "init"),
    (dict(init=NAN), "init"),
    (dict(device="meta"), "meta"),
]


def train(model, optimizer, block, steps: range) -> None:
    for index in steps:
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(index))
        output = model(x).squeeze(1)
        loss = output.pow(2).mean() + block(output.mean().unsqueeze(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fresh(backend: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
    block = optimizer.add_constraint("mean", num_constraints=1, sense=">=", bound=0.3, dual_lr=0.5)
    return model, optimizer, block


@pytest.mark.parametrize("options, words", BAD_OPTIONS, ids=[repr(o)[:60] for o, _ in BAD_OPTIONS])
def test_bad_option_is_refused_naming_block_and_option_and_changes_nothing(backend, options, words):
    model, optimizer, block = fresh(backend)
    train(model, optimizer, block, range(3))
    before = snapshot(optimizer)
    options = dict(options)
    kind = options.pop("kind", "dense")
    num_constraints = options.pop("num_constraints", 1)
    with pytest.raises(ValueError, match=rf"'bad'(.|\n)*{words}"):
        optimizer.add_constraint("bad", kind, num_constraints, **options)
    assert list(optimizer.constraints) == ["mean"]
    assert_same(snapshot(optimizer), before)
    # Training goes on, and equals a run that never saw the refused call.
    train(model, optimizer, block, range(3, 6))
    clean_model, clean_optimizer, clean_block = fresh(backend)
    train(clean_model, clean_optimizer, clean_block, range(6))
    assert_same(snapshot(optimizer), snapshot(clean_optimizer))


def test_huge_block_fails_at_once_naming_block_and_memory(backend):
    model, optimizer, block = fresh(backend)
    with pytest.raises(MemoryError, match=r"'rows'.*num_constraints=10000000000000 needs 72\.8 TB"):
        optimizer.add_constraint("rows", kind="indexed", num_constraints=10**13, dual_rule="nupi")
    with pytest.raises(ValueError, match="'rows'"):  # also a ValueError, like the other option checks
        optimizer.add_constraint("rows", kind="indexed", num_constraints=10**13)
    assert list(optimizer.constraints) == ["mean"]
    train(model, optimizer, block, range(2))


@pytest.mark.parametrize("options, expected_bound", [
    (dict(num_constraints=1e3), 0.0),  # a whole float is a count
    (dict(num_constraints=3, bound=torch.tensor(0.25)), 0.25),  # a 0-dim tensor is a scalar bound
    (dict(num_constraints=3, bound=torch.tensor([1, 2, 3])), None),  # integer entries are fine
    (dict(num_constraints=2, sense="==", init=-1.0, max_multiplier=1.0), 0.0),
])
def test_good_options_still_accepted(options, expected_bound):
    spec = ConstraintSpec(name="ok", kind="grouped", **options)
    assert isinstance(spec.num_constraints, int)
    if expected_bound is not None:
        assert spec.bound == expected_bound


def test_meta_device_block_cannot_make_step_silently_do_nothing(backend):
    """Refused at add_constraint, so no step can skip its multipliers (or anything else) quietly."""
    model, optimizer, block = fresh(backend)
    with pytest.raises(ValueError, match="'groups'.*meta"):
        optimizer.add_constraint("groups", "grouped", 4, device=torch.device("meta"))
    before = snapshot(optimizer)
    train(model, optimizer, block, range(1))
    assert not torch.equal(snapshot(optimizer)["multipliers"]["mean"][0], before["multipliers"]["mean"][0])
