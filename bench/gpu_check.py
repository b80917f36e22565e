"""GPU check of the fast backends (native CUDA kernel, Triton): correctness, launches per step, speed.

    python bench/gpu_check.py [--quick]

On a CUDA machine, for each of "native" and "triton" that can run on CUDA here:
1. correctness against the reference backend on GPU tensors: the property cases of
   tests/backends/test_native.py (every SGD / Adam option, fp32 and bf16, several blocks with every
   dual flag, 20 steps each), plus that test file's CUDA tests under pytest for the native backend;
2. kernel launches per step, counted with torch.profiler (memcpys counted apart);
3. step time, median over interleaved rounds timed with CUDA events, against
   torch.optim.Adam(fused=True), and a device copy of the same bytes as the bandwidth ceiling;
4. a training step (forward with dense, indexed and grouped blocks, backward, LagrangianAdam
   capturable=True step) run under torch.cuda.set_sync_debug_mode("error") (no host sync: input
   checks deferred), then captured in a CUDA graph whose replays equal eager steps.
Prints a table; about 5 minutes on an H200, plus the native extension's build (~2 minutes) when the
package has none: the script then compiles it on first use (FUSED_LAGRANGIAN_JIT=1).  Without CUDA
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ADAM_BYTES_PER_PARAM = 28  # fp32: reads p, g, m, v; writes p, m, v


def load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cuda_backends(backends) -> dict[str, str]:
    """Backend name -> None when it runs on CUDA here, else the reason."""
    return {name: backends.unavailable_reason(name, "cuda") for name in ("native", "triton")
            if name in backends.names()}


# --------------------------------------------------------------------------------------------------
# 1. Correctness

def check_correctness(backends, names: list[str], quick: bool) -> dict[str, str]:
    tests = load_module("test_native", os.path.join(ROOT, "tests", "backends", "test_native.py"))
    cases = range(0, len(tests.CASES), 3) if quick else range(len(tests.CASES))
    results = {}
    for name in names:
        failures, count, start = [], 0, time.time()
        for case in cases:
            for dtype in (torch.float32, torch.bfloat16):
                count += 1
                try:
                    tests.compare_with_reference(backends.fused_step_of(name), case, dtype, "cuda")
                except Exception as error:  # noqa: BLE001 - report every failing case, then go on
                    failures.append(f"case {case} {dtype}: {str(error).splitlines()[0]}")
        results[name] = (f"{count - len(failures)}/{count} cases equal the reference over 20 steps "
                         f"({time.time() - start:.0f} s)" + "".join("\n      FAIL " + f for f in failures))
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
# 3. Timing

def median_step_times(candidates: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call; each round times ``inner`` calls of every candidate, in rotated order."""
    for run in candidates.values():
        run()
    torch.cuda.synchronize()
    times = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                candidates[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_of_same_bytes(num_params: int):
    """Copies 14 B per parameter from one buffer to another: 28 B moved, Adam's traffic."""
    source = torch.randn(num_params * 7 // 2, device="cuda")
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


# --------------------------------------------------------------------------------------------------
# 4. No host syncs; CUDA graph capture and replay


def _training_setup(backend: str):
    from fused_lagrangian import LagrangianAdam

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1).cuda()
    optimizer = LagrangianAdam(model.parameters(), lr=1e-2, capturable=True, backend=backend)
    blocks = (optimizer.add_constraint("dense", num_constraints=2, dual_lr=0.1),
              optimizer.add_constraint("rows", kind="indexed", num_constraints=10**6, dual_lr=0.1, bound=0.1),
              optimizer.add_constraint("groups", kind="grouped", num_constraints=10**3, dual_lr=0.1, bound=-0.05,
                                       to_overall=True))
    return model, optimizer, blocks


def _batches(steps: int, batch: int = 512) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 64, generator=generator).cuda(), torch.randint(0, 10**6, (batch,), generator=generator).cuda(),
             torch.randint(0, 10**3, (batch,), generator=generator).cuda()) for _ in range(steps)]


