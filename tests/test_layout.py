"""The library stands apart from its applications: importing it loads neither them nor their dependencies."""

from __future__ import annotations

import subprocess
import sys

APP_ONLY_MODULES = ("matplotlib", "tqdm", "fused_lagrangian_apps", "bench")


def test_importing_the_library_loads_no_application_dependency():
    # torch itself imports tqdm (torch.hub) when it is installed: count what the library adds to torch.
    probe = ("import sys, torch; before = set(sys.modules); "
             "import fused_lagrangian, fused_lagrangian.fairness, fused_lagrangian.distributed; "
             f"print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {APP_ONLY_MODULES!r}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_applications_use_only_the_public_api():
    """The apps and the benchmark suite import the library by its public modules, never its internals."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    public = {"fused_lagrangian", "fused_lagrangian.fairness", "fused_lagrangian.distributed",
              "fused_lagrangian.backends", "fused_lagrangian.contract", "fused_lagrangian.selection",
              "fused_lagrangian.checkpoint", "fused_lagrangian.testing", "fused_lagrangian.testing.conformance"}
    offenders = []
    for path in [*root.glob("fused_lagrangian_apps/**/*.py"), *root.glob("examples/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fused_lagrangian."):
                if node.module.split(".")[0] == "fused_lagrangian" and node.module not in public:
                    offenders.append(f"{path.relative_to(root)}: from {node.module} import ...")
    assert offenders == []
