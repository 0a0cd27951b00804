"""The machine a stage runs on: device, threads, arithmetic precision, memory format, torch.compile.

Everything here asks the hardware or the environment; the training loop only
receives the answers (a device, an autocast context, a memory format).
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petpipe.distributed import World, device_for, init_world
from petpipe.errors import PetpipeError
from petpipe.params import TrainParams


def choose_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU; an explicit device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PetpipeError(f"train.device = {name!r} but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PetpipeError("train.device = 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def configure_threads(world: World = World()) -> None:
    """Every core for intra-op parallelism (the pixel cache leaves no loader work to overlap),
    shared fairly when several processes run on one machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world.size if world.distributed else 1))
    torch.set_num_threads(max(1, cores // max(local_processes, 1)))


@dataclass(frozen=True)
class Runtime:
    """Where a stage computes: this process's place among the ranks, and its device."""

    world: World
    device: torch.device

    @classmethod
    def start(cls, train: TrainParams, *, distributed: bool) -> Runtime:
        """Join torchrun's process group (training stages), size the thread pool, pick the device."""
        world = init_world(train.device) if distributed else World()
        configure_threads(world)
        return cls(world=world, device=device_for(world, choose_device(train.device)))


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last everywhere: tensor cores on GPUs want it, and on this project's AMX CPU it made
    EfficientNet-Lite0's training steps 1.3x faster (benchmarks/levers.py)."""
    return torch.channels_last


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    return model.to(device).to(memory_format=memory_format(device))


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Intel AMX tiles run bfloat16 matrix products natively (oneDNN uses them for convolutions)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast_dtype(device: torch.device, precision: str, *, training: bool) -> torch.dtype | None:
    """The dtype autocast runs in, or None for float32.

    auto: bfloat16 on GPUs (no loss scaling needed); on CPUs, bfloat16 for
    training where AMX runs it natively (1.7x faster measured on
    EfficientNet-Lite0 here) and float32 for inference, so evaluate, predict
    and exported ONNX models agree to 1e-4.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16" or device.type == "cuda" or (training and device.type == "cpu" and cpu_has_amx()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto", *, training: bool = False) -> Any:
    dtype = autocast_dtype(device, precision, training=training)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile with a clear error where it cannot work (no C++ compiler for CPU code)."""
    if next(model.parameters()).device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise PetpipeError("train.compile is true but no C++ compiler (g++) is on PATH, which torch.compile "
                           "needs for CPU code; install one (apt install g++) or set train.compile: false")
    return torch.compile(model)
