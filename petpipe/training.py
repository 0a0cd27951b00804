"""The training loop: batches from the pixel cache, one-cycle schedules, train and evaluate.

Pure core: these functions take tensors and models and return numbers; the
stages read and write files. A run is fixed by its seed: shuffling,
augmentation and dropout draw from RNGs whose state resume restores.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from petpipe.augment import augment_batch, center_crop_batch, normalize
from petpipe.distributed import World, all_reduce_sum
from petpipe.errors import PetpipeError
from petpipe.models import Classifier, Preprocessing, set_train_mode
from petpipe.params import AugmentParams

# fastai's Adam defaults: mom 0.9, sqr_mom 0.99, eps 1e-5, decoupled weight decay.
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-5


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


@dataclass
class ImageSet:
    """Presized uint8 pixels (N, 3, P, P) and class ids (N,), on the training device.

    `features`, when set, holds the frozen body's pooled output (N, 2C) for each
    image, computed once: the head then trains on it without running the body.
    """

    pixels: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, pixels: np.ndarray, targets: np.ndarray, device: torch.device) -> ImageSet:
        """On a CPU the tensor is the (copy-on-write) memory map itself: batches copy only their own
        images, and the OS pages the rest in and out. On a GPU the whole set is copied to the device once."""
        subset = torch.from_numpy(pixels)
        if device.type == "cuda":
            subset = subset.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            subset = subset.to(device)
        return cls(subset, torch.as_tensor(targets, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return self.targets.shape[0]


def batch_indices(count: int, batch_size: int, *, shuffle: bool, drop_last: bool,
                  generator: torch.Generator | None = None, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Positions 0..count-1 (or the given order), optionally shuffled, in batches."""
    if order is None:
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # a tiny last batch gives BatchNorm noisy statistics (fastai drops it too)
    return batches


def training_view(pixels: torch.Tensor, *, size: int, augment: AugmentParams, preprocessing: Preprocessing,
                  generator: torch.Generator) -> torch.Tensor:
    batch = augment_batch(pixels, size=size, augment=augment, generator=generator)
    return normalize(batch, mean=preprocessing.mean, std=preprocessing.std).contiguous(
        memory_format=memory_format(batch.device))


def evaluation_view(pixels: torch.Tensor, *, size: int, preprocessing: Preprocessing) -> torch.Tensor:
    batch = center_crop_batch(pixels, size=size)
    return normalize(batch, mean=preprocessing.mean, std=preprocessing.std).contiguous(
        memory_format=memory_format(batch.device))


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


# ---------------------------------------------------------------- optimiser and schedule


def discriminative_lrs(lr: float, ratio: float, groups: int) -> list[float]:
    """fastai's slice(lr / ratio, lr): learning rates spread geometrically, last group highest."""
    if groups == 1:
        return [lr]
    return [lr / ratio ** (1 - index / (groups - 1)) for index in range(groups)]


