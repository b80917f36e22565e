"""The backend conformance suite: every backend's ``fused_step`` against the reference's, case by case.

A backend conforms when, from the same seeded random problem, ``N`` calls of its ``fused_step`` leave the
same parameters, optimizer state, step counts, multipliers and dual state as the reference's, and return
the same statistics.  The tests run ``CASES`` for every CPU backend; ``bench/gpu_check.py`` runs them on
CUDA tensors.  Used like ``torch.testing``::

    from fused_lagrangian.testing import conformance
    for case in range(len(conformance.CASES)):
        conformance.compare_with_reference(my_fused_step, case, torch.float32, device="cuda")

Random problems cover tensor sizes around the vector width and the native kernel's chunk size, empty
tensors and blocks, duplicate ids and ids at 0 and K-1, random dual flags (``FLAGS_COVERED`` lists the
bits the cases reach), equality blocks and caps, fp32 / bf16 / fp16 parameters, and every SGD / Adam
option.  Tolerances: fp32 results agree to 1e-6 (a backend does the reference's operations in the
reference's order; what remains is torch's own sqrt, which is not correctly rounded on CPU, 1 ulp on ~1%
of elements).  bf16 / fp16 state is rounded to 8 / 11 bits at every step, so a 1-ulp difference upstream
can flip a rounding: 2 ulps of the dtype are allowed.  Constraints that no sample touched, and their
dual state, must stay bitwise unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..backends import fused_step_of
from ..contract import PADDING_ID, Algorithm, DualFlag, FusedStepArguments, PrimalFlag, dual_state_rows, hparams_tensor

# Sizes straddling vector widths (4, 8, 16 floats) and the native kernel's 32768-element chunks.
SIZES = (0, 1, 7, 16, 17, 33, 255, 1000, 32768 + 5)
# Per dtype: assert_close's rtol / atol, or ``ulps``: units in the last place of the expected value.
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6),
             torch.bfloat16: dict(ulps=2, atol=1e-5),
             torch.float16: dict(ulps=2, atol=1e-5)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# GPU kernels (and their CPU emulation, whose thread blocks run on std::threads) add a group's batch entries
# into its running sum with atomics, in another order than the reference's sum: n fp32 terms summed in
# another order differ by up to about n ulps of their partial sums, more than TOLERANCE allows (measured on
# the emulation: 1.9e-6 on running sums of about 0.5).
UNORDERED_SUM_TOLERANCE = {**TOLERANCE, torch.float32: dict(rtol=1e-6, atol=5e-6)}

# Positions of the arguments a call mutates, by their contract names.
_FIELDS = FusedStepArguments._fields
MUTATED = {_FIELDS.index(name): name for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps",
                                                  "multipliers", "dual_states")}
PRIMAL_FLAGS, ALGORITHM = _FIELDS.index("primal_flags"), _FIELDS.index("algorithm")
MULTIPLIERS, DUAL_STATES = _FIELDS.index("multipliers"), _FIELDS.index("dual_states")
IDS, VIOLATIONS = _FIELDS.index("ids"), _FIELDS.index("violations")
GRAD_SCALE, FOUND_INF = _FIELDS.index("grad_scale"), _FIELDS.index("found_inf")


@dataclasses.dataclass
class Problem:
    """fused_step's arguments (contract order) plus how to draw each step's gradients and violations."""

    args: list
    num_constraints: list[int]
    batches: list[int]
    generator: torch.Generator
    device: str

    @property
    def params(self) -> list[Tensor]:
        return self.args[0]

    @property
    def grads(self) -> list[Tensor]:
        return self.args[1]

    @property
    def multipliers(self) -> list[Tensor]:
        return self.args[MULTIPLIERS]

    @property
    def dual_states(self) -> list[Tensor]:
        return self.args[DUAL_STATES]

    def new_batch(self) -> None:
        """Fresh gradients and pending samples, ids at 0 and K-1, duplicates and padding included."""
        g = self.generator
        for grad in self.grads:
            grad.copy_(torch.randn(grad.shape, generator=g))
        ids, violations = [], []
        for k, batch in zip(self.num_constraints, self.batches):
            block_ids = torch.randint(0, k, (batch,), generator=g)
            if batch >= 4:
                block_ids[:4] = torch.tensor([0, k - 1, 0, k - 1])
            if batch >= 6:
                block_ids[4:6] = PADDING_ID
            ids.append(block_ids.to(self.device))
            violations.append(torch.randn(batch, generator=g).to(self.device))
        self.args[IDS], self.args[VIOLATIONS] = ids, violations


def random_problem(seed: int, algorithm: Algorithm, dtype: torch.dtype, primal_flags: int = 0,
                   hparams: tuple = (), num_blocks: int = 3, sizes: Sequence[int] = SIZES,
                   device: str = "cpu") -> Problem:
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
    args = list(FusedStepArguments(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hparams_tensor(primal_hparams),
        [int(primal_flags)] * len(params), int(algorithm), multipliers, dual_states, None, None,
        hparams_tensor(dual_hparams), dual_flags))
    problem = Problem(args, num_constraints, batches, g, device)
    problem.new_batch()
    return problem


def random_dual_state(flags: DualFlag, k: int, g: torch.Generator) -> Tensor:
    """contract.py's rows for ``flags``: xi ~ N(0, 1), running sums ~ N(0, 1), running counts in (0, 5)."""
    rows, sum_row = dual_state_rows(flags)
    state = torch.randn(rows, k, generator=g)
    if flags & DualFlag.RUNNING:
        state[sum_row + 1] = 5 * torch.rand(k, generator=g) + 1e-3
    return state if rows > 1 else state.flatten()


