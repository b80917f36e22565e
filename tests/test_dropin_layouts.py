"""Layouts torch.optim accepts, every backend accepts, with torch.optim's result (fp32 within 1e-6).

Strided and expanded ids, gradients whose strides differ in size-1 dimensions (autograd's einsum) or
entirely (assigned by hand), models moved to channels_last after their state exists or loaded from
contiguous checkpoints, gapped parameters, a parameter listed twice; and samples pending in a block
survive a step that raises.
"""

from __future__ import annotations

import io

import pytest
import torch

from dropin_support import PAIRS, RICH_OPTIONS, assert_params_equal, assert_same, snapshot
from fused_lagrangian import LagrangianAdam, LagrangianSGD

KINDS = ["SGD", "Adam", "AdamW"]


def pair(kind: str, backend: str, ours_params, torch_params, **options):
    options = options or RICH_OPTIONS[kind]
    ours_cls, torch_cls = PAIRS[kind]
    return ours_cls(ours_params, backend=backend, **options), torch_cls(torch_params, **options)


def step_both(ours, theirs) -> None:
    ours.step()
    theirs.step()
    ours.zero_grad()
    theirs.zero_grad()


@pytest.mark.parametrize("kind", KINDS)
def test_einsum_gradient_with_other_size1_strides(backend, kind):
    """A (1, D) weight used as einsum("bd,od->bo") gets a gradient with strides (1, 1), not (D, 1)."""
    torch.manual_seed(0)
    weight = torch.randn(1, 5)
    ours_w, torch_w = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ours, theirs = pair(kind, backend, [ours_w], [torch_w])
    for index in range(4):
        x = torch.randn(7, 5, generator=torch.Generator().manual_seed(index))
        for w in (ours_w, torch_w):
            torch.einsum("bd,od->bo", x, w).pow(2).sum().backward()
        assert ours_w.grad.stride() != ours_w.stride()  # the case under test
        step_both(ours, theirs)
        assert_params_equal([ours_w], [torch_w], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad_layout", ["transposed", "size1_strides", "expanded"])
def test_gradient_assigned_with_another_layout(backend, kind, grad_layout):
    torch.manual_seed(1)
    shapes = [(3, 4), (1, 6), (5, 1)]
    ours_params = [torch.randn(shape).requires_grad_() for shape in shapes]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours, theirs = pair(kind, backend, ours_params, torch_params)
    for index in range(4):
        for p, q in zip(ours_params, torch_params):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(index))
            if grad_layout == "transposed":
                grad = grad.t().contiguous().t() if grad.dim() == 2 else grad
            elif grad_layout == "size1_strides":
                grad = grad.as_strided(grad.shape, [1 if size == 1 else stride
                                                    for size, stride in zip(grad.shape, grad.stride())])
                grad = grad.clone(memory_format=torch.preserve_format) if not grad.is_contiguous() else grad
            else:
                grad = grad[:1].expand(p.shape) if p.shape[0] > 1 else grad
            p.grad, q.grad = grad, grad.clone()
        step_both(ours, theirs)
        assert_params_equal(ours_params, torch_params, atol=1e-6)


def conv_model() -> torch.nn.Module:
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))