def _train_step(model, optimizer, blocks, x, ids, group_ids) -> None:
    dense, rows, groups = blocks
    out = model(x).flatten()
    loss = ((out - 1) ** 2).mean() + dense(torch.stack([out.mean(), -out.mean() - 2])) + rows(out, ids=ids) + \
        groups(torch.sigmoid(out), ids=group_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # graph capture needs the gradients' memory to stay put


def _state(model, blocks) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [b.multipliers.clone() for b in blocks]


def check_syncs_and_capture(names: list[str], warmup: int = 3, steps: int = 10) -> dict[str, str]:
    results = {}
    batches = _batches(warmup + steps)
    for name in names:
        try:
            # Eager reference, with every host sync an error after the warm-up (state creation may sync).
            model, optimizer, blocks = _training_setup(name)
            for batch in batches[:warmup]:
                _train_step(model, optimizer, blocks, *batch)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for batch in batches[warmup:]:
                    _train_step(model, optimizer, blocks, *batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            optimizer.raise_input_errors()
            eager = _state(model, blocks)

            # The same run, the steps after the warm-up replayed from one captured graph.
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
            graph = torch.cuda.CUDAGraph()
            for target, source in zip(static, batches[warmup]):
                target.copy_(source)
            with torch.cuda.graph(graph):
                _train_step(model, optimizer, blocks, *static)
            graph.replay()  # capture records without running: the first replay is step warmup + 1
            for batch in batches[warmup + 1:]:
                for target, source in zip(static, batch):
                    target.copy_(source)
                graph.replay()
            torch.cuda.synchronize()
            optimizer.raise_input_errors()
            captured = _state(model, blocks)
            error = max(float((a - b).abs().max()) for a, b in zip(eager, captured))
            verdict = "ok" if error <= 1e-6 else "FAIL"
            results[name] = (f"{verdict}: {steps} steps without a host sync; graph replay vs eager max |diff| "
                             f"{error:.2e}")
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
    bench = load_module("bench_native_step", os.path.join(HERE, "bench_native_step.py"))

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
    blocks_cases = {"no blocks": [], "indexed 1e6 + grouped 1e3, batch 4096": [(10**6, 4096, 0), (10**3, 4096, 1)]}

    print("\n2. Launches per step (kernels; memcpy/memset)")
    counted = {"torch fused Adam": bench.torch_fused_adam(10**6, 8, "cuda")}
    for name in names:
        for case, blocks in blocks_cases.items():
            counted[f"{name}, {case}"] = bench.contract_step(10**6, 8, blocks, name, "cuda")
    for label, step in counted.items():
        kernels, copies = launches_per_step(step)
        print(f"  {label:<50} {kernels:5.1f} kernels  {copies:4.1f} copies")
    del counted

    print("\n3. Step time (fp32 Adam, 8 tensors): median over interleaved rounds")
    header = f"  {'params':>8}  {'case':<40} {'candidate':<18} {'time':>10} {'vs fused':>9} {'GB/s':>7} {'of copy':>8}"
    print(header)
    for n in sizes:
        rounds, inner = (5, 10) if args.quick else (11, 20)
        for case, blocks in blocks_cases.items():
            candidates = {"torch fused Adam": bench.torch_fused_adam(n, 8, "cuda"),
                          "copy (same bytes)": copy_of_same_bytes(n)}
            for name in names:
                candidates[name] = bench.contract_step(n, 8, blocks, name, "cuda")
            result = median_step_times(candidates, rounds, inner)
            for label, seconds in result.items():
                bandwidth = ADAM_BYTES_PER_PARAM * n / seconds / 1e9
                print(f"  {n:>8.0e}  {case:<40} {label:<18} {seconds * 1e6:8.1f} us "
                      f"{seconds / result['torch fused Adam']:8.2f}x {bandwidth:7.0f} "
                      f"{result['copy (same bytes)'] / seconds:7.0%}")
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
