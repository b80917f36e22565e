"""The fused grouped forward op (native backend) against its specification, the torch path of formulation.py.

Same term, gradient w.r.t. the values, recorded ids and fp32 dual violations, error codes and eager
errors, over random grouped Lagrangian calls: K above and below the batch, (B, M) memberships,
to_overall, one bound per group, senses, every value dtype, int32 and int64 ids.  Recorded entries are
compared as the step reads them: the torch path keeps (B, M) padding as entries of id -1 (a static
shape), which the step ignores; the fused op drops it.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Optional

import pytest
import torch

from fused_lagrangian import ConstraintInputError
from fused_lagrangian.backends import native
from fused_lagrangian.contract import PADDING_ID
from fused_lagrangian.formulation import LOCAL, Formulation

pytestmark = pytest.mark.skipif(not native.has_grouped_forward("cpu"), reason="native grouped forward not built")

TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-5),
              torch.float16: dict(rtol=2e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-5, atol=1e-5)}


def _formulation(k: int, sense: str, to_overall: bool, bound, nonfinite: str = "raise") -> Formulation:
    return Formulation("parity", "grouped", k, sense, "lagrangian", 1.0, to_overall, nonfinite, bound,
                       torch.device("cpu"))


def _torch_path(formulation, values, ids, dual_values, multipliers, deferred):
    values = values.detach().requires_grad_()
    measured = formulation.measure(values, ids, dual_values, LOCAL, deferred)
    term = formulation.term(measured, multipliers, LOCAL, uses_triton=False)
    (gradient,) = torch.autograd.grad(term, values)
    return term.detach(), gradient, measured.recording


def _fused_path(formulation, values, ids, dual_values, multipliers, deferred):
    values = values.detach().requires_grad_()
    recording, term = formulation.fused_forward(values, ids, dual_values, multipliers, deferred)
    (gradient,) = torch.autograd.grad(term, values)
    return term.detach(), gradient, recording


def _entries(recording) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded (ids, violations) the step uses: padding dropped."""
    samples = recording.ids != PADDING_ID
    return recording.ids[samples], recording.violations[samples]


def _random_ids(generator, batch: int, k: int, per_sample: Optional[int], id_dtype) -> torch.Tensor:
    if per_sample is None:
        return torch.randint(0, k, (batch,), generator=generator).to(id_dtype)
    ids = torch.randint(0, k, (batch, per_sample), generator=generator)
    padding = torch.rand(batch, per_sample, generator=generator) < 0.3
    return ids.masked_fill(padding, -1).to(id_dtype)


CASES = list(itertools.product(
    [(64, 5), (64, 10_000), (7, 3), (20_000, 50)],  # (batch, K): K < B, K > B, tiny, a large batch
    [None, 3],  # 1-D ids, or (B, M) memberships padded with -1
    ["<=", ">=", "=="],
    [False, True],  # to_overall
    [False, True],  # bound per group
    [False, True],  # dual_values
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
))


@pytest.mark.parametrize("shape, per_sample, sense, to_overall, per_group_bound, with_dual, dtype", CASES)
def test_fused_forward_equals_torch_path(shape, per_sample, sense, to_overall, per_group_bound, with_dual, dtype):
    batch, k = shape
    generator = torch.Generator().manual_seed(zlib.crc32(repr((shape, per_sample, sense, to_overall, per_group_bound)).encode()))
    bound = torch.rand(k, generator=generator) * 0.2 if per_group_bound else 0.05
    multipliers = torch.rand(k, generator=generator)
    values = torch.randn(batch, generator=generator).to(dtype)
    dual_values = (values.detach() > 0).to(dtype) if with_dual else None
    id_dtype = torch.int32 if batch % 2 else torch.int64
    ids = _random_ids(generator, batch, k, per_sample, id_dtype)
    for deferred in (False, True):
        formulation = _formulation(k, sense, to_overall, bound)
        expected = _torch_path(formulation, values, ids, dual_values, multipliers, deferred)
        got = _fused_path(formulation, values, ids, dual_values, multipliers, deferred)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        tolerance = TOLERANCES[dtype]
        assert got[0].dtype == expected[0].dtype == compute
        torch.testing.assert_close(got[0], expected[0], **tolerance)
        assert got[1].dtype == expected[1].dtype == dtype
        torch.testing.assert_close(got[1].double(), expected[1].double(),
                                   **(tolerance if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-3)))
        (got_ids, got_violations), (expected_ids, expected_violations) = _entries(got[2]), _entries(expected[2])
        assert torch.equal(got_ids, expected_ids) and got[2].ids.dtype == torch.int64
        assert got[2].violations.dtype == torch.float32
        torch.testing.assert_close(got_violations, expected_violations, rtol=1e-6, atol=1e-6)
        assert (got[2].error is None) == (expected[2].error is None) == (not deferred)
        if deferred:
            assert int(got[2].error) == int(expected[2].error) == 0