def conv_loss(model, index: int) -> torch.Tensor:
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(index))
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return model(x).pow(2).mean()


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_after_state_exists(backend, kind):
    ours_model, torch_model = conv_model(), conv_model()
    ours, theirs = pair(kind, backend, ours_model.parameters(), torch_model.parameters())
    for index in range(6):
        if index == 3:  # state exists, contiguous; the parameters become channels_last
            ours_model.to(memory_format=torch.channels_last)
            torch_model.to(memory_format=torch.channels_last)
            assert ours_model[0].weight.is_contiguous(memory_format=torch.channels_last)
            assert not ours_model[0].weight.is_contiguous()
        conv_loss(ours_model, index).backward()
        conv_loss(torch_model, index).backward()
        step_both(ours, theirs)
        assert_params_equal(ours_model, torch_model, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_contiguous_checkpoint_into_channels_last_model(backend, kind):
    saved_model = conv_model()
    saved = PAIRS[kind][0](saved_model.parameters(), backend=backend, **RICH_OPTIONS[kind])
    for index in range(3):
        conv_loss(saved_model, index).backward()
        saved.step()
        saved.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": saved_model.state_dict(), "optimizer": saved.state_dict()}, buffer)

    ours_model, torch_model = conv_model(), conv_model()
    ours, theirs = pair(kind, backend, ours_model.parameters(), torch_model.parameters())
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        buffer.seek(0)
        checkpoint = torch.load(buffer)
        model.load_state_dict(checkpoint["model"])
        model.to(memory_format=torch.channels_last)
        checkpoint["optimizer"].pop("constraints")
        optimizer.load_state_dict(checkpoint["optimizer"])
    for index in range(3, 6):
        conv_loss(ours_model, index).backward()
        conv_loss(torch_model, index).backward()
        step_both(ours, theirs)
        assert_params_equal(ours_model, torch_model, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gapped_parameter(backend, kind):
    """A parameter that is every other column of a bigger tensor: the gaps are never written."""
    torch.manual_seed(3)
    ours_base, torch_base = torch.randn(4, 8), None
    torch_base = ours_base.clone()
    ours_p = ours_base[:, ::2].requires_grad_()
    torch_p = torch_base[:, ::2].requires_grad_()
    gaps = ours_base[:, 1::2].clone()
    ours, theirs = pair(kind, backend, [ours_p], [torch_p])
    for index in range(4):
        grad = torch.randn(4, 4, generator=torch.Generator().manual_seed(index))
        ours_p.grad, torch_p.grad = grad.clone(), grad.clone()
        step_both(ours, theirs)
        assert_params_equal([ours_p], [torch_p], atol=1e-6)
        assert torch.equal(ours_base[:, 1::2], gaps)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_listed_twice_in_a_group_is_updated_as_torch_does(backend, kind):
    """torch.optim warns and updates it twice in order; the fused step must not race with itself."""
    torch.manual_seed(4)
    shared, other = torch.randn(4, 3), torch.randn(5)
    ours_params = [shared.clone().requires_grad_(), other.clone().requires_grad_()]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ours, theirs = pair(kind, backend, [ours_params[0], ours_params[1], ours_params[0]],
                            [torch_params[0], torch_params[1], torch_params[0]])
    for index in range(4):
        for p, q in zip(ours_params, torch_params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(index))
            q.grad = p.grad.clone()
        step_both(ours, theirs)
        assert_params_equal(ours_params, torch_params, atol=1e-6)
        for p, q in zip(ours_params, torch_params):
            for key, value in theirs.state[q].items():
                if isinstance(value, torch.Tensor):
                    assert_same(ours.state[p][key], value, atol=1e-6)


def test_parameter_in_two_groups_is_refused_as_torch_does(backend):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        LagrangianSGD([{"params": [p]}, {"params": [p]}], lr=0.1, backend=backend)


# --------------------------------------------------------------------------------------------------
# Ids of any layout, pending samples kept


def ids_of_layout(table: torch.Tensor, layout: str) -> torch.Tensor:
    """Column 1 of an (B, 2) id table in the given layout."""
    if layout == "strided":
        return table[:, 1]
    if layout == "expanded":
        return table[2:3, 1].expand(table.shape[0])
    return table.int()[:, 1]  # int32, strided


@pytest.mark.parametrize("kind", ["indexed", "grouped"])
@pytest.mark.parametrize("layout", ["strided", "expanded", "int32_strided"])
def test_ids_of_any_layout_update_like_contiguous_ids(backend, kind, layout):
    def run(ids_of):
        torch.manual_seed(5)
        model = torch.nn.Linear(3, 1)
        optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
        block = optimizer.add_constraint("rows", kind=kind, num_constraints=6, bound=0.1, dual_lr=0.5)
        for index in range(3):
            generator = torch.Generator().manual_seed(index)
            x = torch.randn(8, 3, generator=generator)
            ids = ids_of(torch.randint(0, 6, (8, 2), generator=generator))
            values = model(x).squeeze(1)
            (values.pow(2).mean() + block(values, ids=ids)).backward()
            optimizer.step()
            optimizer.zero_grad()
        return snapshot(optimizer)

    result = run(lambda table: ids_of_layout(table, layout))
    assert_same(result, run(lambda table: ids_of_layout(table, layout).contiguous().long()))
    assert (result["multipliers"]["rows"][0] != 0).any()


def test_pending_samples_survive_a_step_that_raises(backend, monkeypatch):
    def fresh():
        torch.manual_seed(6)
        model = torch.nn.Linear(3, 1)
        optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
        block = optimizer.add_constraint("rows", kind="indexed", num_constraints=5, dual_lr=0.5)
        return model, optimizer, block

    def forward(model, block, index):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(index))
        values = model(x).squeeze(1)
        (values.sum() + block(values, ids=torch.tensor([0, 3, 3, 1]))).backward()

    model, optimizer, block = fresh()
    forward(model, block, 0)
    before = snapshot(optimizer)
    real = optimizer._resolved

    def failing(device):
        def fail(*args):
            raise RuntimeError("simulated backend failure")
        return real(device)[0], fail

    monkeypatch.setattr(optimizer, "_resolved", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        optimizer.step()
    assert_same(snapshot(optimizer), before)
    assert before["pending"]["rows"] == 4
    monkeypatch.setattr(optimizer, "_resolved", real)
    optimizer.step()

    clean_model, clean_optimizer, clean_block = fresh()
    forward(clean_model, clean_block, 0)
    clean_optimizer.step()
    assert_same(snapshot(optimizer), snapshot(clean_optimizer))
    assert (block.multipliers != 0).any()
