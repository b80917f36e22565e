"""Drop-in contract: with no constraint block, the optimizers are torch.optim.SGD / Adam / AdamW.

The oracle is torch.optim itself (single-tensor implementation, ``foreach=False``), run on a copy of the
same model with the same batches; trajectories must agree to 1e-6 (fp32) over 100 steps.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD

PAIRS = {
    "SGD": (LagrangianSGD, torch.optim.SGD),
    "Adam": (LagrangianAdam, torch.optim.Adam),
    "AdamW": (LagrangianAdamW, torch.optim.AdamW),
}

OPTIONS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.5, weight_decay=1e-2)),
    ("SGD", dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True)),
    ("SGD", dict(lr=1e-3, maximize=True, weight_decay=0.1)),
    ("Adam", dict()),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
    ("Adam", dict(lr=1e-3, maximize=True, amsgrad=True, weight_decay=1e-3)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-5, maximize=True)),
]


def make_model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)


def loss_of(model, index: int) -> torch.Tensor:
    x, y = batch(index)
    return F.mse_loss(model(x), y)


def train(model, optimizer, steps: range, scheduler=None) -> None:
    for index in steps:
        loss_of(model, index).backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same_parameters(ours, theirs, atol: float = 1e-6) -> None:
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def both(kind: str, backend: str, params_of=lambda m: m.parameters(), **options):
    """Two copies of the model with our optimizer and torch's, built from the same options."""
    ours_cls, torch_cls = PAIRS[kind]
    ours_model, torch_model = make_model(), make_model()
    ours = ours_cls(params_of(ours_model), backend=backend, **options)
    theirs = torch_cls(params_of(torch_model), foreach=False, **options)
    return (ours_model, ours), (torch_model, theirs)


@pytest.mark.parametrize("kind, options", OPTIONS, ids=[f"{k}-{o}" for k, o in OPTIONS])
def test_matches_torch_optim(backend, kind, options):
    (ours_model, ours), (torch_model, theirs) = both(kind, backend, **options)
    train(ours_model, ours, range(100))
    train(torch_model, theirs, range(100))
    assert_same_parameters(ours_model, torch_model)
    assert not torch.equal(ours_model[0].weight, make_model()[0].weight)


@pytest.mark.parametrize("kind, groups", [
    ("SGD", [dict(lr=0.1, momentum=0.9), dict(nesterov=True, momentum=0.8, weight_decay=1e-3)]),
    ("Adam", [dict(betas=(0.8, 0.9), amsgrad=True), dict(lr=3e-3, weight_decay=1e-2)]),
    ("AdamW", [dict(weight_decay=0.5), dict(lr=2e-2, maximize=True, eps=1e-4)]),
])
def test_param_groups_with_different_options(backend, kind, groups):
    def params_of(model):
        return [dict(params=model[0].parameters(), **groups[0]), dict(params=model[2].parameters(), **groups[1])]

    (ours_model, ours), (torch_model, theirs) = both(kind, backend, params_of, lr=1e-2)
    train(ours_model, ours, range(100))
    train(torch_model, theirs, range(100))
    assert_same_parameters(ours_model, torch_model)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_step_lr_scheduler(backend, kind):
    options = dict(lr=0.05, momentum=0.9) if kind == "SGD" else dict(lr=0.05)
    (ours_model, ours), (torch_model, theirs) = both(kind, backend, **options)
    train(ours_model, ours, range(100), torch.optim.lr_scheduler.StepLR(ours, step_size=10, gamma=0.7))
    train(torch_model, theirs, range(100), torch.optim.lr_scheduler.StepLR(theirs, step_size=10, gamma=0.7))
    assert_same_parameters(ours_model, torch_model)
    assert ours.param_groups[0]["lr"] == pytest.approx(0.05 * 0.7**10)


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
def test_tensor_lr_updated_in_place_by_a_scheduler(backend, kind):
    ours_lr, torch_lr = torch.tensor(0.02), torch.tensor(0.02)
    ours_model, torch_model = make_model(), make_model()
    ours = PAIRS[kind][0](ours_model.parameters(), lr=ours_lr, backend=backend)
    theirs = PAIRS[kind][1](torch_model.parameters(), lr=torch_lr, foreach=False)
    train(ours_model, ours, range(100), torch.optim.lr_scheduler.ExponentialLR(ours, gamma=0.97))
    train(torch_model, theirs, range(100), torch.optim.lr_scheduler.ExponentialLR(theirs, gamma=0.97))
    assert ours.param_groups[0]["lr"] is ours_lr  # the scheduler wrote into the tensor (fill_)
    assert ours_lr.item() == pytest.approx(0.02 * 0.97**100, rel=1e-5)  # fp32 products
    assert_same_parameters(ours_model, torch_model)


def test_tensor_lr_is_read_at_every_step(backend):
    lr = torch.tensor(0.1)
    model = make_model()
    optimizer = LagrangianSGD(model.parameters(), lr=lr, backend=backend)
    train(model, optimizer, range(3))
    lr.fill_(0.0)
    before = copy.deepcopy(model)
    train(model, optimizer, range(3, 6))
    assert_same_parameters(model, before, atol=0)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_closure(backend, kind):
    (ours_model, ours), (torch_model, theirs) = both(kind, backend, lr=1e-2)
    for index in range(100):
        losses = []
        for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
            def closure(model=model, optimizer=optimizer):
                optimizer.zero_grad()
                loss = loss_of(model, index)
                loss.backward()
                return loss
            losses.append(optimizer.step(closure))
        assert isinstance(losses[0], torch.Tensor)
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    assert_same_parameters(ours_model, torch_model)


