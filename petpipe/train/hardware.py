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

from petpipe.errors import PetpipeError
from petpipe.params import TrainParams
from petpipe.train.distributed import World, device_for, init_world
from petpipe.utils.devices import DEVICE_CHOICES, is_device_name


def choose_device(name: str, *, setting: str = "train.device") -> torch.device:
    """auto: CUDA when available, else CPU; a name devices.is_device_name refuses, or an explicit device that
    is absent, is an error naming `setting` (where the name came from: train.device, --device)."""
    if not is_device_name(name):
        raise PetpipeError(f"{setting} = {name!r} is not a device; use {DEVICE_CHOICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PetpipeError(f"{setting} = {name!r} but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PetpipeError(f"{setting} = 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def configure_threads(world: World = World()) -> None:
    """Every core for intra-op parallelism (the pixel cache leaves no loader work to overlap),
    shared fairly when several processes run on one machine."""
    torch.set_num_threads(available_cores(world))


def available_cores(world: World = World()) -> int:
    """The cores this process may use: its CPU affinity, shared fairly among the ranks on one machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world.size if world.distributed else 1))
    return max(1, cores // max(local_processes, 1))


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass(frozen=True)
class Levers:
    """How a stage computes: the arithmetic of training, the memory format and the threads.

    Stages that train resolve `train.precision`, `train.memory_format` and
    `train.threads` into these (petpipe/train/levers.py); inference keeps the defaults:
    autocast "auto" (bfloat16 on GPUs, float32 on CPUs) in channels_last.
    """

    precision: str = "auto"  # of training: float32 or bfloat16 once chosen
    memory_format: str = "channels_last"
    threads: int = 0  # 0: as configure_threads set them
    chosen_by: str = "default"  # params, hardware, timed, or timed earlier (a cached choice)

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.memory_format]

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.precision}, {self.memory_format}{threads} ({self.chosen_by})"


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage computes: this process's place among the ranks, its device, its levers."""

    world: World
    device: torch.device
    levers: Levers = Levers()

    @classmethod
    def start(cls, train: TrainParams, *, distributed: bool) -> Runtime:
        """Join torchrun's process group (training stages), size the thread pool, pick the device,
        and allow only deterministic algorithms where train.deterministic asks for them."""
        use_deterministic_algorithms(train.deterministic)
        world = init_world(train.device) if distributed else World()
        configure_threads(world)
        return cls(world=world, device=device_for(world, choose_device(train.device)))


def use_deterministic_algorithms(on: bool) -> None:
    """torch.use_deterministic_algorithms, with what CUDA needs for it: cuBLAS's fixed workspace
    (read when CUDA starts) and no cuDNN benchmarking (which picks kernels by timing)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    if on or torch.are_deterministic_algorithms_enabled():  # turning off what is off imports torch._inductor: 1.7 s
        torch.use_deterministic_algorithms(on)


def to_device(model: nn.Module, device: torch.device, memory_format: str = "channels_last") -> nn.Module:
    """channels_last by default: tensor cores on GPUs want it (training stages choose per machine)."""
    return model.to(device).to(memory_format=MEMORY_FORMATS[memory_format])


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux), empty where /proc/cpuinfo is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.split(":", 1)[-1].split())


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    line = next((line for line in text.splitlines() if line.startswith("model name")), "")
    return line.split(":", 1)[-1].strip() or "unknown CPU"


def cpu_runs_bfloat16() -> bool:
    """Intel AMX tiles or AVX-512 BF16 run bfloat16 matrix products natively; without them autocast
    emulates bfloat16 and is slower than float32."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def autocast_dtype(device: torch.device, precision: str, *, training: bool) -> torch.dtype | None:
    """The dtype autocast runs in, or None for float32.

    auto (inference, and training before levers are chosen): bfloat16 on GPUs
    (no loss scaling needed) and float32 on CPUs, so evaluate, predict and
    exported ONNX models agree to 1e-4. Training resolves auto per machine
    (petpipe/train/levers.py) into float32 or bfloat16.
    """
    if precision == "float32":
        return None
    if precision == "bfloat16" or device.type == "cuda":
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto", *, training: bool = False) -> Any:
    dtype = autocast_dtype(device, precision, training=training)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile with a clear error where it cannot work (no C++ compiler for CPU code)."""
    if next(model.parameters()).device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise PetpipeError(
            "train.compile is true but no C++ compiler (g++) is on PATH, which torch.compile "
            "needs for CPU code; install one (apt install g++) or set train.compile: false"
        )
    return torch.compile(model)
