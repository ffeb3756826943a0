"""torchrun support: process group set-up, DDP wrapping, and the few collective helpers the trainer needs."""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as tdist
from torch import nn


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return tdist.get_rank(), tdist.get_world_size(), device


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    if not (tdist.is_available() and tdist.is_initialized()):
        return model
    # DDP all-reduces (averages) gradients before step(); the RepOpt multiplier is elementwise and constant, so it
    # commutes with the average and every rank applies the same multipliers.
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a gradient-accumulation step."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so that the ranks evaluate, together, the
    model rank 0 saves: DDP broadcasts them before each forward, and each rank's last forward then moved its own."""
    if world_size() > 1:
        for b in model.buffers():
            tdist.broadcast(b, 0)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the ranks (unchanged in a single process): evaluation counts of each rank's shard."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def is_tty() -> bool:
    return sys.stderr.isatty()
