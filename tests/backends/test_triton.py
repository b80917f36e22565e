"""The triton backend against the reference backend, under the Triton interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before the kernels are defined (triton.jit reads it), so it is set
here, at import.  The interpreter runs programs one after another, so every test keeps its tensors
to a few programs; a fixture also reruns the dual tests with HELPER_CHUNK_LIMIT=1, which spreads the
finalisation over the three kinds of finaliser that a GPU interleaves (see triton_kernels.py).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD, backends  # noqa: E402
from fused_lagrangian.backends import reference, triton_backend  # noqa: E402
from fused_lagrangian.backends import triton_kernels  # noqa: E402
from fused_lagrangian.contract import Algorithm, DualFlag, PrimalFlag  # noqa: E402
from fused_lagrangian.ops.lagrangian_term import lagrangian_term  # noqa: E402
from fused_lagrangian.ops.lagrangian_term_triton import lagrangian_term_triton  # noqa: E402
from fused_lagrangian.testing import conformance  # noqa: E402
from fused_lagrangian.testing.conformance import (MUTATED, contract_call, constraint_block, dual_args,  # noqa: E402
                                                   primal_args)

# Triton's own library functions (tl.zeros, ...) are jit functions too, defined when triton is first imported:
# a module that imported triton earlier in this process (torch.compile does) leaves them compiled-mode, and the
# interpreter then refuses to call them from our kernels.  Run this module before such modules, or alone.
import triton.language  # noqa: E402

if any(type(function).__name__ != "InterpretedFunction"
       for function in (triton_kernels.fused_step_kernel, triton.language.zeros)):
    pytest.skip("triton or the kernels were imported before TRITON_INTERPRET=1 was set (e.g. by torch.compile in "
                "an earlier test module): run tests/backends/test_triton.py first or alone", allow_module_level=True)

# fp32 within 1e-6 absolute; half precision within one rounding of the storage dtype: stricter than the
# conformance suite's default, which allows for native's vectorised sqrt.
ONE_ROUNDING = {torch.float32: dict(rtol=0.0, atol=1e-6),
                torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6),
                torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=1e-6)}
# The conformance cases under the interpreter: sizes around a primal program (4096) instead of the native
# kernel's 32768-element chunks, and fewer steps, to keep the interpreter's time down.
CONFORMANCE_SIZES = (0, 1, 7, 17, 1000, 4097)
CONFORMANCE_STEPS = 3


def run_both(args: list, steps: int = 1):
    return conformance.run_both(triton_backend.fused_step, args, steps)


def assert_same(actual: list, expected: list, actual_stats, expected_stats) -> None:
    conformance.assert_same_results(actual, expected, actual_stats, expected_stats, ONE_ROUNDING)


@pytest.fixture(params=["last-sample-program", "shared"])
def finaliser(request, monkeypatch):
    """"shared": each helper finalises one chunk, so primal programs and the last program get some too."""
    if request.param == "shared":
        monkeypatch.setattr(triton_backend, "HELPER_CHUNK_LIMIT", 1)
    return request.param


# --------------------------------------------------------------------------------------------------
# The conformance suite, then Triton's own cases


@pytest.mark.parametrize("dtype", conformance.DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(conformance.CASES)))
def test_conformance_cases(case, dtype):
    conformance.compare_with_reference(triton_backend.fused_step, case, dtype, steps=CONFORMANCE_STEPS,
                                       sizes=CONFORMANCE_SIZES)


def test_conformance_found_inf_and_grad_scale():
    conformance.check_found_inf_and_grad_scale(triton_backend.fused_step, sizes=CONFORMANCE_SIZES)


@pytest.mark.parametrize("flags, weight_decay", [
    (0, 0.0),
    (PrimalFlag.AMSGRAD, 0.0),
    (PrimalFlag.MAXIMIZE, 0.1),  # coupled weight decay (Adam)
    (PrimalFlag.DECOUPLED_WEIGHT_DECAY, 0.1),  # AdamW
    (PrimalFlag.AMSGRAD | PrimalFlag.MAXIMIZE | PrimalFlag.DECOUPLED_WEIGHT_DECAY, 0.05),
])
def test_adam_matches_reference(flags, weight_decay):
    gen = torch.Generator().manual_seed(1)
    hparams = [3e-2, 0.8, 0.99, 1e-6, weight_decay]
    primal = primal_args(gen, Algorithm.ADAM, hparams=hparams, flags=flags)
    dual = dual_args([constraint_block(gen, 40, 300, DualFlag.MEAN)])
    assert_same(*run_both(contract_call(primal, Algorithm.ADAM, dual), steps=2))


@pytest.mark.parametrize("hparams, flags", [
    ([0.1, 0.0, 0.0, 0.0, 0.0], 0),  # plain SGD: the momentum buffers are empty tensors
    ([0.1, 0.9, 0.2, 0.0, 0.01], 0),  # momentum with dampening and weight decay
    ([0.1, 0.9, 0.0, 0.0, 0.0], PrimalFlag.NESTEROV | PrimalFlag.MAXIMIZE),
    ([0.1, 0.9, 0.1, 0.0, 0.0], PrimalFlag.FIRST_MOMENTUM_STEP),  # buffer seeded with the gradient
])
def test_sgd_matches_reference(hparams, flags):
    gen = torch.Generator().manual_seed(2)
    primal = primal_args(gen, Algorithm.SGD, hparams=hparams, flags=flags)
    assert_same(*run_both(contract_call(primal, Algorithm.SGD, dual_args([])), steps=1))


def test_half_precision_and_fp32_parameters_in_one_call():
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.bfloat16, torch.float32, torch.float16]
    primal = primal_args(gen, Algorithm.ADAM, dtypes=dtypes, flags=PrimalFlag.AMSGRAD,
                         hparams=[1e-2, 0.9, 0.999, 1e-8, 0.1])
    args, expected, stats, expected_stats = run_both(contract_call(primal, Algorithm.ADAM, dual_args([])),
                                                     steps=2)
    assert_same(args, expected, stats, expected_stats)
    assert args[0][0].dtype == torch.bfloat16 and args[0][2].dtype == torch.float16


def test_bf16_results_are_rounded_to_nearest_even():
    """Exact match where the reference rounds each result to bf16: no truncation anywhere."""
    gen = torch.Generator().manual_seed(4)
    primal = primal_args(gen, Algorithm.SGD, sizes=(3000,), dtypes=[torch.bfloat16], hparams=[0.1, 0.9, 0.0, 0, 0])
    args, expected, _, _ = run_both(contract_call(primal, Algorithm.SGD, dual_args([])))
    assert torch.equal(args[2][0], expected[2][0])  # momentum buffer: one fp32 multiply-add, then rounding


def test_writes_stay_inside_tensors_and_unaligned_views_work():
    """Parameters as views into guarded buffers, at offsets that break 16-byte alignment."""
    gen = torch.Generator().manual_seed(5)
    primal = primal_args(gen, Algorithm.ADAM, sizes=(1025, 3))
    guarded = []
    for index in (0, 1, 2, 3):
        for i, tensor in enumerate(primal[index]):
            buffer = torch.randn(tensor.numel() + 64, generator=gen)
            buffer[1:1 + tensor.numel()] = tensor
            primal[index][i] = buffer[1:1 + tensor.numel()]
            guarded.append((buffer, buffer.clone(), tensor.numel()))
    args, expected, stats, expected_stats = run_both(contract_call(primal, Algorithm.ADAM, dual_args([])))
    assert_same(args, expected, stats, expected_stats)
    for buffer, original, n in guarded:
        assert buffer[0] == original[0] and torch.equal(buffer[1 + n:], original[1 + n:])


def test_grad_scale_divides_the_gradients():
    gen = torch.Generator().manual_seed(6)
    primal = primal_args(gen, Algorithm.ADAM)
    dual = dual_args([constraint_block(gen, 30, 100)])
    assert_same(*run_both(contract_call(primal, Algorithm.ADAM, dual, grad_scale=torch.tensor([1024.0]),
                               found_inf=torch.tensor([0.0]))))


def test_found_inf_skips_everything():
    gen = torch.Generator().manual_seed(7)
    primal = primal_args(gen, Algorithm.ADAM, flags=PrimalFlag.AMSGRAD)
    dual = dual_args([constraint_block(gen, 30, 100, DualFlag.NUPI), constraint_block(gen, 5, 7)])
    args = contract_call(primal, Algorithm.ADAM, dual, grad_scale=torch.tensor([8.0]),
                         found_inf=torch.tensor([1.0]))
    before = copy.deepcopy(args)
    stats = triton_backend.fused_step(*args)
    assert torch.equal(stats, torch.zeros(2, 3))
    for index in MUTATED:
        for a, b in zip(args[index], before[index]):
            assert torch.equal(a, b)
    # The skipped call left the workspace clean: the next call matches the reference.
    args[-1] = torch.tensor([0.0])
    assert_same(*run_both(args))


# --------------------------------------------------------------------------------------------------
# Dual updates


@pytest.mark.parametrize("rule", range(len(conformance.DUAL_RULES)))
def test_dual_rules_match_reference(rule, finaliser):
    # 2500 samples over 60 ids: three sample programs, heavy duplication within and across programs.
    assert_same(*run_both(conformance.dual_rule_call(rule), steps=2))


def test_several_blocks_with_empty_and_untouched_ones(finaliser):
    conformance.check_several_blocks(triton_backend.fused_step, ONE_ROUNDING)


def test_dual_only_call(finaliser):
    """The dual-first ordering calls the backend with no parameter tensors."""
    assert_same(*run_both(conformance.dual_only_call(), steps=3))


def test_accumulator_slots_are_clean_after_each_step():
    gen = torch.Generator().manual_seed(11)
    dual = dual_args([constraint_block(gen, 64, 1000), constraint_block(gen, 10, 50, DualFlag.MEAN)])
    triton_backend.fused_step(*contract_call(primal_args(gen, Algorithm.ADAM, sizes=(10,)), Algorithm.ADAM, dual))
    workspace = triton_backend._workspaces[(torch.device("cpu"), 0)]
    assert not workspace.accumulators.any() and not workspace.tickets.any()


# --------------------------------------------------------------------------------------------------
# One launch per step, cached tables


class _LaunchCounter:
    def __init__(self, monkeypatch):
        self.count = 0
        kernel_type = type(triton_kernels.fused_step_kernel)
        original = kernel_type.run

        def counting_run(kernel, *args, **kwargs):
            self.count += 1
            return original(kernel, *args, **kwargs)

        monkeypatch.setattr(kernel_type, "run", counting_run)


def _model_and_blocks(optimizer_class, **options):
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = optimizer_class(model.parameters(), lr=1e-2, backend="triton", **options)
    per_sample = optimizer.add_constraint("per_sample", kind="indexed", num_constraints=300, bound=0.1,
                                          dual_lr=0.05)
    groups = optimizer.add_constraint("groups", kind="grouped", num_constraints=4, bound=0.2, dual_lr=0.05,
                                      dual_rule="nupi", kp=1.0)
    return model, optimizer, per_sample, groups


def _training_step(model, optimizer, per_sample, groups, gen):
    x = torch.randn(64, 8, generator=gen)
    ids = torch.randint(0, 300, (64,), generator=gen)
    losses = model(x).squeeze(1) ** 2
    loss = losses.mean() + per_sample(losses, ids=ids) + groups(losses, ids=ids % 4)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("optimizer_class, options", [(LagrangianAdam, {"amsgrad": True}),
                                                      (LagrangianSGD, {"momentum": 0.9})])
def test_one_kernel_launch_per_step(optimizer_class, options, monkeypatch):
    model, optimizer, per_sample, groups = _model_and_blocks(optimizer_class, **options)
    counter = _LaunchCounter(monkeypatch)
    gen = torch.Generator().manual_seed(13)
    for step in range(1, 4):
        _training_step(model, optimizer, per_sample, groups, gen)
        assert counter.count == step


def test_autograd_sees_the_in_place_update():
    """Like torch.optim's in-place ops, the step bumps version counters: stale saved tensors raise."""
    torch.manual_seed(20)
    weight = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = LagrangianSGD([weight], lr=0.1, backend="triton")
    weight.grad = torch.ones(3, 3)
    saved_for_backward = (weight * weight).sum()
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_for_backward.backward()


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_steady_state_call_builds_nothing(monkeypatch):
    """Same tensors again: no table is rebuilt or copied; the host's only tensor op allocates the stats."""
    gen = torch.Generator().manual_seed(14)
    args = contract_call(primal_args(gen, Algorithm.ADAM), Algorithm.ADAM,
                         dual_args([constraint_block(gen, 20, 50)]))
    triton_backend.fused_step(*args)
    launches = []
    # The interpreter's own handling of kernel arguments is not the host code under test.
    monkeypatch.setattr(type(triton_kernels.fused_step_kernel), "run", lambda *a, **k: launches.append(1))
    with _AtenOps() as recorded:
        triton_backend._launch(*args)  # the custom op's body (the op would hide its inner ops from the mode)
    assert recorded.ops == ["aten.empty.memory_format"] and launches == [1]


