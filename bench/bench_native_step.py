"""Step time of the native backend vs torch.optim.Adam(fused=True): medians over interleaved repetitions.

    python bench/bench_native_step.py [--threads 1 2] [--params 10_000_000] [--repeats 40]

Cases (10M fp32 parameters in 8 tensors, Adam): no constraint block; an indexed block of 10^6
constraints and a grouped block of 10^3, batch 4096 each; an indexed block of 10^4 vs 10^8.
Every candidate updates its own copy of the same tensors; each repetition runs all candidates of a
case in a rotated order, so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fused_lagrangian import backends
from fused_lagrangian.contract import Algorithm, DualFlag


def adam_tensors(num_params: int, num_tensors: int, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = num_params // num_tensors
    params = [torch.randn(size, generator=generator).to(device) for _ in range(num_tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=generator).to(device)
    return params


def torch_fused_adam(num_params: int, num_tensors: int, device: str = "cpu"):
    params = adam_tensors(num_params, num_tensors, device)
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    return optimizer.step


def contract_step(num_params: int, num_tensors: int, blocks: list[tuple[int, int, int]], backend: str = "native",
                  device: str = "cpu"):
    """A backend's Adam step on its own tensors; blocks: (num_constraints, batch, flags) per block."""
    params = adam_tensors(num_params, num_tensors, device)
    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), dtype=torch.float32, device=device))
             for p in params]
    empty = torch.empty(0, device=device)
    generator = torch.Generator().manual_seed(1)
    multipliers = [torch.zeros(k, device=device) for k, _, _ in blocks]
    ids = [torch.randint(0, k, (batch,), generator=generator).to(device) for k, batch, _ in blocks]
    violations = [torch.randn(batch, generator=generator).to(device) for _, batch, _ in blocks]
    fused_step = backends.fused_step_of(backend)

    def step():
        fused_step(params, [p.grad for p in params], [s[0] for s in state], [s[1] for s in state],
                   [empty] * len(params), [s[2] for s in state], [1e-3, 0.9, 0.999, 1e-8, 0.0] * len(params),
                   [0] * len(params), int(Algorithm.ADAM), multipliers, [empty] * len(blocks), ids, violations,
                   [1e-2, 0.0, 1.0, 0.0, 0.0, 0.0, float("inf")] * len(blocks), [f for _, _, f in blocks])

    return step


def read_modify_write(num_params: int):
    """The bandwidth ceiling: Adam moves 28 bytes per fp32 parameter (reads p, g, m, v; writes p, m, v);
    an in-place pass over 3.5 floats per parameter reads 14 and writes 14."""
    buffer = torch.randn(num_params * 7 // 2)

    def step():
        buffer.add_(1.0)

    return step


def median_times(candidates: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    for run in candidates.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    reason = backends.unavailable_reason("native", "cpu")
    if reason is not None:
        raise SystemExit(f"native backend unavailable: {reason}")
    n, t = args.params, args.tensors
    indexed, grouped = 0, int(DualFlag.MEAN)
    cases = {
        "no blocks": {"native": []},
        "indexed 1e6 + grouped 1e3, batch 4096": {"native": [(10**6, 4096, indexed), (10**3, 4096, grouped)]},
        "indexed 1e4 vs 1e8, batch 4096": {"native, K=1e4": [(10**4, 4096, indexed)],
                                           "native, K=1e8": [(10**8, 4096, indexed)]},
    }
    print(f"torch {torch.__version__}, {n:,} fp32 params in {t} tensors, Adam, median of {args.repeats} "
          "interleaved repetitions; ratio = time / torch fused Adam's; rmw 1 stream = one in-place pass over the same bytes")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case, natives in cases.items():
            candidates = {"torch fused Adam": torch_fused_adam(n, t), "rmw 1 stream": read_modify_write(n)}
            candidates.update({name: contract_step(n, t, blocks) for name, blocks in natives.items()})
            result = median_times(candidates, args.repeats)
            floor = result["torch fused Adam"]
            cells = "  ".join(f"{name} {seconds * 1e3:6.2f} ms ({seconds / floor:4.2f})"
                              for name, seconds in result.items())
            print(f"threads {threads}  {case:<38} {cells}")
            del candidates

if __name__ == "__main__":
    main()
