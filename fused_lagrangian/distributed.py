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

Forward (each block call with grad enabled): one all_reduce of a small float64 buffer, which carries

* how many ranks got invalid or non-finite input: all ranks raise together (or, with
  ``nonfinite="skip"``, all skip the call and count it), so none diverges or hangs in a collective;
* grouped blocks: per-group sample counts n_k of the global batch;
* ``to_overall``: the global sums of the values (and dual values): the overall mean is the global one;
* augmented / penalty / quadratic grouped and dense blocks: per-constraint sums of the values.

Primal terms, for wrappers that average gradients over the W ranks (DDP; FSDP2's default):

* indexed: W x the local sum, so the average is the global sum;
* grouped: local samples weighted W / n_k with global counts; ``to_overall`` adds the gradient of the
  global mean, which the other ranks' samples depend on too;
* dense: a rank's values are its estimate of the constraint (e.g. a mean over its shard); the global
  estimate is the average of the ranks' estimates, which is what the dual update sees (mean over
  the gathered samples) and what the averaged gradient of the local Lagrangian term is;
* other formulations: the penalty of the global estimate (grouped, dense); indexed blocks assume an id
  is seen by one rank per step (true with DistributedSampler), else the penalty is per rank.

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

import dataclasses
import sys
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .constraints import SENSES, ConstraintInputError
from .ops import lagrangian_term

if TYPE_CHECKING:
    from .constraints import ConstraintBlock
    from .optim import LagrangianOptimizer

CONSTRAINTS_KEY = "constraints"


