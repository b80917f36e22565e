"""The native CPU kernel against its oracles: the reference backend (the spec) and torch.optim.

Random problems cover tensor sizes around the vector width and the chunk size, empty tensors and
blocks, duplicate ids and ids at 0 and K-1, every dual flag, equality blocks and caps, fp32 / bf16 /
fp16 parameters, and every SGD / Adam option.  Tolerances: fp32 results agree to 1e-6 (the kernel does
the reference's operations in the reference's order; what remains is torch's own sqrt, which is not
correctly rounded on CPU, 1 ulp on ~1% of elements).  bf16 / fp16 state is rounded to 8 / 11 bits at
every step, so a 1-ulp difference upstream can flip a rounding: we allow 2 ulps of the dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD, backends
from fused_lagrangian.contract import DUAL_HPARAMS, Algorithm, DualFlag, PrimalFlag, dual_state_rows, hparams_tensor

NATIVE_REASON = backends.unavailable_reason("native", "cpu")
pytestmark = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native backend: {NATIVE_REASON}")
# The same properties run on a GPU when there is one and the extension has its CUDA kernel
# (bench/gpu_check.py runs them there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and backends.unavailable_reason("native", "cuda") is None
                     else [])

# Sizes straddling vector widths (4, 8, 16 floats) and the kernel's 32768-element chunks.
SIZES = [0, 1, 7, 16, 17, 33, 255, 1000, 32768 + 5]
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6),
             torch.bfloat16: dict(rtol=2 * 2**-8, atol=1e-5),
             torch.float16: dict(rtol=2 * 2**-11, atol=1e-5)}


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: on a busy machine torch's OpenMP regions spin far longer than they compute.
    The kernel runs single-threaded below 65536 elements anyway; test_threads_do_not_change_results
    covers its parallel path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def native_step():
    return backends.fused_step_of("native")


def reference_step():
    return backends.fused_step_of("reference")


@dataclasses.dataclass
class Problem:
    """fused_step's arguments (contract order) plus how to draw each step's gradients and violations."""

    args: list
    num_constraints: list[int]
    batches: list[int]
    generator: torch.Generator
    device: str

    @property
    def params(self): return self.args[0]
    @property
    def grads(self): return self.args[1]
    @property
    def multipliers(self): return self.args[9]
    @property
    def dual_states(self): return self.args[10]

    def new_batch(self) -> None:
        """Fresh gradients and pending samples, ids at 0 and K-1 and duplicates included."""
        g = self.generator
        for grad in self.grads:
            grad.copy_(torch.randn(grad.shape, generator=g))
        ids, violations = [], []
        for k, batch in zip(self.num_constraints, self.batches):
            block_ids = torch.randint(0, k, (batch,), generator=g)
            if batch >= 4:
                block_ids[:4] = torch.tensor([0, k - 1, 0, k - 1])
            ids.append(block_ids.to(self.device))
            violations.append(torch.randn(batch, generator=g).to(self.device))
        self.args[11], self.args[12] = ids, violations


def random_problem(seed: int, algorithm: Algorithm, dtype: torch.dtype, primal_flags: int = 0,
                   hparams: tuple = (), num_blocks: int = 3, sizes: list[int] = SIZES, device: str = "cpu") -> Problem:
    """Drawn on the CPU (the same problem whatever the device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    shapes = [(n,) for n in sizes] + [(3, 5, 7)]
    params = [randn(*s) for s in shapes]
    grads = [torch.zeros_like(p) for p in params]
    adam = algorithm == Algorithm.ADAM
    empty = torch.empty(0, dtype=dtype)
    momentum = hparams[1] if hparams else 0.0
    if adam:
        exp_avgs = [randn(*p.shape) for p in params]
        exp_avg_sqs = [randn(*p.shape).abs() for p in params]
        max_exp_avg_sqs = [randn(*p.shape).abs() if primal_flags & PrimalFlag.AMSGRAD else empty for p in params]
        steps = [torch.tensor(float(torch.randint(0, 5, (), generator=g))) for _ in params]
    else:
        exp_avgs = [randn(*p.shape) if momentum else empty for p in params]
        exp_avg_sqs, max_exp_avg_sqs, steps = [], [], []
    primal_hparams = list(hparams) * len(params)

    num_constraints = [int(torch.randint(1, 300, (), generator=g)) for _ in range(num_blocks)]
    batches = [int(torch.randint(0, 400, (), generator=g)) for _ in range(num_blocks)]
    batches[0] = 0  # one block with nothing pending this step: untouched, zero statistics
    dual_hparams, dual_flags, multipliers, dual_states = [], [], [], []
    for j, k in enumerate(num_constraints):
        flags = DualFlag(int(torch.randint(0, 32, (), generator=g)))
        equality = j % 2 == 1
        upper = [math.inf, 0.7][j % 2 == 0 and j > 0]
        lower = -upper if equality else 0.0
        dual_hparams += [0.05 + j * 0.1, 0.7, 1.3, 0.4, [0.0, 0.01][j % 2], lower, upper, 0.9]
        dual_flags.append(int(flags))
        lam = torch.rand(k, generator=g) * (2 if equality else 1) - (1 if equality else 0)
        multipliers.append(lam)
        dual_states.append(random_dual_state(flags, k, g))
    moved = [[t.to(device) for t in tensors] for tensors in (params, grads, exp_avgs, exp_avg_sqs,
                                                             max_exp_avg_sqs, steps, multipliers, dual_states)]
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, multipliers, dual_states = moved
    args = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams_tensor(primal_hparams),
            [int(primal_flags)] * len(params), int(algorithm), multipliers, dual_states, None, None,
            hparams_tensor(dual_hparams),
            dual_flags, None, None]
    problem = Problem(args, num_constraints, batches, g, device)
    problem.new_batch()
    return problem