@pytest.mark.parametrize("per_sample", [None, 2])
@pytest.mark.parametrize("bad", ["id_high", "id_low", "nan", "dual_inf", "both"])
def test_fused_forward_error_codes_and_eager_errors_equal_torch_path(per_sample, bad):
    batch, k = 16, 40
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(batch, generator=generator)
    dual_values = torch.rand(batch, generator=generator)
    ids = _random_ids(generator, batch, k, per_sample, torch.int64)
    if bad in ("id_high", "both"):
        ids.view(-1)[5] = k
    if bad == "id_low":
        ids.view(-1)[3] = -2
    if bad in ("nan", "both"):
        values[4] = float("nan")
    if bad == "dual_inf":
        dual_values[2] = float("inf")
    multipliers = torch.rand(k, generator=generator)
    formulation = _formulation(k, "<=", True, torch.rand(k, generator=generator))
    expected = formulation.measure(values, ids, dual_values, LOCAL, True).recording
    got, _ = formulation.fused_forward(values, ids, dual_values, multipliers, True)
    assert int(got.error) == int(expected.error) != 0
    assert torch.equal(_entries(got)[0], _entries(expected)[0])
    messages = []
    for run in (lambda: formulation.measure(values, ids, dual_values, LOCAL, False),
                lambda: formulation.fused_forward(values, ids, dual_values, multipliers, False)):
        with pytest.raises(ConstraintInputError) as raised:
            run()
        messages.append(str(raised.value))
    assert messages[0] == messages[1] and "'parity'" in messages[0]
    skipping = _formulation(k, "<=", True, 0.0, nonfinite="skip")
    if bad in ("nan", "dual_inf"):
        assert skipping.measure(values, ids, dual_values, LOCAL, False) is None
        assert skipping.fused_forward(values, ids, dual_values, multipliers, False) is None


def test_optimizer_uses_fused_forward_on_native_cpu():
    from fused_lagrangian import LagrangianSGD

    model = torch.nn.Linear(3, 1)
    optimizer = LagrangianSGD(model.parameters(), lr=0.1, backend="native")
    block = optimizer.add_constraint("parity", kind="grouped", num_constraints=1_000_000, bound=0.0)
    calls = []
    original = block._formulation.fused_forward
    block._formulation.fused_forward = lambda *args: calls.append(1) or original(*args)
    term = block(model(torch.randn(8, 3)).squeeze(1), ids=torch.randint(0, 1_000_000, (8,)))
    term.backward()
    optimizer.step()
    assert calls and model.weight.grad is not None


@pytest.mark.parametrize("per_sample", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("per_group_bound", [False, True])
def test_eager_binding_equals_registered_op(per_sample, dtype, per_group_bound):
    """Eager CPU calls take the extension's direct binding; it returns exactly what the registered op does."""
    from fused_lagrangian.ops import grouped_forward as module

    generator = torch.Generator().manual_seed(7)
    batch, k = 50, 6
    values = torch.randn(batch, generator=generator).to(dtype)
    ids = _random_ids(generator, batch, k, per_sample, torch.int64)
    multipliers = torch.rand(k, generator=generator)
    bounds = torch.rand(k, generator=generator) if per_group_bound else None
    results = []
    for call in (module.grouped_forward, torch.ops.fused_lagrangian.grouped_lagrangian_forward):
        leaf = values.detach().requires_grad_()
        outputs = call(leaf, ids, (values > 0).to(dtype), multipliers, bounds, 0.05, -1.0, True)
        (gradient,) = torch.autograd.grad(outputs[0], leaf)
        results.append([*(output.detach() for output in outputs), gradient])
    assert module._eager_cpu is not None  # the backend handed the binding over: not the op's path taken twice
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_torch_func_grad_takes_the_registered_op():
    """Under torch.func the values wrap others: the call takes the op's dispatch, and the gradient is the eager one."""
    from fused_lagrangian.ops.grouped_forward import grouped_forward

    generator = torch.Generator().manual_seed(11)
    values = torch.randn(20, generator=generator)
    ids = torch.randint(0, 4, (20,), generator=generator)
    multipliers = torch.rand(4, generator=generator)

    def term(v):
        return grouped_forward(v, ids, None, multipliers, None, 0.05, 1.0, True)[0]

    leaf = values.clone().requires_grad_()
    (expected,) = torch.autograd.grad(term(leaf), leaf)
    assert torch.equal(torch.func.grad(term)(values), expected)