def mutated_tensors(args: Sequence) -> list[Tensor]:
    """Every tensor a ``fused_step`` call with these arguments may write, in a fixed order."""
    return [t for index in MUTATED for t in args[index]]


def assert_same_results(actual_args: Sequence, expected_args: Sequence, actual_stats: Tensor,
                        expected_stats: Tensor, tolerance: dict = TOLERANCE) -> None:
    """The tensors two calls wrote and their statistics agree within ``tolerance`` (per dtype).

    Compares all tensors at once, one flat tensor per dtype (assert_close per tensor is slow)."""
    actual, expected = mutated_tensors(actual_args), mutated_tensors(expected_args)
    assert [t.shape for t in actual] == [t.shape for t in expected]
    for dtype, dtype_tolerance in tolerance.items():
        pairs = [(a, b) for a, b in zip(actual, expected) if a.dtype == dtype and a.numel()]
        if not pairs:
            continue
        flat_actual, flat_expected = (torch.cat([t.flatten() for t in tensors]) for tensors in zip(*pairs))
        if "ulps" in dtype_tolerance:
            assert_within_ulps(flat_actual, flat_expected, **dtype_tolerance)
        else:
            torch.testing.assert_close(flat_actual, flat_expected, **dtype_tolerance)
    torch.testing.assert_close(actual_stats, expected_stats, **tolerance[torch.float32])


def assert_within_ulps(actual: Tensor, expected: Tensor, ulps: int, atol: float = 0.0) -> None:
    """|actual - expected| <= atol + ulps units in the last place of ``expected`` in its dtype.

    An rtol cannot say "n ulps": the ulp relative to a value halves from the bottom of a binade to its top."""
    wide_actual, wide_expected = actual.double(), expected.double()
    _, exponent = torch.frexp(wide_expected)  # expected = m * 2**exponent, 0.5 <= |m| < 1
    ulp = torch.ldexp(torch.full_like(wide_expected, torch.finfo(expected.dtype).eps), exponent - 1)
    close = ((wide_actual - wide_expected).abs() <= atol + ulps * ulp) | (wide_actual == wide_expected)
    if not close.all():
        worst = int(((wide_actual - wide_expected).abs() / ulp).nan_to_num(math.inf).argmax())
        raise AssertionError(f"{int((~close).sum())} of {close.numel()} {expected.dtype} elements differ by more "
                             f"than {ulps} ulps + {atol}; worst at {worst}: {actual[worst].item()} vs "
                             f"{expected[worst].item()} ({float(ulp[worst])} per ulp)")


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
# (algorithm, primal flags, primal hyperparameters); case i's problem is drawn with seed i.
CASES = [(Algorithm.ADAM, flags, hp) for flags, hp in ADAM_OPTIONS] + [(Algorithm.SGD, f, hp) for f, hp in SGD_OPTIONS]


