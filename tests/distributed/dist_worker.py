"""One rank of the distributed checks, and the problem they share with the single-process oracle.

Run as ``python dist_worker.py RANK WORLD_SIZE OUT_DIR SCENARIO...``: joins a gloo group through a file in
OUT_DIR, runs each scenario and saves what it observed to ``OUT_DIR/SCENARIO.rankR.pt`` for the test
process to compare across ranks and against ``reference_run`` (the same training, one process, the
ranks' batches concatenated).  A scenario that fails saves its traceback and stops this rank.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fused_lagrangian import ConstraintInputError, LagrangianAdam

NUM_SAMPLES = 256
NUM_FEATURES = 6
NUM_GROUPS = 4
GLOBAL_BATCH = 16
STEPS = 50
CHECKPOINT_STEP = 25
LR = 1e-2


# --------------------------------------------------------------------------------------------------
# The problem: a small MLP classifier with four blocks covering the kinds, formulations and orderings.


def dataset() -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
    groups = torch.randint(0, NUM_GROUPS, (NUM_SAMPLES,), generator=generator)
    logits = x @ torch.randn(NUM_FEATURES, generator=generator) + 0.8 * groups.float() - 1.0
    y = (torch.rand(NUM_SAMPLES, generator=generator) < torch.sigmoid(logits)).float()
    order = torch.randperm(NUM_SAMPLES, generator=generator)
    return {"x": x, "y": y, "groups": groups, "order": order}


def global_batch(data: dict, step: int, poison_steps: tuple[int, ...] = ()) -> dict:
    """Rows of step ``step``; at ``poison_steps`` the last rank's rows feed NaN to the parity block."""
    ids = data["order"][(step * GLOBAL_BATCH) % NUM_SAMPLES:][:GLOBAL_BATCH]
    poison = torch.zeros(GLOBAL_BATCH, dtype=torch.bool)
    if step in poison_steps:
        poison[GLOBAL_BATCH // 2:] = True
    return {"x": data["x"][ids], "y": data["y"][ids], "groups": data["groups"][ids], "ids": ids, "poison": poison}


def shard(batch: dict, rank: int, world_size: int) -> dict:
    size = GLOBAL_BATCH // world_size
    return {key: value[rank * size:(rank + 1) * size] for key, value in batch.items()}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 8), nn.Tanh(), nn.Linear(8, 1))


def add_blocks(optimizer: LagrangianAdam, nonfinite: str = "raise") -> None:
    optimizer.add_constraint("per_sample", kind="indexed", num_constraints=NUM_SAMPLES, bound=0.5, dual_lr=0.5,
                             dual_rule="nupi", kp=1.0, ki=1.0, nu=0.5, nonfinite=nonfinite)
    optimizer.add_constraint("parity", kind="grouped", num_constraints=NUM_GROUPS, bound=0.02, dual_lr=0.5,
                             to_overall=True, nonfinite=nonfinite)
    optimizer.add_constraint("mean_rate", kind="dense", num_constraints=1, sense="==", bound=0.4, dual_lr=0.5,
                             formulation="augmented", penalty=2.0, nonfinite=nonfinite)
    optimizer.add_constraint("group_floor", kind="grouped", num_constraints=NUM_GROUPS, sense=">=", bound=-0.05,
                             dual_lr=0.5, formulation="augmented", penalty=1.0, to_overall=True,
                             ordering="dual_first", nonfinite=nonfinite)


def train_step(model: nn.Module, optimizer: LagrangianAdam, batch: dict, observe_parity: bool = False) -> None:
    """observe_parity: the parity block only observes its values (no loss term)."""
    blocks = optimizer.constraints
    logits = model(batch["x"]).squeeze(1)
    rates = torch.sigmoid(logits)
    per_sample = F.binary_cross_entropy_with_logits(logits, batch["y"], reduction="none")
    parity_values = rates.masked_fill(batch["poison"], float("nan"))
    parity_arguments = dict(ids=batch["groups"], dual_values=(logits > 0).float())
    per_sample_term = blocks["per_sample"](per_sample, ids=batch["ids"])  # called first (test_bad_input)
    if observe_parity:
        blocks["parity"].observe(parity_values, **parity_arguments)
        parity_term = 0.0
    else:
        parity_term = blocks["parity"](parity_values, **parity_arguments)
    loss = (per_sample.mean()
            + per_sample_term
            + parity_term
            + blocks["mean_rate"](rates.mean().unsqueeze(0))
            + blocks["group_floor"](rates, ids=batch["groups"]))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(parameters: list[torch.Tensor], optimizer: LagrangianAdam) -> dict:
    return {
        "params": [p.detach().clone() for p in parameters],
        "multipliers": {name: b.multipliers.clone() for name, b in optimizer.constraints.items()},
        "dual_state": {name: b.dual_state.clone() for name, b in optimizer.constraints.items()},
        "report": optimizer.report(),
    }