def random_dual_state(flags: DualFlag, k: int, g: torch.Generator) -> torch.Tensor:
    """contract.py's rows for ``flags``: xi ~ N(0, 1), running sums ~ N(0, 1), running counts in (0, 5)."""
    rows, sum_row = dual_state_rows(flags)
    state = torch.randn(rows, k, generator=g)
    if flags & DualFlag.RUNNING:
        state[sum_row + 1] = 5 * torch.rand(k, generator=g) + 1e-3
    return state if rows > 1 else state.flatten()


def tensors_of(problem: Problem) -> list[torch.Tensor]:
    args = problem.args
    return [t for i in (0, 2, 3, 4, 5, 9, 10) for t in args[i]]


def assert_same_state(native: Problem, reference: Problem) -> None:
    """Compares all tensors at once, one flat tensor per dtype (assert_close per tensor is slow)."""
    for dtype, tolerance in TOLERANCE.items():
        pairs = [(a, b) for a, b in zip(tensors_of(native), tensors_of(reference)) if a.dtype == dtype and a.numel()]
        if pairs:
            torch.testing.assert_close(torch.cat([a.flatten() for a, _ in pairs]),
                                       torch.cat([b.flatten() for _, b in pairs]), **tolerance)


ADAM_OPTIONS = [
    (0, (1e-2, 0.9, 0.999, 1e-8, 0.0)),
    (PrimalFlag.AMSGRAD, (1e-2, 0.9, 0.999, 1e-8, 0.0)),
    (PrimalFlag.MAXIMIZE, (3e-3, 0.8, 0.99, 1e-6, 0.1)),  # L2 weight decay
    (PrimalFlag.DECOUPLED_WEIGHT_DECAY | PrimalFlag.AMSGRAD, (1e-2, 0.9, 0.999, 1e-8, 0.05)),
    (0, (1e-2, 0.3, 0.9, 1e-8, 0.0)),  # 1 - beta1 >= 0.5: torch's other lerp form
]
SGD_OPTIONS = [
    (0, (0.1, 0.0, 0.0, 0.0, 0.0)),
    (PrimalFlag.MAXIMIZE, (0.1, 0.0, 0.0, 0.0, 0.01)),
    (PrimalFlag.FIRST_MOMENTUM_STEP, (0.05, 0.9, 0.1, 0.0, 0.01)),
    (PrimalFlag.NESTEROV, (0.05, 0.9, 0.0, 0.0, 0.0)),
    (0, (0.05, 0.5, 0.3, 0.0, 0.001)),
]
CASES = [(Algorithm.ADAM, flags, hp) for flags, hp in ADAM_OPTIONS] + [(Algorithm.SGD, f, hp) for f, hp in SGD_OPTIONS]


