"""Demographic parity on UCI Adult, data-parallel: DistributedDataParallel + LagrangianAdam.

    torchrun --nproc_per_node 2 examples/ddp_fairness.py            # CPU (gloo) or one GPU per rank (nccl)
    python examples/ddp_fairness.py                                  # the same training on one process

Every group's positive rate must stay within ±epsilon of the overall rate: two grouped blocks with
``to_overall=True`` (rate_k - overall <= epsilon and >= -epsilon).  The sigmoid drives the gradient and
the hard prediction drives the multipliers (``dual_values``).  Nothing in the training loop is specific
to data parallelism: the optimizer sees torch.distributed initialised and exchanges the blocks' samples at
each step, so every rank applies the same multiplier update, with group rates and the overall rate taken
over the global batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fused_lagrangian import LagrangianAdam
from fused_lagrangian_apps.datasets import load_adult
from fused_lagrangian.fairness import dp_gap


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per rank and step")
    parser.add_argument("--epsilon", type=float, default=0.05, help="allowed |rate_k - overall rate|")
    parser.add_argument("--dual-lr", type=float, default=0.2, help="0: unconstrained training, for comparison")
    parser.add_argument("--group-by", default="sex", help="comma-separated Adult attributes, e.g. race,sex")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    device = torch.device("cpu")
    if distributed:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    data = load_adult(group_by=tuple(args.group_by.split(",")))
    train = TensorDataset(data.x_train, data.y_train, data.g_train)
    # Every rank gets the same number of equal batches, so DDP's gradient average is the global batch's.
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(data.x_train.shape[1], 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    net = DistributedDataParallel(model) if distributed else model
    optimizer = LagrangianAdam(net.parameters(), lr=1e-3)
    parity = dict(kind="grouped", num_constraints=data.num_groups, dual_lr=args.dual_lr, to_overall=True)
    upper = optimizer.add_constraint("parity_upper", sense="<=", bound=args.epsilon, **parity)
    lower = optimizer.add_constraint("parity_lower", sense=">=", bound=-args.epsilon, **parity)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y, groups in loader:
            x, y, groups = x.to(device), y.to(device), groups.to(device)
            logits = net(x).squeeze(1)
            soft, hard = torch.sigmoid(logits), (logits.detach() > 0).float()
            loss = (F.binary_cross_entropy_with_logits(logits, y)
                    + upper(soft, ids=groups, dual_values=hard) + lower(soft, ids=groups, dual_values=hard))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            predictions = (model(data.x_test.to(device)).squeeze(1) > 0).float().cpu()
        if rank == 0:
            accuracy = float((predictions == data.y_test).float().mean())
            gap = dp_gap(predictions, data.g_test, data.num_groups)
            print(f"epoch {epoch}: test accuracy {accuracy:.4f}, demographic parity gap {gap:.4f}, "
                  f"max multiplier {float(torch.cat([upper.multipliers, lower.multipliers]).max()):.3f}")

    if distributed:
        # The point of the exercise: the multipliers are the same on every rank, bit for bit.
        mine = torch.cat([upper.multipliers, lower.multipliers])
        everyone = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        if rank == 0:
            print(f"multipliers identical on all {world_size} ranks: {all(torch.equal(mine, m) for m in everyone)}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