def case_problem(case: int, dtype: torch.dtype, device: str = "cpu", sizes: Sequence[int] = SIZES) -> Problem:
    algorithm, flags, hp = CASES[case]
    return random_problem(case, algorithm, dtype, flags, hp, sizes=sizes, device=device)


def compare_with_reference(candidate_step: Callable, case: int, dtype: torch.dtype, device: str = "cpu",
                           steps: int = 20, after_step: Callable[[], None] = lambda: None,
                           sizes: Sequence[int] = SIZES, tolerance: dict = TOLERANCE) -> None:
    """Runs CASES[case] for ``steps`` steps with ``candidate_step`` (a fused_step) and with the reference,
    asserting after each step; ``after_step`` adds the caller's own checks (e.g. a clean workspace)."""
    flags = CASES[case][1]
    candidate = case_problem(case, dtype, device, sizes)
    reference = copy.deepcopy(candidate)
    reference_step = fused_step_of("reference")
    for step in range(steps):
        if step == 1 and flags & PrimalFlag.FIRST_MOMENTUM_STEP:
            for problem in (candidate, reference):  # the momentum buffer is seeded only at the first step
                problem.args[PRIMAL_FLAGS] = [int(flags & ~PrimalFlag.FIRST_MOMENTUM_STEP)] * len(problem.params)
        multipliers_before = [lam.clone() for lam in candidate.multipliers]
        states_before = [state.clone() for state in candidate.dual_states]
        stats = candidate_step(*candidate.args)
        reference_stats = reference_step(*reference.args)
        assert_same_results(candidate.args, reference.args, stats, reference_stats, tolerance)
        assert_untouched_unchanged(candidate, multipliers_before, states_before)
        assert stats[0].eq(0).all(), "a block with no pending sample has zero statistics"
        after_step()
        candidate.new_batch()
        reference.new_batch()


def assert_untouched_unchanged(problem: Problem, multipliers_before: list[Tensor],
                               states_before: list[Tensor]) -> None:
    """Constraints no pending sample names keep their multiplier and dual state bitwise."""
    for j, ids in enumerate(problem.args[IDS]):
        k = problem.num_constraints[j]
        untouched = torch.ones(k, dtype=torch.bool, device=problem.device)
        untouched[ids] = False
        assert torch.equal(problem.multipliers[j][untouched], multipliers_before[j][untouched])
        if states_before[j].numel():
            assert torch.equal(problem.dual_states[j].view(-1, k)[:, untouched],
                               states_before[j].view(-1, k)[:, untouched])


def check_found_inf_and_grad_scale(candidate_step: Callable, device: str = "cpu", scale: float = 1024.0,
                                   after_call: Callable[[], None] = lambda: None,
                                   sizes: Sequence[int] = SIZES) -> None:
    """found_inf skips the whole call; grad_scale (a power of two, so unscaling is exact) gives bitwise
    the unscaled primal step.  The dual side of the two calls only agrees to rounding: a parallel kernel
    (CUDA's atomics, its emulation's threads) may sum duplicate ids in any order.  ``after_call`` runs
    after each call (e.g. a workspace check)."""
    problem = case_problem(0, torch.float32, device, sizes)
    before = [t.clone() for t in mutated_tensors(problem.args)]
    args = list(problem.args)
    args[GRAD_SCALE], args[FOUND_INF] = torch.tensor([scale], device=device), torch.tensor([1.0], device=device)
    stats = candidate_step(*args)
    after_call()
    assert all(torch.equal(a, b) for a, b in zip(mutated_tensors(problem.args), before))
    assert stats.eq(0).all()

    scaled = copy.deepcopy(problem)
    for grad in scaled.grads:
        grad.mul_(scale)
    args = list(scaled.args)
    args[GRAD_SCALE], args[FOUND_INF] = torch.tensor([scale], device=device), torch.tensor([0.0], device=device)
    candidate_step(*args)
    after_call()
    candidate_step(*problem.args)
    after_call()
    primal = [index for index in MUTATED if index < MULTIPLIERS]
    assert all(torch.equal(a, b) for index in primal for a, b in zip(scaled.args[index], problem.args[index]))
    for index in (MULTIPLIERS, DUAL_STATES):
        for a, b in zip(scaled.args[index], problem.args[index]):
            torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


# --------------------------------------------------------------------------------------------------
# Explicit calls: chosen sizes, blocks and flags, for what random problems reach too rarely.

