"""The block forward path: package layout (no import circles), input ownership and precision, deferred
checks, multi-membership groups, O(batch) group totals."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import fused_lagrangian
from fused_lagrangian import ConstraintInputError, LagrangianSGD
from fused_lagrangian.grouping import segments

PACKAGE = Path(fused_lagrangian.__file__).parent
# The apps that still live inside the package while they move out (issue #15): their own import
# circles (demo <-> demo_plots) are not the library's.  Drop this once they are gone.
APPS = ("demo", "demo_plots", "examples", "cli", "benchmarks", "data")


# --------------------------------------------------------------------------------------------------
# Layout


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Package modules that ``name`` imports, anywhere in the file (TYPE_CHECKING blocks and functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{alias.name}" for alias in node.names} & modules
            # ``from package import submodule`` imports the submodule (and the package, which runs first).
            found.update(submodules or {module})
    return {m for m in found if m == "fused_lagrangian" or m.startswith("fused_lagrangian.")}


def test_the_package_import_graph_has_no_cycle():
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = {name: path for name, path in modules.items() if name.split(".")[1:2] not in [[app] for app in APPS]}
    graph = {name: sorted(m for m in _imports(path, name, set(modules)) if m in modules and m != name)
             for name, path in modules.items()}
    visiting, done = [], set()

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycle = visiting[visiting.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(node)
        for target in graph[node]:
            if target != "fused_lagrangian":  # everything imports the package root; it imports the API
                visit(target)
        visiting.pop()
        done.add(node)

    for node in graph:
        visit(node)
    assert "fused_lagrangian.constraints" in graph and "fused_lagrangian.distributed" in graph
    assert "fused_lagrangian.constraints" not in graph["fused_lagrangian.distributed"]
    assert "fused_lagrangian.optim" not in graph["fused_lagrangian.constraints"]


# --------------------------------------------------------------------------------------------------
# Inputs: owned ids, fp32-or-wider violations, finiteness of what the step uses


def _optimizer(backend="reference"):
    param = torch.zeros(2, requires_grad=True)
    return LagrangianSGD([param], lr=0.1, backend=backend), param


def _step(optimizer, param, term):
    (param.sum() + term).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_recorded_ids_do_not_alias_the_callers_buffer(backend, dtype):
    optimizer, param = _optimizer(backend)
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=4, dual_lr=1.0)
    ids = torch.tensor([0, 1], dtype=dtype)
    term = block(torch.tensor([1.0, 2.0]), ids=ids)
    ids.fill_(3)  # the data loader reuses its buffer before step()
    _step(optimizer, param, term)
    torch.testing.assert_close(block.multipliers, torch.tensor([1.0, 2.0, 0.0, 0.0]))


def test_finite_float64_values_beyond_fp32_range_raise_and_change_nothing(backend):
    optimizer, param = _optimizer(backend)
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=4, dual_lr=1.0)
    with pytest.raises(ConstraintInputError, match="'rows'.*NaN or inf"):
        block(torch.tensor([1e39, 1.0], dtype=torch.float64), ids=torch.tensor([0, 1]))
    assert not block.has_pending and torch.equal(block.multipliers, torch.zeros(4))


def test_fp16_values_with_a_bound_outside_fp16_range_are_measured_in_fp32(backend):
    optimizer, param = _optimizer(backend)
    block = optimizer.add_constraint("rows", kind="grouped", num_constraints=2, sense="==", bound=1e5, dual_lr=1e-5)
    values = torch.tensor([1.0, 3.0], dtype=torch.float16, requires_grad=True)
    term = block(values, ids=torch.tensor([0, 1]))
    assert term.dtype == torch.float32 and math.isfinite(term.item())
    _step(optimizer, param, term)
    torch.testing.assert_close(block.multipliers, 1e-5 * torch.tensor([1.0 - 1e5, 3.0 - 1e5]))


# --------------------------------------------------------------------------------------------------
# Deferred checks


def _snapshot(optimizer, param):
    return [param.detach().clone()] + [b.multipliers.clone() for b in optimizer.constraints.values()]


def test_deferred_checks_raise_at_the_step_on_the_cpu_and_change_nothing(backend):
    optimizer, param = _optimizer(backend)
    optimizer.validation = "deferred"
    rows = optimizer.add_constraint("rows", kind="indexed", num_constraints=4, dual_lr=1.0)
    dense = optimizer.add_constraint("dense", num_constraints=2, dual_lr=1.0)
    _step(optimizer, param, rows(torch.tensor([1.0]), ids=torch.tensor([1])) + dense(torch.tensor([1.0, -1.0])))
    before = _snapshot(optimizer, param)
    term = rows(torch.tensor([1.0, 2.0]), ids=torch.tensor([0, 4]))  # no error yet: the verdict stays on device
    term = term + dense(torch.tensor([0.5, 0.5]))
    (param.sum() + term).backward()
    with pytest.raises(ConstraintInputError, match="'rows'.*out of range"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(optimizer, param), before))
    assert not rows.has_pending and not dense.has_pending
    optimizer.zero_grad()
    _step(optimizer, param, rows(torch.tensor([1.0]), ids=torch.tensor([2])))
    assert rows.multipliers[2] == 1.0


def test_deferred_nonfinite_skip_skips_the_whole_step_and_is_counted(backend):
    optimizer, param = _optimizer(backend)
    optimizer.validation = "deferred"
    rows = optimizer.add_constraint("rows", kind="indexed", num_constraints=4, dual_lr=1.0, nonfinite="skip")
    before = _snapshot(optimizer, param)
    _step(optimizer, param, rows(torch.tensor([1.0, math.nan]), ids=torch.tensor([0, 1])))
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(optimizer, param), before))
    assert optimizer.report()["rows"]["nonfinite_skipped"] == 1


def test_deferred_errors_of_compiled_steps_raise_at_report(backend):
    """Where the step cannot read the verdict (compiled, or an accelerator), report() raises it."""
    optimizer, param = _optimizer(backend)
    rows = optimizer.add_constraint("rows", kind="indexed", num_constraints=4, dual_lr=1.0)
    optimizer.validation = "deferred"
    rows(torch.tensor([1.0]), ids=torch.tensor([7]))
    with pytest.raises(ConstraintInputError, match="'rows'.*out of range"):
        optimizer.report()
    optimizer.report()  # raised once: the verdict was read


# --------------------------------------------------------------------------------------------------
# Groups: O(batch) totals and multi-membership


@pytest.mark.parametrize("num_constraints", [3, 10**9])
def test_segments_count_and_sum_per_id_with_batch_sized_buffers(num_constraints):
    ids = torch.tensor([2, 0, 2, 1, 2])
    groups = segments(ids, num_constraints)
    assert groups.counts.numel() <= ids.numel()
    torch.testing.assert_close(groups.per_entry(groups.counts), torch.tensor([3.0, 1.0, 3.0, 1.0, 3.0]))
    sums = groups.per_entry(groups.sums(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])))
    torch.testing.assert_close(sums, torch.tensor([9.0, 2.0, 9.0, 4.0, 9.0]))
    occupied = groups.counts > 0
    assert sorted(groups.ids[occupied].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("to_overall", [False, True])
def test_multi_membership_groups_closed_form(backend, to_overall):
    optimizer, param = _optimizer(backend)
    block = optimizer.add_constraint("groups", kind="grouped", num_constraints=4, bound=torch.tensor([0.0, 0.5, 1.0, 0.0]),
                                     dual_lr=0.5, to_overall=to_overall)
    # sample 0 in groups 0 and 1, sample 1 in group 1, sample 2 in groups 2 and 0; group 3 untouched
    ids = torch.tensor([[0, 1], [1, -1], [2, 0]])
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    mean = 2.0 if to_overall else 0.0  # over the 3 samples, not the 5 memberships
    g = [(1 + 3) / 2 - mean, (1 + 2) / 2 - mean - 0.5, 3 - mean - 1.0, 0.0]
    _step(optimizer, param, block(values, ids=ids))
    expected = torch.tensor([max(0.0, 0.5 * gk) for gk in g])
    torch.testing.assert_close(block.multipliers, expected)

    values.grad = None
    block(values, ids=ids).backward()
    lam = expected.tolist()
    touched = lam[0] + lam[1] + lam[2]
    grad = [lam[0] / 2 + lam[1] / 2, lam[1] / 2, lam[2] + lam[0] / 2]
    if to_overall:
        grad = [x - touched / 3 for x in grad]
    torch.testing.assert_close(values.grad, torch.tensor(grad))


def test_multi_membership_equals_the_flattened_pairs(backend):
    """(B, M) ids give the same multipliers as the (sample, group) pairs passed one per row."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, (40, 3), generator=generator)
    values = torch.rand(40, generator=generator)
    keep = ids >= 0
    runs = []
    for multi in (True, False):
        optimizer, param = _optimizer(backend)
        block = optimizer.add_constraint("groups", kind="grouped", num_constraints=6, bound=0.5, dual_lr=0.5,
                                         sense="==")
        term = block(values, ids=ids) if multi else block(values.unsqueeze(1).expand_as(ids)[keep], ids=ids[keep])
        _step(optimizer, param, term)
        runs.append(block.multipliers)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)
    assert (runs[0] != 0).sum() >= 5


def test_multi_membership_ids_out_of_range_raise(backend):
    optimizer, _ = _optimizer(backend)
    block = optimizer.add_constraint("groups", kind="grouped", num_constraints=3)
    with pytest.raises(ConstraintInputError, match="'groups'.*out of range"):
        block(torch.ones(2), ids=torch.tensor([[0, -2], [1, -1]]))
    with pytest.raises(ConstraintInputError, match="'groups'.*out of range"):
        block(torch.ones(2), ids=torch.tensor([[0, 3], [1, -1]]))