def compare_with_reference(candidate_step, case: int, dtype: torch.dtype, device: str = "cpu", steps: int = 20,
                           after_step=lambda: None):
    """Runs CASES[case] for ``steps`` steps with ``candidate_step`` (a fused_step) and with the reference,
    asserting after each step; ``after_step`` adds the caller's own checks."""
    algorithm, flags, hp = CASES[case]
    candidate = random_problem(case, algorithm, dtype, flags, hp, device=device)
    reference = copy.deepcopy(candidate)
    reference_step_fn = reference_step()
    for step in range(steps):
        if step == 1 and flags & PrimalFlag.FIRST_MOMENTUM_STEP:
            for problem in (candidate, reference):  # the momentum buffer is seeded only at the first step
                problem.args[7] = [int(flags & ~PrimalFlag.FIRST_MOMENTUM_STEP)] * len(problem.params)
        multipliers_before = [lam.clone() for lam in candidate.multipliers]
        states_before = [xi.clone() for xi in candidate.dual_states]
        stats = candidate_step(*candidate.args)
        reference_stats = reference_step_fn(*reference.args)
        torch.testing.assert_close(stats, reference_stats, rtol=1e-6, atol=1e-6)
        assert_same_state(candidate, reference)
        for j, ids in enumerate(candidate.args[11]):
            untouched = torch.ones(candidate.num_constraints[j], dtype=torch.bool, device=device)
            untouched[ids] = False
            assert torch.equal(candidate.multipliers[j][untouched], multipliers_before[j][untouched])
            if states_before[j].numel():
                k = candidate.num_constraints[j]
                assert torch.equal(candidate.dual_states[j].view(-1, k)[:, untouched],
                                   states_before[j].view(-1, k)[:, untouched])
        assert stats[0].eq(0).all(), "a block with no pending sample has zero statistics"
        after_step()
        candidate.new_batch()
        reference.new_batch()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_native_matches_reference_over_20_steps(case, dtype, device):
    compare_with_reference(native_step(), case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_everything_and_grad_scale_divides(device):
    problem = random_problem(0, Algorithm.ADAM, torch.float32, 0, ADAM_OPTIONS[0][1], device=device)
    before = [t.clone() for t in tensors_of(problem)]
    args = list(problem.args)
    args[15], args[16] = torch.tensor([1024.0], device=device), torch.tensor([1.0], device=device)
    stats = native_step()(*args)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(problem), before))
    assert stats.eq(0).all()

    # Scaling by a power of two is exact, so unscaling must give bitwise the unscaled step.
    scaled = copy.deepcopy(problem)
    for grad in scaled.grads:
        grad.mul_(1024.0)
    args = list(scaled.args)
    args[15], args[16] = torch.tensor([1024.0], device=device), torch.tensor([0.0], device=device)
    native_step()(*args)
    native_step()(*problem.args)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(scaled), tensors_of(problem)))


def test_threads_do_not_change_results():
    # Large enough for the kernel to split the work into chunks across threads.
    one = random_problem(3, Algorithm.ADAM, torch.float32, PrimalFlag.AMSGRAD, ADAM_OPTIONS[1][1],
                         sizes=SIZES + [300_001])
    two = copy.deepcopy(one)
    native_step()(*one.args)
    torch.set_num_threads(2)
    native_step()(*two.args)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(one), tensors_of(two)))


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
    problem = random_problem(5, Algorithm.ADAM, torch.float32, PrimalFlag.AMSGRAD, ADAM_OPTIONS[1][1])
    eager = copy.deepcopy(problem)
    op = torch.ops.fused_lagrangian.fused_step
    native_step()  # loads the library

    compiled = torch.compile(lambda *args: op(*args), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*problem.args), op(*eager.args), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(problem), tensors_of(eager)))
