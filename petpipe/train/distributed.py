"""Several GPUs or nodes with torch.distributed: `torchrun --nproc-per-node N $(which petpipe) train-head ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is
a single process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes outputs and logs to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_name: str) -> World:
    """Join the process group torchrun prepared (NCCL on GPUs, gloo on CPUs), or stay single."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world


def launched_as_secondary_rank() -> bool:
    """True in the processes torchrun starts besides rank 0.

    lr-find and evaluate are one-process stages: under torchrun, rank 0 does
    the work and the other ranks return at once.
    """
    return int(os.environ.get("RANK", "0")) != 0


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per local rank; CPUs are shared."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all ranks (identity in a single process)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
