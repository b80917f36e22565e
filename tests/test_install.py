"""A wheel built the way pip builds by default gives the native backend, or one warning saying why not.

pip's default build is isolated: it cannot see the installed torch, so the wheel carries the C++ sources
and the package compiles them on first use.  This test builds such a wheel from the working tree,
installs it into a fresh virtual environment that sees this machine's torch, and runs it from a
directory outside the checkout.  About 1-2 minutes (most of it the first-use compile).
Deselect with ``-m "not install"``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.install

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILE_MESSAGE = "compiling the native extension on first use"
FALLBACK_MESSAGE = "BackendFallbackWarning"

# What the installed package does on CPU tensors: the backend "auto" picks (asked three times) and a few
# optimizer steps; warnings are shown every time they are raised (-W always), so only the package's own
# once-per-process rule can keep them to one.
PROBE = """
import json, torch, fused_lagrangian
from fused_lagrangian import LagrangianAdam, backends
picks = [backends.resolve("auto", torch.device("cpu")) for _ in range(3)]
weight = torch.nn.Parameter(torch.ones(4))
optimizer = LagrangianAdam([weight], lr=0.1)
block = optimizer.add_constraint("cap", kind="indexed", num_constraints=4, sense="<=", bound=0.5, dual_lr=1.0)
for _ in range(3):
    loss = -weight.sum() + block(weight, ids=torch.arange(4))
    loss.backward(); optimizer.step(); optimizer.zero_grad()
print(json.dumps({"package": fused_lagrangian.__file__, "picks": picks,
                  "multipliers": block.multipliers.tolist(), "status": backends.build_status("native")}))
"""


def _copy_working_tree(destination: pathlib.Path) -> None:
    """The files a clone would have (tracked, plus new ones not ignored): no build/ leftovers, no built .so."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)


def _run_probe(python: pathlib.Path, cwd: pathlib.Path, **env_changes: str) -> tuple[dict, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "FUSED_LAGRANGIAN_JIT")}
    env.update(env_changes)
    result = subprocess.run([str(python), "-W", "always", "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(the venv's python, a directory outside the checkout) with the wheel installed."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone would have")
    work = tmp_path_factory.mktemp("install")
    source, dist, venv = work / "source", work / "dist", work / "venv"
    _copy_working_tree(source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(dist)],
                   cwd=work, check=True, timeout=600)
    wheel, = dist.glob("fused_lagrangian-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   cwd=work, check=True, timeout=600)
    return python, work


def test_isolated_wheel_compiles_the_native_backend_on_first_use(installed_wheel):
    python, work = installed_wheel
    cache = str(work / "extensions")
    first, first_stderr = _run_probe(python, work, TORCH_EXTENSIONS_DIR=cache)
    assert pathlib.Path(first["package"]).is_relative_to(work / "venv"), first["package"]
    assert first["picks"] == ["native"] * 3, first_stderr
    assert "first-use build" in first["status"] and "fused_lagrangian/csrc" in first["status"]
    assert first_stderr.count(COMPILE_MESSAGE) == 1 and FALLBACK_MESSAGE not in first_stderr, first_stderr

    again, again_stderr = _run_probe(python, work, TORCH_EXTENSIONS_DIR=cache)
    assert again["picks"] == ["native"] * 3 and "cached" in again["status"]
    assert COMPILE_MESSAGE not in again_stderr, again_stderr
    assert again["multipliers"] == first["multipliers"]


@pytest.mark.parametrize("how, expected_reason", [
    ({"FUSED_LAGRANGIAN_JIT": "0"}, "FUSED_LAGRANGIAN_JIT=0 forbids compiling"),
    ({"CXX": "false"}, "compiling it from"),  # a compiler that fails at once
], ids=["jit-disabled", "broken-compiler"])
def test_forced_fallback_warns_exactly_once(installed_wheel, how, expected_reason):
    python, work = installed_wheel
    fresh_cache = work / f"extensions-{'-'.join(how)}"  # nothing cached: the compiler really runs
    probe, stderr = _run_probe(python, work, TORCH_EXTENSIONS_DIR=str(fresh_cache), **how)
    assert probe["picks"] == ["reference"] * 3
    assert stderr.count(FALLBACK_MESSAGE) == 1, stderr
    assert expected_reason in stderr and "fused-lagrangian info" in stderr, stderr