INF = math.inf
# One more element than a full Triton primal program (4096), an odd tail, a tensor shorter than a tile.
EXPLICIT_SIZES = (4097, 1023, 5)
ADAM_HPARAMS = (1e-2, 0.9, 0.999, 1e-8, 0.0)
SGD_HPARAMS = (1e-2, 0.9, 0.0, 0.0, 0.0)


def primal_args(gen: torch.Generator, algorithm: Algorithm, sizes: Sequence[int] = EXPLICIT_SIZES, dtypes=None,
                hparams=None, flags: int = 0, start_step: float = 3.0) -> tuple[list, ...]:
    """The eight primal lists of contract.py (params .. primal_flags) for 1-D tensors of ``sizes``."""
    dtypes = dtypes or [torch.float32] * len(sizes)
    hparams = list(hparams or (ADAM_HPARAMS if algorithm == Algorithm.ADAM else SGD_HPARAMS))
    lists = ([], [], [], [], [], [], [], [])
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, all_hparams, all_flags = lists
    for n, dtype in zip(sizes, dtypes):
        params.append(torch.randn(n, generator=gen).to(dtype))
        grads.append(torch.randn(n, generator=gen).to(dtype))
        if algorithm == Algorithm.ADAM:
            exp_avgs.append((0.1 * torch.randn(n, generator=gen)).to(dtype))
            exp_avg_sqs.append((0.01 * torch.rand(n, generator=gen)).to(dtype))
            amsgrad = flags & PrimalFlag.AMSGRAD
            max_exp_avg_sqs.append((0.02 * torch.rand(n, generator=gen)).to(dtype) if amsgrad
                                   else torch.empty(0, dtype=dtype))
            steps.append(torch.tensor(start_step))
        else:
            momentum = hparams[1] != 0
            exp_avgs.append(torch.randn(n, generator=gen).to(dtype) if momentum else torch.empty(0, dtype=dtype))
        all_hparams += hparams
        all_flags.append(int(flags))
    return lists


def constraint_block(gen: torch.Generator, num_constraints: int, num_samples: int, flags: int = 0, lr=0.1, kp=0.5,
                     ki=1.0, nu=0.3, damping=0.0, lower=0.0, upper=INF, decay=0.8, id_range=None) -> tuple:
    """One constraint block's (multipliers, dual_state, ids, violations, hparams, flags); ids are drawn from
    [0, id_range), so constraints id_range.. stay untouched."""
    lam = torch.rand(num_constraints, generator=gen) if lower == 0 else torch.randn(num_constraints, generator=gen)
    state = random_dual_state(DualFlag(flags), num_constraints, gen)
    ids = torch.randint(0, id_range or num_constraints, (num_samples,), generator=gen)
    violations = torch.randn(num_samples, generator=gen)
    return lam, state, ids, violations, [lr, kp, ki, nu, damping, lower, upper, decay], int(flags)


def dual_args(blocks: Sequence[tuple]) -> tuple[list, ...]:
    """The six dual lists of contract.py (multipliers .. dual_flags) of ``constraint_block``s."""
    multipliers, states, ids, violations, hparams, flags = [], [], [], [], [], []
    for lam, state, block_ids, block_violations, block_hparams, block_flags in blocks:
        multipliers.append(lam)
        states.append(state)
        ids.append(block_ids)
        violations.append(block_violations)
        hparams += block_hparams
        flags.append(block_flags)
    return multipliers, states, ids, violations, hparams, flags


def contract_call(primal: Sequence[list], algorithm: Algorithm, dual: Sequence[list], grad_scale=None,
                  found_inf=None) -> list:
    """fused_step's argument list; hyperparameters become contract.py's tensors."""
    primal, dual = list(primal), list(dual)
    primal[6], dual[4] = hparams_tensor(primal[6]), hparams_tensor(dual[4])
    return list(FusedStepArguments(*primal, int(algorithm), *dual, grad_scale, found_inf))


def run_both(candidate_step: Callable, args: list, steps: int = 1) -> tuple:
    """Runs the call ``steps`` times with the candidate and with the reference, each on its own copy of
    ``args``: (candidate's args, reference's args, candidate's stats, reference's stats), the arguments
    of ``assert_same_results``."""
    expected = copy.deepcopy(args)
    reference_step = fused_step_of("reference")
    for _ in range(steps):
        actual_stats = candidate_step(*args)
        expected_stats = reference_step(*expected)
    return args, expected, actual_stats, expected_stats