def reference_run(poison_steps: tuple[int, ...] = (), nonfinite: str = "raise", observe_parity: bool = False) -> dict:
    """The oracle: one process, no torch.distributed, each step's global batch at once."""
    data = dataset()
    model = build_model()
    optimizer = LagrangianAdam(model.parameters(), lr=LR)
    add_blocks(optimizer, nonfinite)
    for step in range(STEPS):
        train_step(model, optimizer, global_batch(data, step, poison_steps), observe_parity)
    return snapshot(list(model.parameters()), optimizer)


# --------------------------------------------------------------------------------------------------
# Scenarios, run by every rank.


def scenario_ddp(rank: int, world_size: int, out_dir: str) -> dict:
    """50 DDP steps; rank 0 checkpoints at step 25; a fresh model and optimizer resume from it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = dataset()
    checkpoint = os.path.join(out_dir, "ddp_checkpoint.pt")

    def train(model: nn.Module, optimizer: LagrangianAdam, steps: range) -> None:
        for step in steps:
            train_step(model, optimizer, shard(global_batch(data, step), rank, world_size))

    model = build_model()
    ddp_model = DDP(model)
    optimizer = LagrangianAdam(ddp_model.parameters(), lr=LR)
    add_blocks(optimizer)
    train(ddp_model, optimizer, range(CHECKPOINT_STEP))
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    torch.distributed.barrier()
    train(ddp_model, optimizer, range(CHECKPOINT_STEP, STEPS))
    result = {"run": snapshot(list(model.parameters()), optimizer), "state_dict": optimizer.state_dict()}

    resumed_model = build_model()
    saved = torch.load(checkpoint)
    resumed_model.load_state_dict(saved["model"])
    resumed_ddp = DDP(resumed_model)
    resumed_optimizer = LagrangianAdam(resumed_ddp.parameters(), lr=LR)
    add_blocks(resumed_optimizer)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed_ddp, resumed_optimizer, range(CHECKPOINT_STEP, STEPS))
    result["resumed"] = snapshot(list(resumed_model.parameters()), resumed_optimizer)
    return result


def ddp_training(nonfinite: str = "raise") -> tuple[nn.Module, nn.Module, LagrangianAdam]:
    """A fresh model, its DDP wrapper and an optimizer with every block."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model()
    ddp_model = DDP(model)
    optimizer = LagrangianAdam(ddp_model.parameters(), lr=LR)
    add_blocks(optimizer, nonfinite)
    return model, ddp_model, optimizer


def scenario_nan_skip(rank: int, world_size: int, out_dir: str) -> dict:
    """nonfinite="skip": the last rank feeds NaN at steps 2 and 5; every rank skips those calls."""
    data = dataset()
    model, ddp_model, optimizer = ddp_training(nonfinite="skip")
    for step in range(STEPS):
        train_step(ddp_model, optimizer, shard(global_batch(data, step, poison_steps=(2, 5)), rank, world_size))
    return {"run": snapshot(list(model.parameters()), optimizer)}


def scenario_observe(rank: int, world_size: int, out_dir: str) -> dict:
    """DDP steps in which the parity block only observes (ConstraintBlock.observe) its shard."""
    data = dataset()
    model, ddp_model, optimizer = ddp_training()
    for step in range(STEPS):
        train_step(ddp_model, optimizer, shard(global_batch(data, step), rank, world_size), observe_parity=True)
    return {"run": snapshot(list(model.parameters()), optimizer)}