def test_gradient_accumulation(backend):
    (ours_model, ours), (torch_model, theirs) = both("Adam", backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        for index in range(0, 100, 2):
            for micro in (index, index + 1):
                (loss_of(model, micro) / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_same_parameters(ours_model, torch_model)


# --------------------------------------------------------------------------------------------------
# state_dict


def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("kind, options", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                           ("Adam", dict(lr=1e-2, amsgrad=True)),
                                           ("AdamW", dict(lr=1e-2))])
def test_state_dict_round_trip_mid_run_resumes_bit_identically(backend, kind, options):
    ours_cls = PAIRS[kind][0]
    model = make_model()
    optimizer = ours_cls(model.parameters(), backend=backend, **options)
    train(model, optimizer, range(50))
    saved_model, saved_optimizer = roundtrip(model.state_dict()), roundtrip(optimizer.state_dict())
    train(model, optimizer, range(50, 100))

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = ours_cls(resumed.parameters(), backend=backend, **options)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train(resumed, resumed_optimizer, range(50, 100))
    assert_same_parameters(resumed, model, atol=0)


@pytest.mark.parametrize("kind, options", [("SGD", dict(lr=0.05, momentum=0.9)),
                                           ("Adam", dict(lr=1e-2, amsgrad=True)),
                                           ("AdamW", dict(lr=1e-2))])
def test_loads_a_torch_optim_state_dict_and_continues_equal(backend, kind, options):
    ours_cls, torch_cls = PAIRS[kind]
    torch_model = make_model()
    theirs = torch_cls(torch_model.parameters(), foreach=False, **options)
    train(torch_model, theirs, range(50))

    ours_model = make_model()
    ours_model.load_state_dict(torch_model.state_dict())
    ours = ours_cls(ours_model.parameters(), backend=backend, **options)
    ours.load_state_dict(roundtrip(theirs.state_dict()))
    train(ours_model, ours, range(50, 100))
    train(torch_model, theirs, range(50, 100))
    assert_same_parameters(ours_model, torch_model)


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_step_is_stored_like_torch(backend, kind):
    (ours_model, ours), (torch_model, theirs) = both(kind, backend)
    train(ours_model, ours, range(7))
    train(torch_model, theirs, range(7))
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        ours_step, torch_step = ours.state[p]["step"], theirs.state[q]["step"]
        assert isinstance(ours_step, torch.Tensor) and ours_step.dim() == 0
        assert ours_step.dtype == torch_step.dtype == torch.float32
        assert ours_step.device == torch_step.device
        assert ours_step.item() == torch_step.item() == 7
    restored = PAIRS[kind][0](make_model().parameters(), backend=backend)
    restored.load_state_dict(roundtrip(ours.state_dict()))
    for state in restored.state.values():
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0 and state["step"].item() == 7


# --------------------------------------------------------------------------------------------------
# GradScaler


def scaled_training(model, optimizer, scaler, steps: range, block=None, poison_step=None) -> None:
    for index in steps:
        loss = loss_of(model, index)
        if block is not None:
            loss = loss + block(model[2].bias)  # a dense block on the output bias, K = 2
        scaler.scale(loss).backward()
        if index == poison_step:
            model[0].weight.grad[0, 0] = math.inf
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_grad_scaler_matches_torch(backend, kind):
    (ours_model, ours), (torch_model, theirs) = both(kind, backend, lr=1e-2)
    scaled_training(ours_model, ours, torch.amp.GradScaler("cpu", init_scale=2.0**10), range(100))
    scaled_training(torch_model, theirs, torch.amp.GradScaler("cpu", init_scale=2.0**10), range(100))
    assert_same_parameters(ours_model, torch_model)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_grad_scaler_with_unscale_and_clipping_matches_torch(backend, kind):
    """The usual clipping recipe: unscale_ first, so the step must not divide by the scale again."""
    (ours_model, ours), (torch_model, theirs) = both(kind, backend, lr=1e-2)
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for index in range(100):
            scaler.scale(loss_of(model, index)).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert_same_parameters(ours_model, torch_model)


def test_grad_scaler_inf_step_skips_primal_and_dual(backend):
    def fresh():
        model = make_model()
        optimizer = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
        block = optimizer.add_constraint("bias", num_constraints=2, sense="==", bound=0.1, dual_lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return model, optimizer, block, scaler

    model, optimizer, block, scaler = fresh()
    scaled_training(model, optimizer, scaler, range(5), block)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    assert (block.multipliers != 0).all()
    scaled_training(model, optimizer, scaler, range(5, 6), block, poison_step=5)
    assert scaler.get_scale() == 2.0**9
    assert_same_parameters(model, _with_state(make_model(), before[0]), atol=0)
    after = optimizer.state_dict()
    assert torch.equal(after["constraints"]["bias"]["multipliers"], before[1]["constraints"]["bias"]["multipliers"])
    for key, state in after["state"].items():
        torch.testing.assert_close(state, before[1]["state"][key], rtol=0, atol=0)
        assert state["step"].item() == 5

    # The skipped iteration leaves no trace: continuing equals a run that never saw it.
    scaled_training(model, optimizer, scaler, range(6, 30), block)
    clean_model, clean_optimizer, clean_block, clean_scaler = fresh()
    scaled_training(clean_model, clean_optimizer, clean_scaler, range(5), clean_block)
    scaled_training(clean_model, clean_optimizer, clean_scaler, range(6, 30), clean_block)
    assert_same_parameters(model, clean_model)
    torch.testing.assert_close(block.multipliers, clean_block.multipliers, rtol=0, atol=1e-6)
    assert (block.multipliers != 0).all()


def _with_state(model, state_dict):
    model.load_state_dict(state_dict)
    return model
