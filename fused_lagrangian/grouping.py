"""Per-constraint totals of a batch of (constraint id, value) entries in O(batch), with static shapes.

Entries with the same id form a segment.  Two layouts, both sized by the batch, never by the number of
constraints K beyond it:

* K <= number of entries: a K-slot table indexed by the id itself (one ``index_add``, no sort);
* otherwise: the entries sorted by id, one slot per run of equal ids (slots past the last run are empty).

Shapes never depend on the data (no ``unique``, ``nonzero`` or ``bincount``), so torch.compile traces it
without graph breaks and nothing reads back to the host.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass
class Segments:
    of_entry: Tensor  # (P,) slot of each entry
    ids: Optional[Tensor]  # (S,) constraint id of each slot (meaningful where counts > 0)
    counts: Tensor  # (S,) entries per slot, in the dtype the caller asked for

    def sums(self, values: Tensor) -> Tensor:
        """(S,) sum of ``values`` (one per entry) over each slot; differentiable in ``values``."""
        return torch.zeros(self.counts.numel(), dtype=values.dtype, device=values.device).index_add(
            0, self.of_entry, values)

    def per_entry(self, per_slot: Tensor) -> Tensor:
        """Each entry's value of a per-slot quantity."""
        return per_slot[self.of_entry]


def segments(ids: Tensor, num_constraints: int, count_dtype: torch.dtype = torch.float32,
             with_ids: bool = True, padded: bool = False) -> Segments:
    """Groups ``ids`` (1-D, values in [0, num_constraints)) into segments of equal id.

    ``with_ids=False``: the caller needs counts and sums only (``Segments.ids`` may then be None).
    ``padded``: ids may also be -1, padding entries (contract.PADDING_ID) that belong to no constraint:
    they form a segment of their own, of id -1 (the sorted layout; the table one has no slot for them).
    """
    num_entries = ids.numel()
    ones = torch.ones(num_entries, dtype=count_dtype, device=ids.device)
    if num_constraints <= num_entries and not padded:
        counts = torch.zeros(num_constraints, dtype=count_dtype, device=ids.device).index_add_(0, ids, ones)
        return Segments(ids, torch.arange(num_constraints, device=ids.device) if with_ids else None, counts)
    sorted_ids, order = torch.sort(ids)
    starts = torch.ones(num_entries, dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_of_sorted = torch.cumsum(starts, 0) - 1
    of_entry = torch.empty_like(slot_of_sorted).scatter_(0, order, slot_of_sorted)
    counts = torch.zeros(num_entries, dtype=count_dtype, device=ids.device).index_add_(0, slot_of_sorted, ones)
    # Every entry of a slot writes the same id, so the order of the writes does not matter.
    slot_ids = torch.zeros_like(sorted_ids).scatter_(0, slot_of_sorted, sorted_ids)
    return Segments(of_entry, slot_ids, counts)
