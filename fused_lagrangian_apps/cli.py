"""The ``fused-lagrangian`` command: demo (the main job), examples, bench, info."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional

# argparse shows these as they are: plain text, no reStructuredText markup.
DESCRIPTION = "Constrained training with fused_lagrangian: the demo, the paper's examples, benchmarks, install status."
EXAMPLES_DESCRIPTION = (
    "The position paper's two examples (Ramirez et al., arXiv 2505.20628), each solved by one Lagrangian run "
    "and by a grid of fixed penalties: a concave problem where every penalty ends at an end of the interval, "
    "and a rate constraint (at least 70% predicted class 0) that no penalty of the grid lands on. "
    "Each table ends with what its numbers mean.")
INFO_DESCRIPTION = ("Version, the backends that can run here, the one backend='auto' picks on each device and "
                    "where the native library comes from (built at install, compiled on first use, or why not).")


def _info(_: argparse.Namespace) -> int:
    import torch

    import fused_lagrangian
    from fused_lagrangian import backends

    print(f"fused_lagrangian {fused_lagrangian.__version__}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        with warnings.catch_warnings():  # the lines below give the reasons a fallback warning would repeat
            warnings.simplefilter("ignore", backends.BackendFallbackWarning)
            picked = backends.resolve("auto", torch.device(device))
        print(f"\n{device}: backend='auto' picks {picked!r}")
        for name in backends.names():
            reason = backends.unavailable_reason(name, device)
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    for name in backends.names():
        status = backends.build_status(name)
        if status:
            print(f"\n{name} build: {status}")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from fused_lagrangian_apps.paper_examples import print_examples_table

    print_examples_table(backend=args.backend)
    return 0


def _demo(argv: list[str]) -> int:
    from fused_lagrangian_apps.demo import main as demo_main

    return demo_main(argv)


def _bench(argv: list[str]) -> int:
    # The benchmark suite is the source checkout's top-level bench/ package, not part of the install.
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(checkout, "bench", "__init__.py")):
        print("fused-lagrangian bench runs the benchmark suite of a source checkout (bench/); this install "
              "has none: clone the repository and run `python -m bench` or `fused-lagrangian bench` there",
              file=sys.stderr)
        return 2
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    from bench import main as bench_main

    return bench_main(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fused-lagrangian", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="fairness on UCI Adult: unconstrained vs penalty sweep vs one Lagrangian run "
                                     "(options: fused-lagrangian demo --help)", add_help=False)
    commands.add_parser("bench", help="benchmarks: fused vs Cooper vs unfused vs torch fused Adam "
                                      "(options: fused-lagrangian bench --help)", add_help=False)
    examples = commands.add_parser("examples", help="the position paper's two examples: Lagrangian vs penalties",
                                   description=EXAMPLES_DESCRIPTION)
    examples.add_argument("--backend", default="auto", help="fused_step backend: auto (default), reference, native, "
                                                            "triton")
    commands.add_parser("info", help="version, backends available and which one 'auto' picks, build status",
                        description=INFO_DESCRIPTION)
    # demo and bench own their options: hand them the rest of the command line untouched.
    if argv and argv[0] in ("demo", "bench"):
        return {"demo": _demo, "bench": _bench}[argv[0]](argv[1:])
    args = parser.parse_args(argv)
    return {"info": _info, "examples": _examples}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
