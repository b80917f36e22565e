"""Which constraints of a large block the steps have moved: what makes ``report()`` O(touched), not O(K).

A step changes only the multipliers of the ids it is given, so every multiplier outside the touched set
still holds the block's ``init``, and the report's statistics (mean, max |lambda|, nonzero count) follow
from the touched multipliers alone.  The set is kept by the optimizer's eager steps: each step's ids are
queued by reference (O(1)), and merged into a sorted id tensor (torch.unique, O(queued log queued)) at
``report()`` or when the queue outgrows its budget, so the step never pays O(K).

The set is trusted only while it provably covers every change.  Anything else that writes the multipliers
(``load_state_dict``, a user's in-place edit, a compiled step, a CUDA-graph replay) is either seen by the
tensor's version counter, which makes the next report rebuild the set from the multipliers (one O(K) pass),
or, where no Python runs at all (graph capture), switches the block to full scans for good.  Blocks below
``TRACK_FROM`` constraints and dense blocks (all K touched every step) are scanned whole: cheaper than any
bookkeeping.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Under 2^16 multipliers a full scan costs microseconds: no tracking, no per-step cost.
TRACK_FROM = 1 << 16
# Reading a touched multiplier is a random access (~16 ns on these CPUs), a scan reads all K in sequence
# (~0.5 ns each for the three statistics): past about K / 32 touched ids the scan is the cheaper read.
SCAN_FRACTION = 1 / 32


class TouchedConstraints:
    """The ids a block's steps have touched, or None when the whole block must be scanned."""

    def __init__(self, multipliers: Tensor, init: float) -> None:
        self.num_constraints = multipliers.numel()
        self.init = init
        self._scan_above = max(1, int(self.num_constraints * SCAN_FRACTION))
        self._known = torch.empty(0, dtype=torch.int64)
        self._queued: list[Tensor] = []
        self._queued_entries = 0
        # The multipliers' (storage, version) after the last step (at creation: all at init, nothing touched).
        self._version = _version(multipliers)
        self._stale = self._version is None  # something unseen may have changed the multipliers: rebuild at a read
        # For good: the set outgrew what a scan costs, or steps run with no Python to see them (graph replays).
        self._scan_only = False

    def invalidate(self) -> None:
        """A step this object cannot follow ran (a compiled one): the next read rebuilds the set."""
        self._stale = True

    def before_step(self, multipliers: Tensor) -> None:
        stamp = _version(multipliers)
        if stamp is None or stamp != self._version:
            self._stale = True  # written since the last step (or since creation) by someone else

    def after_step(self, ids: Tensor, multipliers: Tensor) -> None:
        """Queues this step's ids by reference (padding and duplicates included, dropped at the merge)."""
        if self._scan_only:
            return
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            self._scan_only = True  # replays move multipliers without running this code
            self._queued.clear()
            return
        self._version = _version(multipliers)
        if self._stale:
            return  # the next read rebuilds from the multipliers anyway
        self._queued.append(ids)
        self._queued_entries += ids.numel()
        if self._queued_entries > self._scan_above:  # bounds the queue's memory by K / 32 ids
            if ids.device.type == "cpu":
                self._merge()  # amortised: each queued id is sorted about twice
            else:
                self._stale = True  # a merge would synchronise the stream; the next read rebuilds
                self._queued.clear()
                self._queued_entries = 0

    def ids(self, multipliers: Tensor) -> Optional[Tensor]:
        """The sorted touched ids on ``multipliers``' device, or None when a full scan is the way to read."""
        if not self._scan_only:
            stamp = _version(multipliers)
            if self._stale or stamp is None or stamp != self._version:
                self._rebuild(multipliers)
            else:
                self._merge()
        return None if self._scan_only else self._known.to(multipliers.device)

    def _merge(self) -> None:
        if not self._queued:
            return
        device = self._queued[0].device
        merged = torch.cat([self._known.to(device), *(ids.reshape(-1) for ids in self._queued)])
        self._keep(torch.unique(merged[merged >= 0]))  # sorted; drops the -1 padding of (B, M) ids

    def _rebuild(self, multipliers: Tensor) -> None:
        self._keep(torch.nonzero(multipliers != self.init).reshape(-1))
        self._stale = False
        self._version = _version(multipliers)

    def _keep(self, known: Tensor) -> None:
        self._queued.clear()
        self._queued_entries = 0
        self._known = known
        if known.numel() > self._scan_above:
            self._scan_only = True
            self._known = known[:0]


def _version(tensor: Tensor) -> Optional[tuple[int, int]]:
    """The tensor's storage and version: changes when anything writes it in place or replaces it."""
    try:
        return tensor.data_ptr(), tensor._version
    except RuntimeError:  # inference tensors keep no version counter: treat every read as stale
        return None


def multiplier_summary(multipliers: Tensor, touched: Optional[Tensor], init: float) -> tuple[float, float, int]:
    """(mean, max |lambda|, nonzero count) over all K multipliers, reading only ``touched`` when given."""
    k = multipliers.numel()
    if touched is None:
        lowest, highest = torch.aminmax(multipliers)  # no K-sized temporary, unlike multipliers.abs()
        return (float(multipliers.mean()), max(abs(float(lowest)), abs(float(highest))),
                int(torch.count_nonzero(multipliers)))
    values = multipliers[touched]
    untouched = k - values.numel()
    largest = abs(init) if untouched else 0.0
    if values.numel():
        lowest, highest = torch.aminmax(values)
        largest = max(largest, abs(float(lowest)), abs(float(highest)))
    total = float(values.sum(dtype=torch.float64)) + untouched * init
    nonzero = int(torch.count_nonzero(values)) + (untouched if init != 0 else 0)
    return total / k, largest, nonzero