# --------------------------------------------------------------------------------------------------
# End to end, registry, torch.library


@pytest.mark.parametrize("ours, theirs, options", [
    (LagrangianAdam, torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.01}),
    (LagrangianAdamW, torch.optim.AdamW, {"weight_decay": 0.1}),
])
def test_matches_torch_optim_without_constraints(ours, theirs, options):
    torch.manual_seed(15)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    twin = copy.deepcopy(model)
    optimizer = ours(model.parameters(), lr=1e-2, backend="triton", **options)
    torch_optimizer = theirs(twin.parameters(), lr=1e-2, **options)
    gen = torch.Generator().manual_seed(16)
    for _ in range(4):
        x = torch.randn(16, 6, generator=gen)
        for net, opt in ((model, optimizer), (twin, torch_optimizer)):
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[p][key], torch_optimizer.state[q][key], atol=1e-6, rtol=0)
        assert optimizer.state[p]["step"] == torch_optimizer.state[q]["step"] == 4


def test_lagrangian_adam_with_constraints_matches_reference_backend():
    runs = {}
    for backend in ("triton", "reference"):
        model, optimizer, per_sample, groups = _model_and_blocks(LagrangianAdam)
        optimizer.backend = backend
        gen = torch.Generator().manual_seed(17)
        for _ in range(3):
            _training_step(model, optimizer, per_sample, groups, gen)
        runs[backend] = (list(model.parameters()), per_sample.multipliers, groups.multipliers, groups.dual_state,
                         optimizer.report())
    for a, e in zip(runs["triton"][:4], runs["reference"][:4]):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)
    for name, report in runs["triton"][4].items():
        assert report == pytest.approx(runs["reference"][4][name], abs=1e-6)


