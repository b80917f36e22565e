"""Huge-page advice for large per-constraint state on CPU.

A block of 10^8 per-sample constraints is read at random, a few thousand entries per step.  With 4 KB
pages every one of those reads also misses the TLB and walks the page table; 2 MB transparent huge
pages remove most of those walks (the native dual pass at K = 10^8, batch 4096 on this project's 2-core
VM: ~190 µs with 4 KB pages, ~150 µs with huge pages).  Linux gives them to memory marked with
``madvise(MADV_HUGEPAGE)`` before it is first touched; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional

import torch
from torch import Tensor

HUGE_PAGE_BYTES = 2 << 20
# Below this an array spans few huge pages and fits the TLB's reach anyway.
MIN_ADVISED_BYTES = 16 << 20


def _madvise():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


_MADVISE = _madvise()


def advise_huge_pages(tensor: Tensor) -> bool:
    """Marks the whole huge pages inside ``tensor``'s memory for THP; True when the kernel took the advice."""
    if _MADVISE is None or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = (start + HUGE_PAGE_BYTES - 1) & ~(HUGE_PAGE_BYTES - 1)
    last = end & ~(HUGE_PAGE_BYTES - 1)
    return last > first and _MADVISE(first, last - first, mmap.MADV_HUGEPAGE) == 0


def constraint_state(num_constraints: int, fill: float, device: torch.device) -> Tensor:
    """A (num_constraints,) float32 tensor of ``fill``; large CPU ones advised for huge pages first."""
    tensor = torch.empty(num_constraints, dtype=torch.float32, device=device)
    if tensor.numel() * tensor.element_size() >= MIN_ADVISED_BYTES:
        advise_huge_pages(tensor)  # before the fill below first touches the pages
    return tensor.fill_(fill)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation on ``device`` can take (None: unknown), to refuse hopeless ones before trying."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                fields = dict(line.split(":", 1) for line in meminfo)
            # Not counting swap: a block that only fits there would thrash rather than fail.
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None