def make_optimizer(model: Classifier, *, group_lrs: dict[str, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one param group per layer group and decay kind.

    As fastai (wd_bn_bias=False), BatchNorm weights and biases get no weight decay.
    """
    no_decay = {id(parameter) for module in model.modules()
                if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
                for parameter in module.parameters(recurse=False)}
    no_decay |= {id(parameter) for name, parameter in model.named_parameters() if name.endswith(".bias")}
    param_groups = []
    for group, parameters in model.layer_group_parameters().items():
        trainable = [parameter for parameter in parameters if parameter.requires_grad]
        for decay in (True, False):
            chosen = [parameter for parameter in trainable if (id(parameter) not in no_decay) == decay]
            if chosen:
                param_groups.append({"params": chosen, "lr": group_lrs[group], "name": f"{group}",
                                     "weight_decay": weight_decay if decay else 0.0})
    # The fused kernel: one pass over every parameter (5x faster than the default for-loop on this CPU).
    fused = all(parameter.device.type in ("cpu", "cuda") for group in param_groups for parameter in group["params"])
    return torch.optim.AdamW(param_groups, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused or None)


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * fraction))


def one_cycle(progress: float, *, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e5) -> float:
    """fastai's fit_one_cycle learning rate, as a fraction of the peak (Smith 2018, arXiv:1803.09820).

    Cosine warm-up from peak/div over the first pct_start of training, then
    cosine annealing to peak/(div * final_div).
    """
    if progress < pct_start:
        return _cosine(1 / div, 1.0, progress / pct_start)
    return _cosine(1.0, 1 / (div * final_div), (progress - pct_start) / (1 - pct_start))


def one_cycle_momentum(progress: float, *, pct_start: float = 0.25, high: float = 0.95, low: float = 0.85) -> float:
    """Momentum moves opposite to the learning rate: 0.95 -> 0.85 -> 0.95 (fastai's moms)."""
    if progress < pct_start:
        return _cosine(high, low, progress / pct_start)
    return _cosine(low, high, (progress - pct_start) / (1 - pct_start))


class Schedule:
    """Sets every param group's lr (and Adam's beta1) for the current step; resumable by its step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int):
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(total_steps, 1)
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        progress = min(self.step_count / self.total_steps, 1.0)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            if self.kind == "one_cycle":
                group["lr"] = peak * one_cycle(progress)
                group["betas"] = (one_cycle_momentum(progress), group["betas"][1])
            else:  # constant: fastai's fit
                group["lr"] = peak

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "peak_lrs": self.peak_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.peak_lrs = list(state["peak_lrs"])
        self._apply()


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int) -> Schedule:
    """one_cycle: fastai's fit_one_cycle; constant: fastai's fit."""
    return Schedule(optimizer, kind=schedule, total_steps=total_steps)


# ---------------------------------------------------------------- one epoch


def rank_batches(count: int, batch_size: int, *, world: World, seed: int, epoch: int) -> list[torch.Tensor]:
    """This rank's shuffled training batches for one epoch.

    A DistributedSampler shards one seeded permutation over the ranks; each rank
    takes batch_size / world.size images per step, so the global batch and the
    schedule stay those of a single process.
    """
    sampler = DistributedSampler(range(count), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    return batch_indices(len(order), max(batch_size // world.size, 1), shuffle=False, drop_last=True,
                         generator=None, order=order)


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile with a clear error where it cannot work (no C++ compiler for CPU code)."""
    if next(model.parameters()).device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise PetpipeError("train.compile is true but no C++ compiler (g++) is on PATH, which torch.compile "
                           "needs for CPU code; install one (apt install g++) or set train.compile: false")
    return torch.compile(model)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
                  *, precision: str) -> float:
    """Forward, cross-entropy, backward and one optimiser step; returns the batch's mean loss."""
    with autocast(inputs.device, precision, training=True):
        loss = F.cross_entropy(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_one_epoch(
    model: nn.Module, *, images: ImageSet, batches: list[torch.Tensor], optimizer: torch.optim.Optimizer,
    scheduler: Schedule, size: int, augment: AugmentParams,
    preprocessing: Preprocessing, generator: torch.Generator, precision: str = "auto",
    progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
) -> dict[str, float]:
    """One pass over the given batches; returns the summed loss, images seen and the peak learning rate."""
    device = images.pixels.device
    total_loss, seen, peak_lr = 0.0, 0, 0.0
    iterator = progress(iter(batches), len(batches)) if progress else iter(batches)
    for rows in iterator:
        rows = rows.to(device)
        if images.features is not None:
            inputs = images.features[rows]  # (B, 2C): the frozen body already ran, once
        else:
            inputs = training_view(images.pixels[rows], size=size, augment=augment, preprocessing=preprocessing,
                                   generator=generator)
        peak_lr = max(peak_lr, optimizer.param_groups[-1]["lr"])
        loss = training_step(model, optimizer, inputs, images.targets[rows], precision=precision)
        scheduler.step()
        total_loss += loss * len(rows)
        seen += len(rows)
    return {"loss_sum": total_loss, "images": seen, "lr": peak_lr}


@torch.inference_mode()
def predict(model: nn.Module, *, images: ImageSet, batch_size: int, size: int,
            preprocessing: Preprocessing, precision: str = "auto") -> torch.Tensor:
    """Logits (N, classes) in float32 on the CPU, in the order of `images`."""
    model.eval()
    device = images.pixels.device
    outputs = []
    for rows in batch_indices(len(images), batch_size, shuffle=False, drop_last=False):
        rows = rows.to(device)
        if images.features is not None:
            inputs = images.features[rows]
        else:
            inputs = evaluation_view(images.pixels[rows], size=size, preprocessing=preprocessing)
        with autocast(device, precision):
            logits = model(inputs)
        outputs.append(logits.float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


@torch.inference_mode()
def with_features(model: Classifier, *, images: ImageSet, batch_size: int, size: int,
                  preprocessing: Preprocessing, precision: str = "auto") -> ImageSet:
    """The same images with the body's pooled features of their evaluation view, computed once."""
    model.eval()
    device = images.pixels.device
    chunks = []
    for rows in batch_indices(len(images), batch_size, shuffle=False, drop_last=False):
        rows = rows.to(device)
        with autocast(device, precision, training=True):
            chunks.append(model.pooled_features(evaluation_view(images.pixels[rows], size=size,
                                                                preprocessing=preprocessing)).float())
    features = torch.cat(chunks) if chunks else torch.empty(0, device=device)
    return ImageSet(images.pixels, images.targets, features)


def validation_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    targets = targets.cpu()
    loss = F.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    return {"valid_loss": loss, "accuracy": accuracy, "error_rate": 1.0 - accuracy}


def _sharded_validation(model: nn.Module, *, images: ImageSet, world: World, batch_size: int, size: int,
                        preprocessing: Preprocessing, precision: str) -> dict[str, float]:
    """Each rank scores its share of the validation set; sums are reduced over ranks."""
    rows = torch.arange(world.rank, len(images), world.size)
    shard = ImageSet(images.pixels[rows.to(images.pixels.device)], images.targets[rows.to(images.targets.device)],
                     None if images.features is None else images.features[rows.to(images.features.device)])
    logits = predict(model, images=shard, batch_size=batch_size, size=size, preprocessing=preprocessing,
                     precision=precision)
    targets = shard.targets.cpu()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum").item() if len(targets) else 0.0
    correct = (logits.argmax(dim=1) == targets).sum().item() if len(targets) else 0
    loss_sum, correct, count = all_reduce_sum([loss_sum, float(correct), float(len(targets))], images.pixels.device)
    accuracy = correct / max(count, 1)
    return {"valid_loss": loss_sum / max(count, 1), "accuracy": accuracy, "error_rate": 1.0 - accuracy}


# ---------------------------------------------------------------- fit


@dataclass
class FitState:
    """Everything needed to continue a fit after its last completed epoch."""

    epoch: int
    history: list[dict[str, float]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor
    torch_rng: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, history=self.history, optimizer=self.optimizer, scheduler=self.scheduler,
                    generator=self.generator, torch_rng=self.torch_rng)


def fit(
    model: Classifier, *, train: ImageSet, valid: ImageSet, epochs: int, group_lrs: dict[str, float],
    schedule: str, weight_decay: float, batch_size: int, size: int, augment: AugmentParams,
    preprocessing: Preprocessing, seed: int, freeze_bn_stats: bool, world: World = World(),
    precision: str = "auto", compile: bool = False, resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[FitState], None] | None = None,
    progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
) -> list[dict[str, float]]:
    """Train for `epochs` (fastai's fit_one_cycle or fit) and return the per-epoch history.

    `resume` is a FitState dict from `on_epoch_end`: the fit continues after its
    epoch and ends exactly as an uninterrupted fit would. With several ranks
    (torchrun), the model trains as DistributedDataParallel and every rank
    returns the same, reduced history. `compile` trains through torch.compile
    (validation and the saved weights use the plain module).
    """
    if len(train) == 0:
        raise PetpipeError("the training split is empty; lower split.valid_pct or add images")
    batch_size = min(batch_size, len(train) // world.size)
    if batch_size < world.size:
        raise PetpipeError(f"{len(train)} training images cannot feed {world.size} processes; use fewer processes")
    steps_per_epoch = len(rank_batches(len(train), batch_size, world=world, seed=seed, epoch=0))
    optimizer = make_optimizer(model, group_lrs=group_lrs, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, schedule=schedule, total_steps=epochs * steps_per_epoch)
    # Augmentation differs per rank, like the images each rank sees.
    generator = torch.Generator().manual_seed(seed + world.rank)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
        start_epoch = int(resume["epoch"])
    trained: nn.Module = model
    if world.distributed:
        device = train.pixels.device
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        trained = compiled(trained)
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        set_train_mode(model, freeze_bn_stats=freeze_bn_stats)
        batches = rank_batches(len(train), batch_size, world=world, seed=seed, epoch=epoch)
        row = train_one_epoch(trained, images=train, batches=batches, optimizer=optimizer, scheduler=scheduler,
                              size=size, augment=augment, preprocessing=preprocessing, generator=generator,
                              precision=precision, progress=progress)
        loss_sum, images_seen = all_reduce_sum([row["loss_sum"], float(row["images"])], train.pixels.device)
        train_seconds = time.perf_counter() - started
        metrics = _sharded_validation(model, images=valid, world=world, batch_size=batch_size * 2, size=size,
                                      preprocessing=preprocessing, precision="auto") if len(valid) else {}
        seconds = time.perf_counter() - started
        history.append({
            "epoch": epoch + 1, "train_loss": loss_sum / max(images_seen, 1), **metrics, "lr": row["lr"],
            "seconds": round(seconds, 3), "images_per_second": round(images_seen / max(train_seconds, 1e-9), 2),
        })
        if on_epoch_end is not None:
            on_epoch_end(FitState(epoch=epoch + 1, history=history, optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), generator=generator.get_state(),
                                  torch_rng=torch.get_rng_state()))
    return history