def scenario_bad_input(rank: int, world_size: int, out_dir: str) -> dict:
    """NaN on the last rank (nonfinite="raise"), then an out-of-range id on rank 0: every rank raises."""
    data = dataset()
    model, ddp_model, optimizer = ddp_training()
    train_step(ddp_model, optimizer, shard(global_batch(data, 0), rank, world_size))
    before = snapshot(list(model.parameters()), optimizer)
    errors = {}
    try:
        train_step(ddp_model, optimizer, shard(global_batch(data, 1, poison_steps=(1,)), rank, world_size))
    except ConstraintInputError as error:
        errors["nan"] = str(error)
    batch = shard(global_batch(data, 2), rank, world_size)
    if rank == 0:
        batch["ids"] = batch["ids"].clone().fill_(NUM_SAMPLES)
    try:
        train_step(ddp_model, optimizer, batch)
    except ConstraintInputError as error:
        errors["ids"] = str(error)
    after_errors = snapshot(list(model.parameters()), optimizer)
    pending = {name: b.has_pending for name, b in optimizer.constraints.items()}
    # Still in step after both errors: a normal step completes on every rank.
    train_step(ddp_model, optimizer, shard(global_batch(data, 3), rank, world_size))
    return {"errors": errors, "before": before, "after_errors": after_errors, "pending": pending,
            "final": snapshot(list(model.parameters()), optimizer)}


def scenario_fsdp(rank: int, world_size: int, out_dir: str) -> dict:
    """50 FSDP2 steps with a torch.distributed.checkpoint save at step 25, then a resume from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fused_lagrangian.distributed import get_optimizer_state_dict, set_optimizer_state_dict

    data = dataset()
    mesh = init_device_mesh("cpu", (world_size,))
    checkpoint = os.path.join(out_dir, "fsdp_checkpoint")

    def sharded_model() -> nn.Module:
        model = build_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def train(model: nn.Module, optimizer: LagrangianAdam, steps: range) -> None:
        for step in steps:
            train_step(model, optimizer, shard(global_batch(data, step), rank, world_size))

    def full(model: nn.Module, optimizer: LagrangianAdam) -> dict:
        return snapshot([p.full_tensor() for p in model.parameters()], optimizer)

    def app_state(model: nn.Module, optimizer: LagrangianAdam) -> dict:
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}

    model = sharded_model()
    optimizer = LagrangianAdam(model.parameters(), lr=LR)
    add_blocks(optimizer)
    train(model, optimizer, range(CHECKPOINT_STEP))
    dcp.save(app_state(model, optimizer), checkpoint_id=checkpoint)
    train(model, optimizer, range(CHECKPOINT_STEP, STEPS))
    first = next(iter(model.parameters()))
    exp_avg = optimizer.state[first]["exp_avg"]
    result = {
        "run": full(model, optimizer),
        "state_is_sharded": type(exp_avg).__name__ == "DTensor" and exp_avg.placements == first.placements,
        "local_numel": [p.to_local().numel() for p in model.parameters()],
    }

    resumed = sharded_model()
    resumed_optimizer = LagrangianAdam(resumed.parameters(), lr=LR)
    add_blocks(resumed_optimizer)
    state = app_state(resumed, resumed_optimizer)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    train(resumed, resumed_optimizer, range(CHECKPOINT_STEP, STEPS))
    result["resumed"] = full(resumed, resumed_optimizer)
    return result


SCENARIOS: dict[str, Callable[[int, int, str], dict]] = {
    "ddp": scenario_ddp,
    "nan_skip": scenario_nan_skip,
    "bad_input": scenario_bad_input,
    "observe": scenario_observe,
    "fsdp": scenario_fsdp,
}


def result_path(out_dir: str, scenario: str, rank: int) -> str:
    return os.path.join(out_dir, f"{scenario}.rank{rank}.pt")


def main(argv: Optional[list[str]] = None) -> int:
    rank, world_size, out_dir, *scenarios = (argv or sys.argv[1:])
    rank, world_size = int(rank), int(world_size)
    torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                                         rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        for name in scenarios:
            try:
                result = SCENARIOS[name](rank, world_size, out_dir)
            except Exception:
                torch.save({"error": traceback.format_exc()}, result_path(out_dir, name, rank))
                return 1
            torch.save(result, result_path(out_dir, name, rank))
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