def data_parallel_group(process_group) -> Optional["DataParallelGroup"]:
    """The ranks to keep in step, or None when there is only one (not initialised, or a 1-rank group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size(process_group)
    return DataParallelGroup(process_group, world_size) if world_size > 1 else None


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


@dataclasses.dataclass
class _GlobalTotals:
    """What one all_reduce at a block call tells every rank about the global batch (float64)."""

    counts: Optional[Tensor]  # grouped: samples per group
    value_sum: Optional[Tensor]  # to_overall: sum of values, of dual values
    dual_value_sum: Optional[Tensor]
    sums: Optional[Tensor]  # non-Lagrangian grouped / dense: per-constraint sums of the values


class DataParallelGroup:
    """The collectives that keep one optimizer's blocks consistent over a process group."""

    def __init__(self, process_group, world_size: int) -> None:
        self.process_group = process_group
        self.world_size = world_size

    # ----------------------------------------------------------------------------------------------
    # Step: gather every block's pending samples from every rank.

    def gather_pending(self, blocks: list["ConstraintBlock"],
                       pending: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """All ranks' (ids, violations) of each block, in rank order; the same lists on every rank."""
        device = blocks[0].device
        sizes = torch.tensor([ids.numel() for ids, _ in pending], dtype=torch.int64, device=device)
        rank_sizes = self._all_gather(sizes)
        table = torch.stack(rank_sizes).tolist()  # [rank][block]
        longest = max(sum(row) for row in table)
        if longest == 0:
            return pending
        payload = torch.zeros(2 * longest, dtype=torch.float64, device=device)
        local = [t.to(device, torch.float64) for ids, violations in pending for t in (ids, violations)]
        if local:
            flat = torch.cat(local)
            payload[: flat.numel()] = flat
        rank_payloads = self._all_gather(payload)
        per_block: list[list[tuple[Tensor, Tensor]]] = [[] for _ in blocks]
        for row, buffer in zip(table, rank_payloads):
            offset = 0
            for samples, n in zip(per_block, row):
                samples.append((buffer[offset : offset + n], buffer[offset + n : offset + 2 * n]))
                offset += 2 * n
        return [
            (torch.cat([ids for ids, _ in samples]).to(block.device, torch.int64),
             torch.cat([v for _, v in samples]).to(block.device, torch.float32))
            for block, samples in zip(blocks, per_block)
        ]

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor, group=self.process_group)
        return gathered

    # ----------------------------------------------------------------------------------------------
    # Forward: a block call, agreed on by all ranks.

    def block_call(self, block: "ConstraintBlock", values: Tensor, ids: Optional[Tensor],
                   dual_values: Optional[Tensor]) -> Tensor:
        """``ConstraintBlock.__call__`` under data parallelism (see the module docstring)."""
        spec = block.spec
        local_error: Optional[ConstraintInputError] = None
        try:
            ids = block._validate(values, ids, dual_values)
        except ConstraintInputError as error:
            local_error = error
        invalid_ranks, nonfinite_ranks, totals = self._all_reduce_totals(block, values, ids, dual_values,
                                                                         valid=local_error is None)
        if invalid_ranks:
            raise local_error or ConstraintInputError(
                f"constraint block {spec.name!r} ({spec.kind}): invalid input on {invalid_ranks} other rank(s)")
        if nonfinite_ranks:
            if spec.nonfinite == "raise":
                raise ConstraintInputError(
                    f"constraint block {spec.name!r} ({spec.kind}): values contain NaN or inf on "
                    f"{nonfinite_ranks} of {self.world_size} ranks (pass nonfinite='skip' to skip such "
                    "updates on every rank and count them in report())")
            block.nonfinite_skipped += 1
            return torch.zeros((), dtype=values.dtype, device=values.device)
        mean = dual_mean = None
        if spec.to_overall:
            total = totals.counts.sum()
            mean = (totals.value_sum / total).to(values.dtype)
            dual_mean = (totals.dual_value_sum / total).to(values.dtype)
        violations = block._signed_violation(values, ids, mean)
        dual_source = violations if dual_values is None else block._signed_violation(dual_values, ids, dual_mean)
        block._record(ids, dual_source)
        return self._primal_term(block, values, violations, ids, totals, mean)

    def _all_reduce_totals(self, block: "ConstraintBlock", values: Tensor, ids: Optional[Tensor],
                           dual_values: Optional[Tensor], valid: bool) -> tuple[int, int, _GlobalTotals]:
        """One all_reduce: [invalid, non-finite] rank counts, then the totals the block's kind needs."""
        spec = block.spec
        k = spec.num_constraints
        device = block.device
        wants_counts = spec.kind == "grouped"
        wants_sums = spec.formulation != "lagrangian" and spec.kind != "indexed"
        sizes = [2, k if wants_counts else 0, 2 if spec.to_overall else 0, k if wants_sums else 0]
        if valid:
            v = values.detach().double()
            nonfinite = ~torch.isfinite(v).all()
            if dual_values is not None:
                nonfinite |= ~torch.isfinite(dual_values.detach()).all()
            parts = [torch.stack([torch.zeros((), dtype=torch.float64, device=device), nonfinite.double()])]
            if wants_counts:
                parts.append(torch.bincount(ids, minlength=k).double())
            if spec.to_overall:
                dual_sum = dual_values.detach().double().sum() if dual_values is not None else v.new_zeros(())
                parts.append(torch.stack([v.sum(), dual_sum]))
            if wants_sums:
                per_constraint = v if spec.kind == "dense" else v.new_zeros(k).index_add_(0, ids, v)
                parts.append(per_constraint)
            buffer = torch.cat(parts)
        else:
            buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
            buffer[0] = 1.0
        dist.all_reduce(buffer, group=self.process_group)
        status, counts, overall, sums = buffer.split(sizes)
        invalid_ranks, nonfinite_ranks = (int(x) for x in status.tolist())
        totals = _GlobalTotals(
            counts=counts if wants_counts else None,
            value_sum=overall[0] if spec.to_overall else None,
            dual_value_sum=overall[1] if spec.to_overall else None,
            sums=sums if wants_sums else None,
        )
        return invalid_ranks, nonfinite_ranks, totals

    # ----------------------------------------------------------------------------------------------
    # Primal terms whose gradient, averaged over the ranks, is the global batch's.

    def _primal_term(self, block: "ConstraintBlock", values: Tensor, violations: Tensor, ids: Tensor,
                     totals: _GlobalTotals, mean: Optional[Tensor]) -> Tensor:
        spec = block.spec
        world = self.world_size
        if spec.formulation == "lagrangian":
            if spec.kind == "dense":
                return lagrangian_term(violations, ids, block.multipliers)
            if spec.kind == "indexed":
                return world * lagrangian_term(violations, ids, block.multipliers)
            weights = (world / totals.counts[ids]).to(violations.dtype)
            term = lagrangian_term(violations, ids, block.multipliers, weights)
            if spec.to_overall:
                term = term + self._overall_mean_gradient(block, values, totals.counts)
            return term
        if spec.kind == "indexed":
            touched, g = block._per_constraint(violations, ids)
            return world * block._penalty_term(block.multipliers[touched].to(g.dtype), g)
        touched, g = self._global_estimates(block, values, violations, ids, totals, mean)
        term = block._penalty_term(block.multipliers[touched].to(g.dtype), g)
        # The value is the global penalty on every rank; the gradient is W x this rank's part of it.
        return term.detach() + world * (term - term.detach())

    def _overall_mean_gradient(self, block: "ConstraintBlock", values: Tensor, counts: Tensor) -> Tensor:
        """Zero-valued term with the gradient of the global mean in sum_k lambda_k (mean_k - mean - b_k).

        d/dv_i of that sum is s (lambda_k(i) / n_k(i) - sum_{k touched} lambda_k / N): the second part
        involves every rank's groups, so it cannot come from this rank's samples' autograd alone.
        """
        touched_multipliers = block.multipliers[counts > 0].sum().to(values.dtype)
        local_sum = values.sum()
        scale = -SENSES[block.spec.sense] * self.world_size * touched_multipliers / counts.sum().to(values.dtype)
        return scale * (local_sum - local_sum.detach())

    def _global_estimates(self, block: "ConstraintBlock", values: Tensor, violations: Tensor, ids: Tensor,
                          totals: _GlobalTotals, mean: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-constraint estimates g_k of the global batch, differentiable in this rank's values."""
        spec = block.spec
        if spec.kind == "dense":
            touched = block._dense_ids()
            estimate = (totals.sums / self.world_size).to(values.dtype)
            return touched, block._signed_violation(estimate + (values - values.detach()) / self.world_size, touched)
        counts = totals.counts
        touched = torch.nonzero(counts).squeeze(1)
        n = counts[touched]
        g = block._signed_violation((totals.sums[touched] / n).to(values.dtype), touched, mean)
        local = torch.zeros(touched.numel(), dtype=violations.dtype, device=violations.device)
        local = local.index_add(0, torch.searchsorted(touched, ids), violations)
        g = g + (local - local.detach()) / n.to(violations.dtype)
        if spec.to_overall:
            local_sum = values.sum()
            g = g - SENSES[spec.sense] * (local_sum - local_sum.detach()) / counts.sum().to(values.dtype)
        return touched, g


# --------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint


def get_optimizer_state_dict(model: torch.nn.Module, optimizer: "LagrangianOptimizer", *, options=None) -> dict:
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict plus the blocks' state.

    The multipliers are replicated plain tensors, so ``dcp.save`` writes them once.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as torch_get

    state = torch_get(model, optimizer, options=options)
    state[CONSTRAINTS_KEY] = {name: block.state_dict() for name, block in optimizer.constraints.items()}
    return state


def set_optimizer_state_dict(model: torch.nn.Module, optimizer: "LagrangianOptimizer", optim_state_dict: dict,
                             *, options=None) -> None:
    """torch.distributed.checkpoint.state_dict.set_optimizer_state_dict plus the blocks' state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    primal = {key: value for key, value in optim_state_dict.items() if key != CONSTRAINTS_KEY}
    constraints = optim_state_dict[CONSTRAINTS_KEY]
    optimizer._check_constraint_blocks(constraints)
    torch_set(model, optimizer, primal, options=options)
    for name, block_state in constraints.items():
        optimizer.constraints[name].load_state_dict(block_state)
