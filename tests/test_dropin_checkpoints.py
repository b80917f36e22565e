"""Checkpoints and copies: ``load_state_dict`` is all or nothing, old step formats load, and deepcopy /
pickle of an optimizer with blocks give an optimizer that steps (its blocks refer to the copy)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from dropin_support import PAIRS, assert_same, snapshot
from fused_lagrangian import LagrangianAdam


def fresh(backend: str, kind: str = "Adam"):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    options = dict(lr=1e-2, amsgrad=True) if kind != "SGD" else dict(lr=0.1, momentum=0.9, dampening=0.2)
    optimizer = PAIRS[kind][0](model.parameters(), backend=backend, **options)
    blocks = (optimizer.add_constraint("outputs", num_constraints=2, sense="==", dual_lr=0.3, max_multiplier=5.0),
              optimizer.add_constraint("rows", kind="indexed", num_constraints=10, dual_rule="nupi", kp=1.0,
                                       dual_lr=0.2, bound=-0.1),
              optimizer.add_constraint("first", num_constraints=1, dual_lr=0.1, ordering="dual_first", bound=-1.0))
    return model, optimizer, blocks


def train(model, optimizer, blocks, steps: range) -> None:
    outputs, rows, first = blocks
    for index in steps:
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(6, 4, generator=generator)
        y = model(x)
        ids = torch.randint(0, 10, (6,), generator=generator)
        loss = y.pow(2).mean() + outputs(y.mean(0)) + rows(y[:, 0], ids=ids) + first(y[:, 1].mean().unsqueeze(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def checkpoint_of(backend: str, steps: int = 3) -> dict:
    model, optimizer, blocks = fresh(backend)
    train(model, optimizer, blocks, range(steps))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def corrupt(state: dict, how: str) -> dict:
    state = copy.deepcopy(state)
    blocks = state["constraints"]
    if how == "missing_block":
        del blocks["rows"]
    elif how == "unknown_block":
        blocks["extra"] = copy.deepcopy(blocks["outputs"])
    elif how == "wrong_kind":
        blocks["rows"]["kind"] = "grouped"
    elif how == "wrong_K":
        blocks["rows"]["num_constraints"] = 11
    elif how == "one_element_multipliers":
        blocks["rows"]["multipliers"] = torch.ones(1)
    elif how == "multipliers_shape":
        blocks["rows"]["multipliers"] = torch.ones(10, 1)
    elif how == "multipliers_dtype":
        blocks["rows"]["multipliers"] = torch.ones(10, dtype=torch.int64)
    elif how == "multipliers_float64":
        blocks["rows"]["multipliers"] = blocks["rows"]["multipliers"].double()
    elif how == "multipliers_not_a_tensor":
        blocks["rows"]["multipliers"] = [0.0] * 10
    elif how == "negative_inequality_multiplier":
        blocks["rows"]["multipliers"][3] = -0.5
    elif how == "nan_multiplier":
        blocks["outputs"]["multipliers"][0] = float("nan")
    elif how == "multiplier_above_cap":
        blocks["outputs"]["multipliers"][1] = 6.0
    elif how == "multiplier_below_equality_cap":
        blocks["outputs"]["multipliers"][1] = -6.0
    elif how == "dual_rule":
        blocks["rows"]["dual_state"] = torch.zeros(0)
    elif how == "dual_rule_name":
        blocks["rows"]["dual_rule"] = "ascent"
    elif how == "sense":
        blocks["outputs"]["sense"] = "<="
    elif how == "missing_key":
        del blocks["rows"]["dual_state"]
    elif how == "missing_counter":
        del blocks["first"]["nonfinite_skipped"]
    elif how == "block_not_a_dict":
        blocks["first"] = None
    elif how == "state_shape":
        first_key = next(iter(state["state"]))
        state["state"][first_key]["exp_avg"] = torch.zeros(1)
    elif how == "step_not_a_number":
        first_key = next(iter(state["state"]))
        state["state"][first_key]["step"] = "three"
    elif how == "negative_step":
        first_key = next(iter(state["state"]))
        state["state"][first_key]["step"] = torch.tensor(-1.0)
    elif how == "group_size":
        state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:1]
    else:
        raise AssertionError(how)
    return state


CORRUPTIONS = ["missing_block", "unknown_block", "wrong_kind", "wrong_K", "one_element_multipliers",
               "multipliers_shape", "multipliers_dtype", "multipliers_float64", "multipliers_not_a_tensor",
               "negative_inequality_multiplier", "nan_multiplier", "multiplier_above_cap",
               "multiplier_below_equality_cap", "dual_rule", "dual_rule_name", "sense", "missing_key",
               "missing_counter", "block_not_a_dict", "state_shape", "step_not_a_number", "negative_step",
               "group_size"]


@pytest.fixture(scope="module")
def saved(backend):
    return checkpoint_of(backend)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_refused_checkpoint_changes_nothing_and_training_continues(backend, saved, how):
    model, optimizer, blocks = fresh(backend)
    train(model, optimizer, blocks, range(2))
    before = snapshot(optimizer)
    with pytest.raises(ValueError):
        optimizer.load_state_dict(corrupt(saved, how))
    assert_same(snapshot(optimizer), before)
    train(model, optimizer, blocks, range(2, 4))
    clean_model, clean_optimizer, clean_blocks = fresh(backend)
    train(clean_model, clean_optimizer, clean_blocks, range(4))
    assert_same(snapshot(optimizer), snapshot(clean_optimizer))


def test_errors_name_the_block_and_what_is_wrong(backend, saved):
    _, optimizer, _ = fresh(backend)
    for how, words in [("one_element_multipliers", r"'rows'.*multipliers has shape \(1,\).*\(10,\)"),
                       ("negative_inequality_multiplier", r"'rows'.*outside.*inequality"),
                       ("multiplier_above_cap", r"'outputs'.*outside"),
                       ("dual_rule", r"'rows'.*dual_state.*nupi"),
                       ("wrong_K", r"'rows'.*num_constraints=11"),
                       ("missing_key", r"'rows'.*lacks \['dual_state'\]"),
                       ("missing_block", r"missing \['rows'\]")]:
        with pytest.raises(ValueError, match=words):
            optimizer.load_state_dict(corrupt(saved, how))


def test_current_and_older_checkpoints_load(backend, saved):
    model, optimizer, blocks = fresh(backend)
    optimizer.load_state_dict(saved)
    assert_same(snapshot(optimizer)["multipliers"]["rows"][0], saved["constraints"]["rows"]["multipliers"])
    older = copy.deepcopy(saved)  # written before "sense" and "dual_rule" were stored
    for block_state in older["constraints"].values():
        del block_state["sense"], block_state["dual_rule"]
    _, other, _ = fresh(backend)
    other.load_state_dict(older)
    assert_same(snapshot(other), snapshot(optimizer))


@pytest.mark.parametrize("stored_as", ["int", "float", "float64_tensor", "shape_1_tensor", "int_tensor"])
def test_adam_step_in_older_formats_is_converted(backend, saved, stored_as):
    state = copy.deepcopy(saved)
    for param_state in state["state"].values():
        step = int(param_state["step"].item())
        param_state["step"] = {"int": step, "float": float(step),
                               "float64_tensor": torch.tensor(step, dtype=torch.float64),
                               "shape_1_tensor": torch.tensor([float(step)]),
                               "int_tensor": torch.tensor(step)}[stored_as]
    model, optimizer, blocks = fresh(backend)
    optimizer.load_state_dict(state)
    reference_model, reference_optimizer, reference_blocks = fresh(backend)
    reference_optimizer.load_state_dict(saved)
    for param_state in optimizer.state.values():
        assert param_state["step"].dtype == torch.float32 and param_state["step"].dim() == 0
    train(model, optimizer, blocks, range(3, 5))
    train(reference_model, reference_optimizer, reference_blocks, range(3, 5))
    assert_same(snapshot(optimizer), snapshot(reference_optimizer))


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_on_their_own(backend, kind, how):
    """The copy's blocks belong to the copy: both continue identically and independently."""
    model, optimizer, blocks = fresh(backend, kind)
    train(model, optimizer, blocks, range(2))
    x = torch.randn(3, 4)
    blocks[1](model(x)[:, 0], ids=torch.tensor([1, 2, 2]))  # a pending sample travels with the copy
    duplicate = (copy.deepcopy((model, optimizer, blocks)) if how == "deepcopy"
                 else pickle.loads(pickle.dumps((model, optimizer, blocks))))
    copy_model, copy_optimizer, copy_blocks = duplicate
    # A block reaches its optimizer only through the context it was handed: the copy's refer to the copy.
    assert all(block._context.reduction.__self__ is copy_optimizer for block in copy_optimizer.constraints.values())
    assert all(block._context.reduction.__self__ is optimizer for block in optimizer.constraints.values())
    assert copy_optimizer.constraints["rows"] is copy_blocks[1]
    assert_same(snapshot(copy_optimizer), snapshot(optimizer))
    train(model, optimizer, blocks, range(2, 5))
    original = snapshot(optimizer)
    train(copy_model, copy_optimizer, copy_blocks, range(2, 5))
    assert_same(snapshot(copy_optimizer), original)
    assert_same(snapshot(optimizer), original)  # stepping the copy left the original alone
    assert (copy_blocks[2].multipliers != 0).any()  # the dual-first block stepped through the copy


def test_torch_optim_state_dict_still_loads(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    theirs = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    theirs.step()
    ours = LagrangianAdam(model.parameters(), lr=1e-2, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    assert_same(ours.state_dict()["state"], theirs.state_dict()["state"])
