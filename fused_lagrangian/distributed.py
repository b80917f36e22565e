r"""Data-parallel training (DDP, FSDP2): every rank applies the same dual update, and the blocks' terms
give the global-batch gradient once the wrapper has averaged the gradients over the ranks.

Nothing to call: when torch.distributed is initialised and the optimizer's ``process_group`` (the
default group when None) has W > 1 ranks, the optimizer and its blocks do the following.

Step (every ``step()`` and every dual-first update): two all_gathers for all blocks together, the
per-block sample counts, then one padded float64 buffer with every block's pending (id, violation)
pairs (ids are exact below 2**53, fp32 violations exactly).  Each rank then runs ``fused_step`` on the
same samples in rank order: the same inputs to the same deterministic kernel, so multipliers and dual
state stay bitwise identical, and equal to one process fed the ranks' batches concatenated (a backend
whose summation order varies from run to run, e.g. float atomics on a GPU, would lose the bitwise
part: such a backend must reduce deterministically).  Raw
samples rather than per-constraint sums and counts because indexed blocks have up to 10**8
constraints and a step touches a few thousand: the exchange is O(global batch), never O(K), and the
kernel's own reduction (sum or mean per id) stays the one definition of the estimate.

Forward (each block call with grad enabled): the block math is ``formulation.py``'s, for any world size;
this module only supplies its ``Reduction``: one all_reduce of the [invalid, non-finite] rank counts,
so all ranks raise together (or, with ``nonfinite="skip"``, all skip the call and count it) and none
diverges or hangs in a collective; for grouped blocks two all_gathers of the (group id, value) entries,
from which each rank takes the global count (and sum) of its entries' groups: O(global batch), never
O(K); small all_reduces for ``to_overall`` (global sums and sample count) and dense penalties.  Data
checks are therefore always read on the host under data parallelism (validation.py's eager mode).

A term's value on a rank is an estimate whose mean over the ranks is the global term.  Blocks called
with grad disabled (evaluation, maybe on one rank only) stay local: no collective, nothing recorded.
With grad enabled, every rank must call the same blocks in the same order (as DDP's own collectives
require).  ``process_group=`` of the optimizers names the ranks to keep in step; a one-rank group
(``dist.new_group([rank])``) turns the exchange off.

FSDP2 (``fully_shard``): parameters, gradients and optimizer state are DTensors; the step runs on their
local shards in place and the state is created with ``zeros_like`` of the parameter, so it stays
sharded.  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` wrap torch.distributed.checkpoint's
functions (which keep only torch's "state" and "param_groups") and add the blocks' state.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .grouping import segments

CONSTRAINTS_KEY = "constraints"


def data_parallel_reduction(process_group) -> Optional[DataParallelReduction]:
    """The reduction over the ranks to keep in step, or None when there is only one (not initialised, or a
    1-rank group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size(process_group)
    return DataParallelReduction(process_group, world_size) if world_size > 1 else None


def local_shards(lists: tuple) -> tuple:
    """The primal lists of ``contract.py`` with every DTensor (FSDP2) replaced by its local shard.

    ``to_local()`` aliases the shard's storage, so the kernel's in-place update is the DTensor's update.
    """
    # Importing torch.distributed.tensor costs seconds; if nobody imported it, no DTensor exists.
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not any(isinstance(p, module.DTensor) for p in lists[0]):
        return lists
    tensors, rest = lists[:6], lists[6:]
    return tuple([t.to_local() if isinstance(t, module.DTensor) else t for t in entries]
                 for entries in tensors) + tuple(rest)


class DataParallelReduction:
    """``formulation.Reduction`` over a process group: the collectives, and nothing of the block math."""

    is_local = False

    def __init__(self, process_group, world_size: int) -> None:
        self.process_group = process_group
        self.world_size = world_size

    def sum(self, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total, group=self.process_group)
        return total

    agree = sum

    def group_totals(self, ids: Tensor, num_constraints: int, dtype: torch.dtype,
                     values: Optional[Tensor] = None, padded: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Gathers every rank's (id, value) entries, O(global batch), never a K-sized buffer."""
        columns = [ids.double()] + ([] if values is None else [values.double()])
        all_columns, offset = self._gather_rows(torch.stack(columns, 1))
        groups = segments(all_columns[:, 0].long(), num_constraints, torch.float64, padded=padded)
        mine = groups.of_entry[offset : offset + ids.numel()]
        counts = groups.counts[mine].to(dtype)
        sums = None if values is None else groups.sums(all_columns[:, 1])[mine].to(dtype)
        return counts, sums

    def _gather_rows(self, rows: Tensor) -> tuple[Tensor, int]:
        """Every rank's rows, in rank order, and where this rank's start."""
        sizes = torch.cat(self._all_gather(torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)))
        sizes = sizes.tolist()
        padded = rows.new_zeros(max(sizes), rows.shape[1])
        padded[: rows.shape[0]] = rows
        gathered = self._all_gather(padded)
        rank = dist.get_rank(self.process_group)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sum(sizes[:rank])

    def gather_pending(self, pending: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """All ranks' (ids, violations) of each block, in rank order; the same lists on every rank."""
        device = pending[0][0].device
        sizes = torch.tensor([ids.numel() for ids, _ in pending], dtype=torch.int64, device=device)
        table = torch.stack(self._all_gather(sizes)).tolist()  # [rank][block]
        longest = max(sum(row) for row in table)
        if longest == 0:
            return pending
        payload = torch.zeros(2 * longest, dtype=torch.float64, device=device)
        local = [t.to(device, torch.float64) for ids, violations in pending for t in (ids, violations)]
        if local:
            flat = torch.cat(local)
            payload[: flat.numel()] = flat
        rank_payloads = self._all_gather(payload)
        per_block: list[list[tuple[Tensor, Tensor]]] = [[] for _ in pending]
        for row, buffer in zip(table, rank_payloads):
            offset = 0
            for samples, n in zip(per_block, row):
                samples.append((buffer[offset : offset + n], buffer[offset + n : offset + 2 * n]))
                offset += 2 * n
        return [
            (torch.cat([ids for ids, _ in samples]).to(own_ids.device, torch.int64),
             torch.cat([v for _, v in samples]).to(own_ids.device, torch.float32))
            for (own_ids, _), samples in zip(pending, per_block)
        ]

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor, group=self.process_group)
        return gathered


# --------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint


def get_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, options=None) -> dict:
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict plus the blocks' state.

    The multipliers are replicated plain tensors, so ``dcp.save`` writes them once.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as torch_get

    state = torch_get(model, optimizer, options=options)
    state[CONSTRAINTS_KEY] = {name: block.state_dict() for name, block in optimizer.constraints.items()}
    return state


def set_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_state_dict: dict,
                             *, options=None) -> None:
    """torch.distributed.checkpoint.state_dict.set_optimizer_state_dict plus the blocks' state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    primal = {key: value for key, value in optim_state_dict.items() if key != CONSTRAINTS_KEY}
    constraints = optim_state_dict[CONSTRAINTS_KEY]
    optimizer._check_constraint_blocks(constraints)
    torch_set(model, optimizer, primal, options=options)
    for name, block_state in constraints.items():
        optimizer.constraints[name].load_state_dict(block_state)
