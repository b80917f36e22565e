"""GPU check of the fast backends (native CUDA kernel, Triton): correctness, launches per step, speed.

    python bench/gpu_check.py [--quick]        (or: python -m bench.gpu_check)

On a CUDA machine, for each of "native" and "triton" that can run on CUDA here:
1. correctness against the reference backend on GPU tensors: the cases of the conformance suite
   (fused_lagrangian.testing.conformance: every SGD / Adam option, fp32 and bf16, several blocks with
   random dual flags, 20 steps each; found_inf / grad_scale), plus the CUDA tests of
   tests/backends/test_native.py under pytest for the native backend;
2. kernel launches per optimizer step (the blocks' observe and the step, as a training loop pays them)
   on the benchmark suite's step problems, counted with torch.profiler (memcpys counted apart);
3. step time of the benchmark suite's step candidates (bench.step_candidates: the fused backends,
   torch.optim.Adam(fused=True), and the bandwidth ceiling), median over interleaved repetitions
   (bench.timing.time_interleaved);
4. a training step (forward with dense, indexed and grouped blocks, the last with (B, M) group
   memberships padded with -1, backward, LagrangianAdam capturable=True step, lr and one dual_lr as
   device tensors changed in place between steps as a scheduler does) run under
   torch.cuda.set_sync_debug_mode("error") (no host sync: input checks deferred, hyperparameters read
   by the kernel from device memory), then captured in a CUDA graph whose replays equal the eager steps.
Prints a table; about 5 minutes on an H200, plus the native extension's build (~2 minutes) when the
package has none: the script then compiles it on first use (FUSED_LAGRANGIAN_JIT=1).  Without CUDA
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __package__ in (None, ""):  # run as a script: Python put bench/ on the path, the checkout holds the packages
    sys.path.insert(0, ROOT)

from bench.problems import BlockConfig, StepData, StepProblem  # noqa: E402
from bench.step_candidates import step_candidates  # noqa: E402
from bench.timing import time_interleaved  # noqa: E402
from fused_lagrangian.testing import conformance  # noqa: E402

FLOOR, CEILING = "torch_fused", "ceiling"
BLOCK_CASES = {"no blocks": (),
               "indexed 1e6 + grouped 1e3, batch 4096": (BlockConfig("indexed", 10**6, 4096),
                                                         BlockConfig("grouped", 10**3, 4096))}


def cuda_backends(backends) -> dict[str, str]:
    """Backend name -> None when it runs on CUDA here, else the reason."""
    return {name: backends.unavailable_reason(name, "cuda") for name in ("native", "triton")
            if name in backends.names()}


# --------------------------------------------------------------------------------------------------
# 1. Correctness

def check_correctness(backends, names: list[str], quick: bool, device: str = "cuda") -> dict[str, str]:
    cases = range(0, len(conformance.CASES), 3) if quick else range(len(conformance.CASES))
    results = {}
    for name in names:
        fused_step = backends.fused_step_of(name)
        checks = {f"case {case} {dtype}": (lambda case=case, dtype=dtype: conformance.compare_with_reference(
                      fused_step, case, dtype, device, tolerance=conformance.UNORDERED_SUM_TOLERANCE))
                  for case in cases for dtype in (torch.float32, torch.bfloat16)}
        checks["found_inf / grad_scale"] = lambda: conformance.check_found_inf_and_grad_scale(fused_step, device)
        failures, start = [], time.time()
        for label, check in checks.items():
            try:
                check()
            except Exception as error:  # noqa: BLE001 - report every failing case, then go on
                failures.append(f"{label}: {(str(error).splitlines() or [type(error).__name__])[0]}")
        results[name] = (f"{len(checks) - len(failures)}/{len(checks)} conformance checks equal the reference "
                         f"(cases over 20 steps; {time.time() - start:.0f} s)"
                         + "".join("\n      FAIL " + f for f in failures))
    return results


def run_native_pytest() -> str:
    command = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "backends", "test_native.py"),
               "-q", "-k", "cuda", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "pytest -k cuda: timed out after 240 s"
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"pytest tests/backends/test_native.py -k cuda: {tail}" + ("" if done.returncode == 0 else
                                                                         "\n" + done.stdout[-3000:])


# --------------------------------------------------------------------------------------------------
# 2. Launches per step

def launches_per_step(step, steps: int = 5) -> tuple[float, float]:
    """(kernels, memcpys + memsets) per call of ``step``, after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in device_events if e.name.startswith(("Memcpy", "Memset"))]
    return (len(device_events) - len(copies)) / steps, len(copies) / steps