def test_registry_availability(monkeypatch):
    assert backends.unavailable_reason("triton", "cpu") is None
    assert backends.resolve("triton", torch.device("cpu")) == "triton"
    assert backends.resolve("auto", torch.device("cpu")) != "triton"  # CPU "auto" never picks the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in backends.unavailable_reason("triton", "cpu")
    assert backends.unavailable_reason("triton", "cuda") is None
    assert "CUDA" in backends.unavailable_reason("triton", "mps")


def test_fused_step_op_compiles_into_one_graph():
    """The custom op is opaque to torch.compile: one graph, no break, same results."""
    gen = torch.Generator().manual_seed(18)
    # contract_call passes the hyperparameters as contract.py's tensors, which the raw op takes.
    args = contract_call(primal_args(gen, Algorithm.ADAM, sizes=(50,)), Algorithm.ADAM,
                         dual_args([constraint_block(gen, 9, 30)]))
    expected = copy.deepcopy(args)
    compiled = torch.compile(lambda *a: torch.ops.fused_lagrangian.fused_step_triton(*a) * 1.0, backend="aot_eager",
                             fullgraph=True)
    stats = compiled(*args)
    expected_stats = reference.fused_step(*expected)
    assert_same(args, expected, stats, expected_stats)


# --------------------------------------------------------------------------------------------------
# The Lagrangian term


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_lagrangian_term_matches_reference(dtype, weighted):
    gen = torch.Generator().manual_seed(19)
    violations = torch.randn(2500, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(0, 300, (2500,), generator=gen)
    multipliers = torch.rand(300, generator=gen)
    weights = torch.rand(2500, generator=gen).to(dtype) if weighted else None
    term = lagrangian_term_triton(violations, ids, multipliers, weights)
    (grad,) = torch.autograd.grad(3 * term, violations)
    expected_term = lagrangian_term(violations, ids, multipliers, weights)
    (expected_grad,) = torch.autograd.grad(3 * expected_term, violations)
    assert term.dtype == dtype
    # Sums in a different order: relative to the sum of magnitudes.  Gradients: exact.
    scale = float((multipliers[ids] * violations.detach().abs().double()).sum())
    assert abs(float(term) - float(expected_term)) <= 1e-6 * scale + float(torch.finfo(dtype).eps) * abs(
        float(expected_term))
    assert torch.equal(grad, expected_grad)


def test_lagrangian_term_of_no_samples_is_zero():
    term = lagrangian_term_triton(torch.zeros(0, requires_grad=True), torch.zeros(0, dtype=torch.int64),
                                  torch.ones(3))
    assert float(term) == 0.0


# --------------------------------------------------------------------------------------------------
# What only the compiler sees


_COMPILE_CHECK = textwrap.dedent("""
    import os, torch, triton
    assert "TRITON_INTERPRET" not in os.environ
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_lagrangian.backends import triton_backend, triton_kernels as k
    from fused_lagrangian.contract import hparams_tensor
    from fused_lagrangian.ops import lagrangian_term_triton as term
    from fused_lagrangian.ops.lagrangian_term_triton import lagrangian_term_triton
    from torch.fx.experimental.proxy_tensor import make_fx

    # 1. The kernels compile for an H100/H200 (sm_90): the interpreter accepts code that the
    #    compiler rejects (non-constexpr globals, types that change across branches).  One variant
    #    (Adam, bf16 parameters, every option on) keeps the compile time down.
    def compile_for_sm90(kernel, types, constants, num_warps):
        aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*")}
        source = ASTSource(fn=kernel, signature=dict(zip(kernel.arg_names, types)), constexprs=constants,
                           attrs=aligned)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

    ptx = compile_for_sm90(
        k.fused_step_kernel,
        ["*i64", "*i32", "*fp64", "i32", "i32", "*i64", "*i32", "*fp64", "i32", "i32",
         "*i32", "*i32", "*fp32", "*fp32", "*fp32", "*i32"],
        dict(ALGORITHM=1, DTYPES=2, ALIGNED=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_BLOCKS=True,
             COUNT_STEPS=True, PRIMAL_BLOCK=triton_backend.PRIMAL_BLOCK, PRIMAL_TILES=triton_backend.PRIMAL_TILES,
             SAMPLE_BLOCK=triton_backend.SAMPLE_BLOCK, FINAL_BLOCK=triton_backend.FINAL_BLOCK,
             HELPER_CHUNK_LIMIT=0),
        triton_backend.NUM_WARPS).asm["ptx"]
    assert "ld.global.v4" in ptx, "full tiles should use 16-byte vector loads"
    assert "atom.global.gpu.acq_rel.add" in ptx, "tickets are acquire-release atomics"
    compile_for_sm90(term._forward_kernel, ["*bf16", "*i64", "*fp32", "*bf16", "*bf16", "*fp32", "i32"],
                     dict(HAS_WEIGHTS=True, ACCUMULATE=triton.language.float32, BLOCK=term.BLOCK), 4)
    compile_for_sm90(term._backward_kernel, ["*bf16", "*bf16", "*bf16", "i32"],
                     dict(ACCUMULATE=triton.language.float32, BLOCK=term.BLOCK), 4)

    # 2. torch.compile traces both ops as graph nodes (fake tensors: nothing is launched).
    def step(p, g, m, v, s, lam, ids, e):
        return torch.ops.fused_lagrangian.fused_step_triton(
            [p], [g], [m], [v], [torch.empty(0)], [s], hparams_tensor([1e-3, 0.9, 0.999, 1e-8, 0.0]), [0], 1,
            [lam], [torch.empty(0)], [ids], [e], hparams_tensor([0.1, 0, 1, 0, 0, 0, float("inf"), 0]), [0], None, None)
    graph = make_fx(step, tracing_mode="fake")(torch.randn(8), torch.randn(8), torch.zeros(8), torch.zeros(8),
                                               torch.zeros(()), torch.zeros(4), torch.zeros(3, dtype=torch.long),
                                               torch.randn(3))
    assert "fused_step_triton" in graph.code
    graph = make_fx(lambda v, i, l: lagrangian_term_triton(v, i, l), tracing_mode="fake")(
        torch.randn(8), torch.zeros(8, dtype=torch.long), torch.rand(4))
    assert "lagrangian_term_forward" in graph.code
    print("ok")
""")


def test_kernel_compiles_for_sm90_and_ops_trace():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
