"""torch.compile: a loss with dense, indexed and grouped blocks, and the optimizer step driven by a scheduler's
tensor lr, both traced whole (fullgraph=True), without recompiles once warm, equal to eager; on the native
backend (its C++ op) and on the reference (one custom op running the reference as eager, custom_op.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

from fused_lagrangian import ConstraintInputError, LagrangianAdam, backends

STEPS = 50
NATIVE = pytest.param("native", marks=pytest.mark.skipif(backends.unavailable_reason("native", "cpu") is not None,
                                                         reason="the native extension is not built"))
BACKENDS = [NATIVE, "reference"]


def build(backend: str = "native", tensor_lr: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    optimizer = LagrangianAdam(model.parameters(), lr=lr, backend=backend)
    optimizer.add_constraint("dense", num_constraints=2, dual_lr=0.1)
    optimizer.add_constraint("rows", kind="indexed", num_constraints=64, dual_lr=0.1, bound=0.1)
    optimizer.add_constraint("groups", kind="grouped", num_constraints=3, dual_lr=0.1, bound=-0.05, to_overall=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    return model, optimizer, scheduler


def batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(16, 4, generator=generator), torch.randint(0, 64, (16,), generator=generator),
            torch.randint(0, 3, (16,), generator=generator))


def loss_of(model, optimizer):
    blocks = optimizer.constraints

    def loss_fn(x, ids, group_ids):
        out = model(x).flatten()
        return ((out - 1) ** 2).mean() + blocks["dense"](torch.stack([out.mean(), -out.mean() - 2])) + \
            blocks["rows"](out, ids=ids) + blocks["groups"](torch.sigmoid(out), ids=group_ids)

    return loss_fn


def train(backend: str, compile_loss: bool, compile_step: bool) -> list[torch.Tensor]:
    model, optimizer, scheduler = build(backend)
    loss_fn = loss_of(model, optimizer)
    if compile_loss:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    step = optimizer.step
    if compile_step:
        raw = type(optimizer).step  # DESIGN §9: the scheduler wraps the instance's step in a skipped file
        step = torch.compile(lambda: raw(optimizer), fullgraph=True)
    for i in range(STEPS):
        if i == 2:
            # Both compiled functions have seen their steady state (the first step creates Adam's state).
            torch._dynamo.config.error_on_recompile = True
        loss_fn(*batch(i)).backward()
        step()
        optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the compiled step bypasses the scheduler's step counter
            scheduler.step()
    torch._dynamo.config.error_on_recompile = False
    optimizer.raise_input_errors()
    return [p.detach().clone() for p in model.parameters()] + [b.multipliers.clone() for b in optimizer.constraints.values()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_loss, compile_step", [(True, False), (False, True), (True, True)])
def test_compiled_loss_and_step_equal_eager_without_graph_breaks_or_recompiles(backend, compile_loss, compile_step):
    eager = train(backend, False, False)
    torch._dynamo.utils.counters.clear()
    compiled = train(backend, compile_loss, compile_step)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(x.abs().sum() > 0 for x in eager[2:])  # every block's multipliers moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_in_a_compiled_loss_raises_at_the_next_step_and_changes_nothing(backend):
    model, optimizer, _ = build(backend)
    loss_fn = torch.compile(loss_of(model, optimizer), fullgraph=True)
    loss_fn(*batch(0)).backward()
    optimizer.step()
    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()] + \
        [b.multipliers.clone() for b in optimizer.constraints.values()]
    x, ids, group_ids = batch(1)
    ids[3] = 64  # out of range: checked on the device inside the graph, read at the step
    loss_fn(x, ids, group_ids).backward()
    with pytest.raises(ConstraintInputError, match="'rows'.*out of range"):
        optimizer.step()
    after = [p.detach().clone() for p in model.parameters()] + \
        [b.multipliers.clone() for b in optimizer.constraints.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))

    # Compiled step: the error code makes the kernel skip the whole update; report() raises it.
    optimizer.zero_grad()
    raw = type(optimizer).step
    step = torch.compile(lambda: raw(optimizer), fullgraph=True)
    x[0] = float("nan")
    loss_fn(x, batch(1)[1], group_ids).backward()
    step()
    after_compiled = [p.detach().clone() for p in model.parameters()] + \
        [b.multipliers.clone() for b in optimizer.constraints.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after_compiled))
    with pytest.raises(ConstraintInputError, match="NaN or inf"):
        optimizer.report()


def test_capturable_adam_is_accepted_and_equals_eager_on_the_cpu():
    results = []
    for capturable in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = LagrangianAdam(model.parameters(), lr=1e-2, capturable=capturable)
        block = optimizer.add_constraint("c", num_constraints=1, dual_lr=0.5)
        for i in range(5):
            out = model(torch.full((2, 3), float(i))).flatten()
            (out.pow(2).mean() + block(out.mean().reshape(1))).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()] + [block.multipliers.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def memberships_batch(step: int):
    """16 samples, each in up to two of 3 groups: (B, M) ids padded with -1 at places that change every batch."""
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 3, (16, 2), generator=generator)
    return torch.randn(16, 4, generator=generator), ids.masked_fill(torch.rand(16, 2, generator=generator) < 0.3, -1)


def train_with_memberships(backend: str, compiled: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
    block = optimizer.add_constraint("groups", kind="grouped", num_constraints=3, dual_lr=0.5, bound=-0.05,
                                     to_overall=True)

    def loss_fn(x, ids):
        out = model(x).flatten()
        return ((out - 1) ** 2).mean() + block(torch.sigmoid(out), ids=ids)

    step = optimizer.step
    if compiled:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
        raw = type(optimizer).step
        step = torch.compile(lambda: raw(optimizer), fullgraph=True)
    for i in range(12):
        torch._dynamo.config.error_on_recompile = compiled and i >= 2
        loss_fn(*memberships_batch(i)).backward()
        step()
        optimizer.zero_grad()
    torch._dynamo.config.error_on_recompile = False
    return [p.detach().clone() for p in model.parameters()] + [block.multipliers.clone()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_memberships_compile_whole_and_equal_eager(backend):
    """(B, M) group ids padded with -1 make no data-dependent shape (the padding is kept as entries of weight 0,
    which the step ignores): the loss and the step trace whole, and moving padding is no recompile."""
    eager = train_with_memberships(backend, compiled=False)
    torch._dynamo.utils.counters.clear()
    compiled = train_with_memberships(backend, compiled=True)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert (eager[-1] > 0).all()  # every group's multiplier moved
