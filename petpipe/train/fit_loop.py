"""The training loop: batches from the pixel cache, one optimiser step per batch, validation per epoch.

Pure core: `fit` takes the Learner (petpipe/train/learner.py: the model, its data, views, loss and
runtime) and a `Phase` (fastai's fit_one_cycle arguments), the other functions a model, image sets and
the views, and they return numbers; the Learner and the stages read and write files. A run is fixed
by its seed: shuffling, augmentation and dropout draw from RNGs whose state resume restores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from petpipe.data.dataset import Dataset, ImageSet
from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.model.backbones import Classifier, folded_batchnorm, set_train_mode
from petpipe.params import TrainParams
from petpipe.train.distributed import World, all_reduce_sum
from petpipe.train.hardware import Levers, Runtime, autocast, compiled, to_device
from petpipe.train.optim import Schedule, make_optimizer, make_scheduler
from petpipe.utils import timing
from petpipe.utils.progress import Progress

if TYPE_CHECKING:
    from petpipe.train.learner import Learner

History = list[dict[str, float]]


@dataclass(frozen=True)
class Phase:
    """One fit_one_cycle (or fit) of a stage: how long, how fast per layer group, and what stays fixed."""

    epochs: int
    group_lrs: dict[str, float]  # peak learning rate of each layer group
    schedule: str  # one_cycle (fastai's fit_one_cycle) or constant (fastai's fit)
    freeze_bn_stats: bool  # the body's BatchNorm layers keep their running statistics
    seed: int  # shuffling, augmentation and dropout
    # The body is frozen and fixed: run it once over this many views of each image (the first the
    # evaluation view, the others augmented) and train the head on their features; 0 runs it every step.
    feature_views: int = 0


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
        return dict(
            epoch=self.epoch,
            history=self.history,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            generator=self.generator,
            torch_rng=self.torch_rng,
        )


@dataclass(frozen=True)
class FitHooks:
    """What a fit calls back: after each epoch (checkpoints, logging) and around each epoch's batches."""

    on_epoch_end: Callable[[FitState], None] | None = None
    progress: Progress | None = None


# ---------------------------------------------------------------- the loss


def balanced_class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """scikit-learn's compute_class_weight("balanced"): n_samples / (n_classes * count of the class), (classes,).

    A class without a photo among `targets` is weighted as one with a single photo (scikit-learn refuses it):
    it never appears as a training target, and its validation photos then weigh as much as the rarest class's.
    """
    counts = torch.bincount(targets.cpu(), minlength=num_classes).to(torch.float64)
    return (len(targets) / (num_classes * counts.clamp(min=1))).to(torch.float32)


