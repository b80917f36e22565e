"""Large per-constraint state is advised for transparent huge pages (Linux), and holds the right values."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fused_lagrangian import LagrangianSGD
from fused_lagrangian import memory
from fused_lagrangian.memory import MIN_ADVISED_BYTES

THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def vm_flags_of(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(THP_SETTING)
                    or "[never]" in open(THP_SETTING).read(), reason="needs Linux with transparent huge pages")
def test_large_multipliers_and_dual_state_are_advised_for_huge_pages():
    optimizer = LagrangianSGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    k = 2 * MIN_ADVISED_BYTES // 4
    block = optimizer.add_constraint("rows", kind="indexed", num_constraints=k, dual_rule="nupi", init=0.5)
    for tensor in (block.multipliers, block.dual_state):
        middle = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2
        assert "hg" in vm_flags_of(middle)
    assert torch.equal(block.multipliers, torch.full((k,), 0.5)) and not block.dual_state.any()


def test_only_state_of_at_least_the_threshold_is_advised(monkeypatch):
    advised = []
    monkeypatch.setattr(memory, "advise_huge_pages", lambda tensor: advised.append(tensor.numel()))
    optimizer = LagrangianSGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    k = MIN_ADVISED_BYTES // 4
    optimizer.add_constraint("few", kind="indexed", num_constraints=k - 1, dual_rule="nupi")
    assert advised == []
    optimizer.add_constraint("many", kind="indexed", num_constraints=k, dual_rule="nupi")
    assert advised == [k, k]