# --------------------------------------------------------------------------------------------------
# 3. Timing: the benchmark suite's step problems and candidates


def step_problem_candidates(num_params: int, blocks: tuple, names: list[str],
                            device: str = "cuda") -> tuple[StepProblem, dict]:
    """The floor, the ceiling and each fused backend on bench's Adam step problem (8 fp32 tensors)."""
    problem = StepProblem(num_params, blocks, algorithm="adam", num_tensors=8)
    factories = step_candidates(StepData(problem, torch.device(device)), names)
    wanted = [FLOOR, CEILING] + [f"fused:{name}" for name in names]
    return problem, {label: factories[label]() for label in wanted}


# --------------------------------------------------------------------------------------------------
# 4. No host syncs; CUDA graph capture and replay

# Applied in place after every step, as LR schedulers with tensor learning rates do (fill_): a replay that
# used the captured lr or dual_lr instead of the current ones would drift from the eager run.
LR_DECAY, DUAL_LR_GROWTH = 0.8, 1.25


def _training_setup(backend: str, device: str = "cuda"):
    from fused_lagrangian import LagrangianAdam

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1).to(device)
    optimizer = LagrangianAdam(model.parameters(), lr=torch.tensor(1e-2, device=device), capturable=True,
                               backend=backend)
    blocks = (optimizer.add_constraint("dense", num_constraints=2, dual_lr=torch.tensor(0.1, device=device)),
              optimizer.add_constraint("rows", kind="indexed", num_constraints=10**6, dual_lr=0.1, bound=0.1),
              optimizer.add_constraint("groups", kind="grouped", num_constraints=10**3, dual_lr=0.1, bound=-0.05,
                                       to_overall=True))
    return model, optimizer, blocks


def _batches(steps: int, batch: int = 512, device: str = "cuda") -> list[tuple[torch.Tensor, ...]]:
    """Inputs, sample ids, and (B, 2) group memberships padded with -1 (a static shape: no sync either)."""
    generator = torch.Generator().manual_seed(1)

    def memberships():
        groups = torch.randint(0, 10**3, (batch, 2), generator=generator)
        return groups.masked_fill(torch.rand(batch, 2, generator=generator) < 0.3, -1)

    return [tuple(t.to(device) for t in (torch.randn(batch, 64, generator=generator),
                                         torch.randint(0, 10**6, (batch,), generator=generator), memberships()))
            for _ in range(steps)]