@dataclass(frozen=True)
class Criterion:
    """Cross-entropy, weighted per class or not: the loss a stage trains on and reports as valid_loss (fastai's
    CrossEntropyLossFlat(weight=...) as the Learner's loss_func weighs both). Weights count the training split."""

    method: str  # train.class_weights: none or balanced
    weight: torch.Tensor | None = None  # (classes,) float32; None: every photo weighs 1

    @classmethod
    def of(cls, settings: TrainParams, data: Dataset) -> Criterion:
        """train.class_weights' loss for this data set, its weights counted on the training split alone."""
        if settings.class_weights == "none":
            return cls("none")
        return cls(settings.class_weights, balanced_class_weights(data.train.targets, len(data.classes)))

    def _weight_on(self, device: torch.device) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss: with weights, the weighted sum over the sum of the targets' weights."""
        return F.cross_entropy(logits, targets, weight=self._weight_on(logits.device))

    def sums(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """The summed (weighted) loss and the summed weight of the targets, to average over ranks and batches."""
        if not len(targets):
            return 0.0, 0.0
        weight = self._weight_on(logits.device)
        total = F.cross_entropy(logits, targets, weight=weight, reduction="sum").item()
        return total, float(len(targets)) if weight is None else weight[targets].sum().item()

    def describe(self) -> str:
        """For a stage's summary line: which loss, and the range of its weights."""
        if self.weight is None:
            return "cross-entropy"
        return (
            f"cross-entropy weighted by class ({self.method}: {self.weight.min().item():.2f} to "
            f"{self.weight.max().item():.2f})"
        )


# ---------------------------------------------------------------- batches


def batch_indices(
    count: int,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    generator: torch.Generator | None = None,
    order: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Positions 0..count-1 (or the given order), optionally shuffled, in batches."""
    if order is None:
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # a tiny last batch gives BatchNorm noisy statistics (fastai drops it too)
    return batches


def rank_batches(count: int, batch_size: int, *, world: World, seed: int, epoch: int) -> list[torch.Tensor]:
    """This rank's shuffled training batches for one epoch.

    A DistributedSampler shards one seeded permutation over the ranks; each rank
    takes batch_size / world.size images per step, so the global batch and the
    schedule stay those of a single process.
    """
    sampler = DistributedSampler(
        range(count), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    return batch_indices(
        len(order), max(batch_size // world.size, 1), shuffle=False, drop_last=True, generator=None, order=order
    )


# ---------------------------------------------------------------- one step, one epoch


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    criterion: Criterion,
    precision: str,
) -> float:
    """Forward, the criterion's loss, backward and one optimiser step; returns the batch's mean loss."""
    with autocast(inputs.device, precision, training=True):
        loss = criterion(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@dataclass
class Loop:
    """The moving parts of a fit's epochs: the module trained (maybe DDP, maybe compiled), its optimiser
    and schedule, the loss, the views and the augmentation generator."""

    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    criterion: Criterion
    views: Views
    generator: torch.Generator
    precision: str


def train_one_epoch(
    loop: Loop, images: ImageSet, batches: list[torch.Tensor], progress: Progress | None = None
) -> dict[str, float]:
    """One pass over the given batches; returns the summed loss, images seen and the peak learning rate."""
    device = images.pixels.device
    total_loss, seen, peak_lr = 0.0, 0, 0.0
    iterator = progress(iter(batches), len(batches)) if progress else iter(batches)
    if images.features is not None:  # one of the cached views of each image this epoch
        view_of = torch.randint(images.features.shape[0], (len(images),), generator=loop.generator).to(device)
    for rows in iterator:
        rows = rows.to(device)
        if images.features is not None:
            inputs = images.features[view_of[rows], rows]  # (B, 2C): the frozen body already ran, once
        else:
            inputs = loop.views.train(images.pixels[rows], loop.generator, images.geometry_of(rows))
        peak_lr = max(peak_lr, loop.optimizer.param_groups[-1]["lr"])
        loss = training_step(
            loop.trained,
            loop.optimizer,
            inputs,
            images.targets[rows],
            criterion=loop.criterion,
            precision=loop.precision,
        )
        loop.scheduler.step()
        total_loss += loss * len(rows)
        seen += len(rows)
    return {"loss_sum": total_loss, "images": seen, "lr": peak_lr}


# ---------------------------------------------------------------- inference


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: ImageSet,
    *,
    batch_size: int,
    views: Views,
    precision: str = "auto",
    subset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (N, classes) in float32 on the CPU, in the order of `images` (BatchNorm folded: `folded_batchnorm`);
    of the `subset` positions only, in their order, when given (each batch copies only its own pixels)."""
    model.eval()
    model = folded_batchnorm(model)
    device = images.pixels.device
    outputs = []
    order = None if subset is None else subset.cpu()
    count = len(images) if order is None else len(order)
    for rows in batch_indices(count, batch_size, shuffle=False, drop_last=False, order=order):
        rows = rows.to(device)
        if images.features is not None:
            inputs = images.features[0, rows]  # the evaluation view's
        else:
            inputs = views.evaluate(images.pixels[rows])
        with autocast(device, precision):
            logits = model(inputs)
        outputs.append(logits.float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


@timing.timed("features")
@torch.inference_mode()
def with_features(
    model: Classifier,
    images: ImageSet,
    *,
    batch_size: int,
    views: Views,
    precision: str = "auto",
    count: int = 1,
    generator: torch.Generator | None = None,
) -> ImageSet:
    """The same images with the body's pooled features (count, N, 2C) of `count` views of each, computed
    once: the evaluation view, then count - 1 training views (augmented, drawn from `generator`)."""
    model.eval()
    folded = folded_batchnorm(model)
    device = images.pixels.device
    features = []
    for view in range(count):
        chunks = []
        for rows in batch_indices(len(images), batch_size, shuffle=False, drop_last=False):
            pixels, geometry = images.pixels[rows.to(device)], images.geometry_of(rows)
            batch = views.evaluate(pixels, geometry) if view == 0 else views.train(pixels, generator, geometry)
            with autocast(device, precision, training=True):
                chunks.append(folded.pooled_features(batch).float())
        features.append(torch.cat(chunks) if chunks else torch.empty(0, device=device))
    return ImageSet(images.pixels, images.targets, torch.stack(features), images.geometry)


def _sharded_validation(
    model: nn.Module, images: ImageSet, *, world: World, batch_size: int, views: Views, criterion: Criterion
) -> dict[str, float]:
    """Each rank scores its share of the validation set; sums are reduced over ranks. valid_loss is the
    criterion's: with class weights, the weighted mean as in training. No numbers for no images."""
    if not len(images):
        return {}
    rows = torch.arange(world.rank, len(images), world.size)
    logits = predict(model, images, batch_size=batch_size, views=views, subset=rows)
    targets = images.targets[rows.to(images.targets.device)].cpu()
    loss_sum, weight_sum = criterion.sums(logits, targets)
    correct = (logits.argmax(dim=1) == targets).sum().item() if len(targets) else 0
    loss_sum, weight_sum, correct, count = all_reduce_sum(
        [loss_sum, weight_sum, float(correct), float(len(targets))], images.pixels.device
    )
    accuracy = correct / max(count, 1)
    return {"valid_loss": loss_sum / max(weight_sum, 1e-12), "accuracy": accuracy, "error_rate": 1.0 - accuracy}


# ---------------------------------------------------------------- fit


def _batch_size(requested: int, train: ImageSet, world: World) -> int:
    if len(train) == 0:
        raise PetpipeError("the training split is empty; lower split.valid_pct or add images")
    batch_size = min(requested, len(train) // world.size)
    if batch_size < world.size:
        raise PetpipeError(f"{len(train)} training images cannot feed {world.size} processes; use fewer processes")
    return batch_size


def _start_loop(
    model: Classifier,
    *,
    phase: Phase,
    settings: TrainParams,
    views: Views,
    runtime: Runtime,
    total_steps: int,
    criterion: Criterion,
) -> Loop:
    optimizer = make_optimizer(model, group_lrs=phase.group_lrs, weight_decay=settings.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=phase.schedule, total_steps=total_steps)
    # Augmentation differs per rank, like the images each rank sees.
    generator = torch.Generator().manual_seed(phase.seed + runtime.world.rank)
    trained: nn.Module = model
    if runtime.world.distributed:
        device = next(model.parameters()).device
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        trained = compiled(trained)
    return Loop(trained, optimizer, scheduler, criterion, views, generator, runtime.levers.precision)


def _resume(loop: Loop, state: FitState) -> tuple[int, list[dict[str, float]]]:
    """Put the loop back where a fit left it; return the next epoch and the history so far."""
    loop.optimizer.load_state_dict(state.optimizer)
    loop.scheduler.load_state_dict(state.scheduler)
    loop.generator.set_state(state.generator)
    torch.set_rng_state(state.torch_rng)
    return int(state.epoch), list(state.history)


def fit(learner: Learner, phase: Phase, *, resume: FitState | None = None, hooks: FitHooks = FitHooks()) -> History:
    """Train the learner's model for phase.epochs (fastai's fit_one_cycle or fit) and return the per-epoch history.

    The model moves to the images' device, in the memory format of the learner's runtime; its levers
    (precision, memory format, threads) go into every history row. The loss is the learner's criterion.
    `resume` is a FitState from `hooks.on_epoch_end`: the fit continues after
    its epoch and ends exactly as an uninterrupted fit would. With several
    ranks (torchrun), the model trains as DistributedDataParallel and every
    rank returns the same, reduced history. `train.compile` trains through
    torch.compile (validation and the saved weights use the plain module).
    """
    model, world, levers = learner.model, learner.runtime.world, learner.runtime.levers
    device = learner.data.train.pixels.device
    train, valid, batch_size, loop = _prepare(learner, phase)
    start_epoch, history = _resume(loop, resume) if resume is not None else (0, [])
    for epoch in range(start_epoch, phase.epochs):
        started = time.perf_counter()
        set_train_mode(model, freeze_bn_stats=phase.freeze_bn_stats)
        batches = rank_batches(len(train), batch_size, world=world, seed=phase.seed, epoch=epoch)
        with timing.phase("epochs"):
            row = train_one_epoch(loop, train, batches, hooks.progress)
        loss_sum, images_seen = all_reduce_sum([row["loss_sum"], float(row["images"])], device)
        speed = images_seen / max(time.perf_counter() - started, 1e-9)
        with timing.phase("validation"):
            # Batches of the training size, as fastai's validation: an inference pass at twice the batch
            # and the full image size peaked above the training steps themselves.
            metrics = _sharded_validation(
                model, valid, world=world, batch_size=batch_size, views=loop.views, criterion=loop.criterion
            )
        loss = loss_sum / max(images_seen, 1)
        history.append(
            _history_row(epoch + 1, loss, metrics, lr=row["lr"], started=started, speed=speed, levers=levers)
        )
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(_fit_state(loop, epoch + 1, history))
    return history


def _prepare(learner: Learner, phase: Phase) -> tuple[ImageSet, ImageSet, int, Loop]:
    """The model on the images' device in the levers' memory format; the splits (the frozen body's features
    instead of pixels when the phase caches them), the batch size and the loop that trains them."""
    model, data, settings, runtime = learner.model, learner.data, learner.settings, learner.runtime
    world, levers = runtime.world, runtime.levers
    to_device(model, data.train.pixels.device, levers.memory_format)
    views = replace(learner.views, memory_format=levers.memory_format)
    train, valid = data.train, data.valid
    if phase.feature_views:  # the body is frozen and its BatchNorm fixed: run it once, not every epoch
        train, valid = _cached_features(
            model, data, phase=phase, batch_size=settings.batch_size * 2, views=views, precision=levers.precision
        )
    batch_size = _batch_size(settings.batch_size, train, world)
    steps_per_epoch = len(rank_batches(len(train), batch_size, world=world, seed=phase.seed, epoch=0))
    total_steps = phase.epochs * steps_per_epoch
    loop = _start_loop(
        model,
        phase=phase,
        settings=settings,
        views=views,
        runtime=runtime,
        total_steps=total_steps,
        criterion=learner.criterion,
    )
    return train, valid, batch_size, loop


def _cached_features(
    model: Classifier, data: Dataset, *, phase: Phase, batch_size: int, views: Views, precision: str
) -> tuple[ImageSet, ImageSet]:
    """train and valid with the frozen body's features: `phase.feature_views` views of each training image
    (augmented from their own generator, not the loop's), the evaluation view of each validation image."""
    generator = torch.Generator().manual_seed(phase.seed - 1)
    train = with_features(
        model,
        data.train,
        batch_size=batch_size,
        views=views,
        precision=precision,
        count=phase.feature_views,
        generator=generator,
    )
    return train, with_features(model, data.valid, batch_size=batch_size, views=views, precision=precision)


def _history_row(
    epoch: int, loss: float, metrics: dict[str, float], *, lr: float, started: float, speed: float, levers: Levers
) -> dict[str, Any]:
    """history.csv's row of an epoch: its losses and metrics, the peak learning rate, the seconds since it
    `started` (validation included), the training images per second and the levers it ran with."""
    return {
        "epoch": epoch,
        "train_loss": loss,
        **metrics,
        "lr": lr,
        "seconds": round(time.perf_counter() - started, 3),
        "images_per_second": round(speed, 2),
        "precision": levers.precision,
        "memory_format": levers.memory_format,
        "threads": levers.threads,
    }


def _fit_state(loop: Loop, epoch: int, history: list[dict[str, float]]) -> FitState:
    """Everything a resumed fit needs after `epoch`: the history, optimiser, schedule and both generators."""
    return FitState(
        epoch=epoch,
        history=history,
        optimizer=loop.optimizer.state_dict(),
        scheduler=loop.scheduler.state_dict(),
        generator=loop.generator.get_state(),
        torch_rng=torch.get_rng_state(),
    )
