"""Memory a training stage will need, checked against what the machine gives it before batches exist.

On a CPU the kernel's OOM killer ends a process that asks for too much with SIGKILL: no message, possibly
hours in. So before a stage's first batch, petpipe estimates its peak resident memory from the batch size,
the image size and the model, compares it with the memory available (the cgroup's limit, else the
kernel's MemAvailable), and refuses in one line with the numbers and the largest batch that fits.

The estimate: what the process holds now (interpreter, torch, the model, its data) + the gradients and
Adam's two moments of the trained weights + per image of a batch, the activations autograd saves for the
backward pass (measured on this model, at this size, by one forward of two images) times
ACTIVATION_FACTOR, + the decoded pixels training reads (mapped from the pixel cache, resident once read).
ACTIVATION_FACTOR is measured: benchmarks/memory.py runs finetune and train-head on the sample at several
batch and image sizes and compares the estimate with the peak RSS (benchmarks/memory.json).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from petpipe.errors import PetpipeError
from petpipe.utils.atomic import megabytes

# Saved activations -> peak bytes per image: the backward pass holds the saved tensors and, layer by
# layer, their gradients; validation's batches and the allocator's freed blocks add to the high-water mark.
# Measured on EfficientNet-Lite0, train-head and finetune at 64 and 128 px, batches of 16 and 64
# (benchmarks/memory.py): 1.2 left the estimate 4-9% under the peak RSS at batches of 16; 1.5 keeps it
# at or a little above (benchmarks/memory.json), which is the side a refusal must err on.
ACTIVATION_FACTOR = 1.5
OPTIMIZER_COPIES = 3  # a gradient and Adam's two moments per trained weight
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident bytes of a stage's fit = fixed + per_image * batch_size."""

    fixed: int  # what the process holds now, the optimiser's state and the decoded pixels
    per_image: int  # activations and inputs per image of a batch
    batch_size: int  # of the fit: train.batch_size, or the training split where that is smaller
    requested: int  # train.batch_size
    held: int  # resident when estimated: part of `fixed`, already taken from what the machine gives

    @property
    def peak(self) -> int:
        return self.fixed + self.per_image * self.batch_size

    @property
    def growth(self) -> int:
        """What the fit will still take beyond what the process holds now."""
        return self.peak - self.held

    def largest_batch(self, available: int) -> int:
        """The largest batch size whose growth fits in `available` bytes still to be had (0: none)."""
        return max((available - (self.fixed - self.held)) // max(self.per_image, 1), 0)


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    return _status_kilobytes("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the kernel's high-water mark, ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kilobytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def available_bytes() -> tuple[int, str] | None:
    """The memory this process may still take, and where the number comes from: the smallest of the cgroup's
    room (v2 memory.max, v1 memory.limit_in_bytes, minus what the group uses) and MemAvailable. None where
    neither can be read (not Linux)."""
    found = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        found.append((meminfo, "MemAvailable"))
    room = _cgroup_room()
    if room is not None:
        found.append(room)
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> tuple[int, str] | None:
    """The memory cgroup's limit minus its usage (the page cache it can drop counted as room)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            folder = CGROUP / path.lstrip("/")
            limit, usage, stat = folder / "memory.max", folder / "memory.current", folder / "memory.stat"
            inactive = "inactive_file"
        elif "memory" in controllers.split(","):
            folder = CGROUP / "memory" / path.lstrip("/")
            limit, usage = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
            stat = folder / "memory.stat"
            inactive = "total_inactive_file"
        else:
            continue
        try:
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit
                continue
            used = int(usage.read_text()) - _stat_field(stat, inactive)
        except (OSError, ValueError):
            continue
        return max(int(text) - used, 0), f"cgroup limit {megabytes(int(text))} ({limit})"
    return None


def _stat_field(stat: Path, name: str) -> int:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


@torch.no_grad()
def _largest_output(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the largest output any module gives for `example` (inference: a few live at a time)."""
    largest = [0]

    def note(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    handles = [module.register_forward_hook(note) for module in model.modules()]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def _saved_activations(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward pass of `example` (weights not counted)."""
    weights = {parameter.data_ptr() for parameter in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(example)
    return sum(seen.values())


def estimate(
    model: nn.Module,
    *,
    img_size: int,
    batch_size: int,
    images: int,
    pixel_bytes: int,
    features: bool,
    memory_format: torch.memory_format = torch.channels_last,
) -> MemoryEstimate:
    """The fit's peak memory: `features` when the frozen body runs once, under inference, over batches of
    2 * batch_size (train-head's cached features), else every step trains through the model."""
    modes = {module: module.training for module in model.modules()}
    model.eval()  # no BatchNorm statistics change, no RNG drawn: the run stays what it would have been
    try:
        example = torch.zeros(2, 3, img_size, img_size).to(memory_format=memory_format)
        inputs = 3 * img_size * img_size * 4  # a float32 image: the augmented batch, its normalised copy
        if features:  # 2 * batch_size images at a time, the largest output and the module's input alive
            per_image = 2 * (_largest_output(model, example) + inputs)
        else:
            per_image = int(ACTIVATION_FACTOR * _saved_activations(model, example) / 2) + 2 * inputs
    finally:
        for module, training in modes.items():
            module.train(training)
    trained = sum(
        parameter.numel() * parameter.element_size() for parameter in model.parameters() if parameter.requires_grad
    )
    held = rss_bytes()
    return MemoryEstimate(
        fixed=held + OPTIMIZER_COPIES * trained + pixel_bytes,
        per_image=per_image,
        batch_size=min(batch_size, images),
        requested=batch_size,
        held=held,
    )


def check_fits(stage: str, guess: MemoryEstimate, *, img_size: int) -> None:
    """Refuse, in one line with the numbers, a fit whose estimate exceeds the memory available."""
    room = available_bytes()
    if room is not None and guess.growth > room[0]:
        raise PetpipeError(f"{stage}: {fits_words(guess, img_size=img_size, room=room)}. Nothing was allocated for it")


def fits_words(guess: MemoryEstimate, *, img_size: int, room: tuple[int, str] | None = None) -> str:
    """The estimate against the memory available, and the largest batch size that fits."""
    room = room or available_bytes()
    split = f" (batches of {guess.batch_size}: the training split)" if guess.batch_size < guess.requested else ""
    need = (
        f"train.batch_size = {guess.requested}{split} at model.img_size = {img_size} needs about "
        f"{megabytes(guess.peak)} of memory ({megabytes(guess.fixed)} + {guess.batch_size} x "
        f"{megabytes(guess.per_image)} per image), {megabytes(guess.growth)} more than the process holds now"
    )
    if room is None:
        return need
    largest = guess.largest_batch(room[0])
    if guess.growth <= room[0]:
        return (
            f"{need}, within the {megabytes(room[0])} available now ({room[1]}), where a batch of up to "
            f"{largest} fits; if other processes took the memory, a smaller train.batch_size leaves them room"
        )
    advice = (
        f"set train.batch_size to {largest} or less (dvc exp run -S train.batch_size={largest})"
        if largest >= 2
        else f"even a batch of 2 does not fit; lower model.img_size ({img_size}) or free memory"
    )
    return f"{need}, more than the {megabytes(room[0])} available ({room[1]}); {advice}"


def out_of_memory(stage: str, device: torch.device, *, batch_size: int, img_size: int, kept: str) -> PetpipeError:
    """torch.OutOfMemoryError as the tutorial's advice: halve the batch."""
    half = max(batch_size // 2, 1)
    return PetpipeError(
        f"{stage}: out of memory on {device} at train.batch_size = {batch_size}, model.img_size = {img_size}; "
        f"{kept}; halve the batch (dvc exp run -S train.batch_size={half}) or lower model.img_size"
    )


def describe(guess: MemoryEstimate | None) -> str:
    """`memory: estimated 1.2 GB, peak RSS 1.1 GB`, for a stage's summary line."""
    estimated = f"estimated {megabytes(guess.peak)}, " if guess is not None else ""
    return f"memory: {estimated}peak RSS {megabytes(peak_rss_bytes())}"