def _train_step(model, optimizer, blocks, x, ids, group_ids) -> None:
    dense, rows, groups = blocks
    out = model(x).flatten()
    loss = ((out - 1) ** 2).mean() + dense(torch.stack([out.mean(), -out.mean() - 2])) + rows(out, ids=ids) + \
        groups(torch.sigmoid(out), ids=group_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # graph capture needs the gradients' memory to stay put


def _schedule(optimizer, blocks) -> None:
    optimizer.param_groups[0]["lr"].mul_(LR_DECAY)
    blocks[0].spec.dual_lr.mul_(DUAL_LR_GROWTH)


def _state(model, blocks) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [b.multipliers.clone() for b in blocks]


def eager_run(name: str, batches: list, warmup: int, device: str = "cuda", schedule_until: Optional[int] = None,
              sync_check: bool = True) -> list[torch.Tensor]:
    """The training run a graph's replays must reproduce: each batch a step, then the schedule (up to step
    ``schedule_until``); with ``sync_check``, every host sync after the warm-up is an error (state creation
    may sync)."""
    model, optimizer, blocks = _training_setup(name, device)
    try:
        for step, batch in enumerate(batches):
            if sync_check and step == warmup:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            _train_step(model, optimizer, blocks, *batch)
            if schedule_until is None or step < schedule_until:
                _schedule(optimizer, blocks)
    finally:
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
    optimizer.raise_input_errors()
    return _state(model, blocks)


def captured_run(name: str, batches: list, warmup: int) -> list[torch.Tensor]:
    """The same run, the steps after the warm-up replayed from one captured graph."""
    model, optimizer, blocks = _training_setup(name)
    static = [t.clone() for t in batches[0]]
    for batch in batches[:warmup]:
        for target, source in zip(static, batch):
            target.copy_(source)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _train_step(model, optimizer, blocks, *static)
        torch.cuda.current_stream().wait_stream(side)
        _schedule(optimizer, blocks)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_step(model, optimizer, blocks, *static)
    for batch in batches[warmup:]:  # capture records without running: the first replay is step warmup + 1
        for target, source in zip(static, batch):
            target.copy_(source)
        graph.replay()
        _schedule(optimizer, blocks)
    torch.cuda.synchronize()
    optimizer.raise_input_errors()
    return _state(model, blocks)


def check_syncs_and_capture(names: list[str], warmup: int = 3, steps: int = 10) -> dict[str, str]:
    results = {}
    batches = _batches(warmup + steps)
    for name in names:
        try:
            eager = eager_run(name, batches, warmup)
            captured = captured_run(name, batches, warmup)
            error = max(float((a - b).abs().max()) for a, b in zip(eager, captured))
            verdict = "ok" if error <= 1e-6 else "FAIL"
            results[name] = (f"{verdict}: {steps} steps without a host sync; graph replay vs eager max |diff| "
                             f"{error:.2e} (lr and dual_lr tensors changed in place between steps)")
        except Exception as error:  # noqa: BLE001 - report, then check the next backend
            results[name] = f"FAIL: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases, sizes and rounds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, cuda {torch.version.cuda}); nothing to check")
        return 0
    from fused_lagrangian import backends
    from fused_lagrangian.backends import native

    if native.built_library_path() is None and os.environ.get(native.JIT_ENV) is None:
        print(f"gpu_check: no native build in the package: compiling it now ({native.JIT_ENV}=1, ~2 min)")
        os.environ[native.JIT_ENV] = "1"
    started = time.time()
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    status = cuda_backends(backends)
    for name, reason in status.items():
        print(f"  {name:<8} {'available' if reason is None else 'unavailable: ' + reason}")
    names = [name for name, reason in status.items() if reason is None]

    print("\n1. Correctness against the reference on CUDA tensors")
    for name, summary in check_correctness(backends, names, args.quick).items():
        print(f"  {name:<8} {summary}")
    if "native" in names:
        print("  " + run_native_pytest())

    sizes = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]

    print("\n2. Launches per optimizer step (observe + step; kernels, memcpy/memset)")
    for case, blocks in BLOCK_CASES.items():
        _, candidates = step_problem_candidates(10**6, blocks, names)
        for label, candidate in candidates.items():
            if label != CEILING:
                kernels, copies = launches_per_step(candidate.step)
                print(f"  {label + ', ' + case:<60} {kernels:5.1f} kernels  {copies:4.1f} copies")
        del candidates

    print("\n3. Step time (fp32 Adam, 8 tensors): median over interleaved repetitions")
    print(f"  {'params':>8}  {'case':<40} {'candidate':<18} {'time':>10} {'vs fused':>9} {'GB/s':>7} "
          f"{'of ceiling':>10}")
    repetitions, inner = (5, 10) if args.quick else (11, 20)
    for n in sizes:
        for case, blocks in BLOCK_CASES.items():
            problem, candidates = step_problem_candidates(n, blocks, names)
            timings = time_interleaved({label: c.step for label, c in candidates.items()}, repetitions=repetitions,
                                       inner={label: inner for label in candidates}, device=torch.device("cuda"))
            result = {label: timing.median for label, timing in timings.items()}
            for label, seconds in result.items():
                bandwidth = problem.primal_bytes / seconds / 1e9
                print(f"  {n:>8.0e}  {case:<40} {label:<18} {seconds * 1e6:8.1f} us "
                      f"{seconds / result[FLOOR]:8.2f}x {bandwidth:7.0f} {result[CEILING] / seconds:9.0%}")
            del candidates
            torch.cuda.empty_cache()
    print("\n4. Host syncs and CUDA graph capture (training step with three blocks, capturable Adam)")
    for name, summary in check_syncs_and_capture(names).items():
        print(f"  {name:<8} {summary}")
    print(f"\ngpu_check: done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - print the whole story: this runs unattended on a rented GPU
        traceback.print_exc()
        sys.exit(1)