# Every dual rule, alone in a block of 60 constraints fed 2500 samples: heavy duplication of ids.
DUAL_RULES = [
    (0, {}),  # indexed: sums over duplicates
    (DualFlag.MEAN, {}),  # grouped: means
    (DualFlag.NUPI, {"kp": 2.0, "ki": 1.0, "nu": 0.5}),
    (DualFlag.NUPI | DualFlag.MEAN, {"damping": 0.1, "upper": 0.6}),  # damping and a cap
    (DualFlag.RESTART, {}),
    (DualFlag.FROZEN, {}),  # penalty formulations: statistics only
    (0, {"lower": -INF}),  # equality: no projection, |g| statistics
    (DualFlag.NUPI, {"lower": -0.5, "upper": 0.5}),
    (DualFlag.RUNNING | DualFlag.MEAN, {}),  # running ratio estimate S / N
    (DualFlag.RUNNING | DualFlag.NUPI | DualFlag.MEAN, {"kp": 2.0, "decay": 0.95}),  # xi row, then S and N
    (DualFlag.RUNNING | DualFlag.NUPI | DualFlag.RESTART, {"lower": -INF}),
    (DualFlag.RUNNING | DualFlag.FROZEN, {}),  # frozen: the running state is not read
]


def dual_rule_call(rule: int) -> list:
    """DUAL_RULES[rule]'s block (2500 samples over 60 ids) beside an SGD step on 3000 parameters."""
    flags, options = DUAL_RULES[rule]
    gen = torch.Generator().manual_seed(8)
    dual = dual_args([constraint_block(gen, 60, 2500, flags, **options)])
    return contract_call(primal_args(gen, Algorithm.SGD, sizes=(3000,)), Algorithm.SGD, dual)


def several_blocks_call() -> list:
    """Four blocks: one touched only below id 100, one empty, a dense equality block, and a running one
    touched only below id 1000 (the untouched tails must stay bitwise unchanged)."""
    gen = torch.Generator().manual_seed(9)
    blocks = [
        constraint_block(gen, 500, 1500, DualFlag.NUPI, id_range=100),
        constraint_block(gen, 7, 0),
        constraint_block(gen, 3, 3, DualFlag.MEAN, lower=-INF),
        constraint_block(gen, 1200, 1100, DualFlag.RESTART | DualFlag.RUNNING, id_range=1000),
    ]
    return contract_call(primal_args(gen, Algorithm.ADAM, sizes=(2000,)), Algorithm.ADAM, dual_args(blocks))


def check_several_blocks(candidate_step: Callable, tolerance: dict = TOLERANCE) -> None:
    args = several_blocks_call()
    untouched_before = (args[MULTIPLIERS][0][100:].clone(), args[DUAL_STATES][0][100:].clone())
    running_before = args[DUAL_STATES][3].clone()
    actual, expected, stats, expected_stats = run_both(candidate_step, args)
    assert_same_results(actual, expected, stats, expected_stats, tolerance)
    assert torch.equal(actual[MULTIPLIERS][0][100:], untouched_before[0])
    assert torch.equal(actual[DUAL_STATES][0][100:], untouched_before[1])
    assert stats[1].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(actual[DUAL_STATES][3][:, 1000:], running_before[:, 1000:])


def dual_only_call() -> list:
    """No parameter tensors (the optimizer's dual-first ordering calls the backend so)."""
    gen = torch.Generator().manual_seed(10)
    dual = dual_args([constraint_block(gen, 50, 2100, DualFlag.MEAN),
                      constraint_block(gen, 9, 40, DualFlag.NUPI)])
    return contract_call(([], [], [], [], [], [], [], []), Algorithm.ADAM, dual)


def flags_covered(sizes: Sequence[int] = SIZES) -> DualFlag:
    """The union of the dual flags the cases' blocks draw (the tests check it is every flag)."""
    covered = DualFlag(0)
    for case in range(len(CASES)):
        for flags in case_problem(case, torch.float32, sizes=sizes).args[_FIELDS.index("dual_flags")]:
            covered |= flags
    return covered
