"""The native kernel's own properties, and drop-in parity with torch.optim.

Its agreement with the reference backend over the conformance cases (every SGD / Adam option, dtypes,
dual flags, found_inf / grad_scale) is in test_conformance.py; here: the same cases on CUDA tensors
when there is a GPU, threads, large blocks, int32 ids and strides, bad input, torch.compile.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD, backends
from fused_lagrangian.contract import Algorithm, PrimalFlag
from fused_lagrangian.testing import conformance
from fused_lagrangian.testing.conformance import ADAM_OPTIONS, mutated_tensors

NATIVE_REASON = backends.unavailable_reason("native", "cpu")
pytestmark = [pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native backend: {NATIVE_REASON}"),
              pytest.mark.usefixtures("one_thread")]
# The same properties run on a GPU when there is one and the extension has its CUDA kernel
# (bench/gpu_check.py runs them there).
CUDA_DEVICES = ["cuda"] if torch.cuda.is_available() and backends.unavailable_reason("native", "cuda") is None else []
DEVICES = ["cpu"] + CUDA_DEVICES


def native_step():
    return backends.fused_step_of("native")


def reference_step():
    return backends.fused_step_of("reference")


# test_conformance.py runs the conformance cases on the CPU; these run them on a GPU.
@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", conformance.DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(conformance.CASES)))
def test_native_matches_reference_over_20_steps(case, dtype, device):
    conformance.compare_with_reference(native_step(), case, dtype, device)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_found_inf_skips_everything_and_grad_scale_divides(device):
    conformance.check_found_inf_and_grad_scale(native_step(), device)


def test_threads_do_not_change_results():
    # Large enough for the kernel to split the work into chunks across threads.
    one = conformance.random_problem(3, Algorithm.ADAM, torch.float32, PrimalFlag.AMSGRAD, ADAM_OPTIONS[1][1],
                                     sizes=conformance.SIZES + (300_001,))
    two = copy.deepcopy(one)
    native_step()(*one.args)
    torch.set_num_threads(2)
    native_step()(*two.args)
    assert all(torch.equal(a, b) for a, b in zip(mutated_tensors(one.args), mutated_tensors(two.args)))


@pytest.mark.parametrize("device", DEVICES)
def test_large_indexed_block_touches_only_its_batch(device):
    # 10^7 constraints: the step's reduction is sized by the batch, not by K (timing lives in bench/).
    k, batch = 10**7, 4096
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(k, generator=g).to(device)
    ids = torch.randint(0, k, (batch,), generator=g)
    ids[:3] = torch.tensor([0, k - 1, 0])
    ids = ids.to(device)
    violations = torch.randn(batch, generator=g).to(device)
    hp = [0.1, 0.0, 1.0, 0.0, 0.0, 0.0, math.inf, 0.0]
    expected = lam.clone()
    empty = torch.empty(0, device=device)
    reference_step()([], [], [], [], [], [], [], [], 1, [expected], [empty], [ids], [violations], hp, [0])
    native_step()([], [], [], [], [], [], [], [], 1, [lam], [empty], [ids], [violations], hp, [0])
    # Atomics on a GPU sum duplicates in any order: equal up to rounding there, bitwise on the CPU.
    torch.testing.assert_close(lam, expected, rtol=1e-6, atol=1e-6)
    if device == "cpu":
        assert torch.equal(lam, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_ids_and_channels_last_params(device):
    param = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    grad = torch.randn_like(param)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    lam = torch.zeros(10, device=device)
    ids = torch.tensor([1, 9, 1, 0], dtype=torch.int32, device=device)
    violations = torch.tensor([1.0, 2.0, 3.0, -1.0], device=device)
    empty, step = torch.empty(0, device=device), torch.tensor(0.0, device=device)
    hp = [1e-2, 0.9, 0.999, 1e-8, 0.0]
    expected = [t.clone() for t in (param, exp_avg, exp_avg_sq, lam)]
    reference_step()([expected[0]], [grad], [expected[1]], [expected[2]], [empty], [step.clone()], hp, [0], 1,
                     [expected[3]], [empty], [ids.long()], [violations], [0.1, 0, 1, 0, 0, 0, math.inf, 0], [0])
    native_step()([param], [grad], [exp_avg], [exp_avg_sq], [empty], [step], hp, [0], 1,
                  [lam], [empty], [ids], [violations], [0.1, 0, 1, 0, 0, 0, math.inf, 0], [0])
    for got, want in zip((param, exp_avg, exp_avg_sq, lam), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert lam.tolist()[:2] == pytest.approx([0.0, 0.4]) and lam[9].item() == pytest.approx(0.2)


def test_bad_input_raises_and_changes_nothing():
    param, grad = torch.randn(5), torch.randn(5)
    buffer = torch.zeros(5)
    lam = torch.zeros(4)
    before = (param.clone(), lam.clone())
    sgd = ([param], [grad], [buffer], [], [], [], [0.1, 0.9, 0.0, 0.0, 0.0], [16], 0)
    hp = [0.1, 0, 1, 0, 0, 0, math.inf, 0]
    with pytest.raises(RuntimeError, match=r"ids\[0\] has 1 id\(s\) outside \[0, 4\)"):
        native_step()(*sgd, [lam], [torch.empty(0)], [torch.tensor([0, 4])], [torch.ones(2)], hp, [0])
    with pytest.raises(RuntimeError, match="violations"):
        native_step()(*sgd, [lam], [torch.empty(0)], [torch.tensor([0, 1])], [torch.ones(3)], hp, [0])
    with pytest.raises(RuntimeError, match="grads"):
        native_step()([param], [grad.double()], [buffer], [], [], [], [0.1, 0.9, 0, 0, 0], [16], 0,
                      [], [], [], [], [], [])
    assert torch.equal(param, before[0]) and torch.equal(lam, before[1])


def test_auto_picks_native_on_cpu_and_reports_its_build():
    assert backends.resolve("auto", torch.device("cpu")) == "native"
    assert "cpu" in backends.build_status("native")


# --------------------------------------------------------------------------------------------------
# Drop-in parity with torch.optim through the optimizer classes (no constraint block).

def model_params(seed: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device) for shape in [(33, 17), (17,), (1000,), (4, 4, 3)]]


def assert_optimizer_parity(ours_cls, theirs_cls, steps: int, device: str = "cpu", **options) -> None:
    ours = [p.clone().requires_grad_() for p in model_params(0, device)]
    theirs = [p.clone().requires_grad_() for p in model_params(0, device)]
    ours_opt = ours_cls(ours, backend="native", **options)
    theirs_opt = theirs_cls(theirs, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g).to(device)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)])
def test_lagrangian_adam_equals_torch_adam_over_100_steps(options, device):
    assert_optimizer_parity(LagrangianAdam, torch.optim.Adam, 100, device, **options)


def test_lagrangian_adamw_equals_torch_adamw():
    assert_optimizer_parity(LagrangianAdamW, torch.optim.AdamW, 50, lr=1e-2, weight_decay=0.05, amsgrad=True)


@pytest.mark.parametrize("options", [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                                     dict(lr=0.05, momentum=0.5, dampening=0.2, maximize=True)])
def test_lagrangian_sgd_equals_torch_sgd(options):
    assert_optimizer_parity(LagrangianSGD, torch.optim.SGD, 50, **options)


def test_step_bumps_version_counters_like_torch_in_place_ops():
    param = torch.randn(4, requires_grad=True)
    loss = (param * param).sum()  # saves param for backward
    param.grad = torch.ones(4)
    LagrangianSGD([param], lr=0.1, backend="native").step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torch_compile_traces_the_op_with_its_mutations():
    problem = conformance.random_problem(5, Algorithm.ADAM, torch.float32, PrimalFlag.AMSGRAD, ADAM_OPTIONS[1][1])
    eager = copy.deepcopy(problem)
    op = torch.ops.fused_lagrangian.fused_step
    native_step()  # loads the library

    compiled = torch.compile(lambda *args: op(*args), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*problem.args), op(*eager.args), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(mutated_tensors(problem.args), mutated_tensors(eager.args)))
