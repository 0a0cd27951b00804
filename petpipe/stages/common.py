"""What the training stages share: seeding, the image sets, resume files and their outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from petpipe import plots, tracking
from petpipe.atomic import file_digest, save_figure, write_csv, write_json
from petpipe.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from petpipe.data import class_names, load_index
from petpipe.distributed import World, barrier
from petpipe.errors import PetpipeError
from petpipe.models import Classifier, Preprocessing
from petpipe.params import Params
from petpipe.pixels import load_pixels
from petpipe.training import FitState, ImageSet, evaluation_view, fit, to_device, with_features

log = logging.getLogger(__name__)


def stage_seed(seed: int, stage: str) -> int:
    """train.seed made distinct per stage.

    With one seed for all, lr-find and finetune would replay train-head's exact
    batches, augmentations and dropout masks, which the head has memorised: the
    LR finder then sees a loss near zero and diverges at once.
    """
    return (seed * 1_000_003 + zlib.crc32(stage.encode())) % 2**63


def seed_everything(seed: int) -> None:
    """Seed every global RNG; the training loop also draws from its own generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Dataset:
    classes: list[str]
    train: ImageSet
    valid: ImageSet
    index: pd.DataFrame


def load_dataset(index_path: Path, images: Path, *, presize: int, device: torch.device, workers: int,
                 classes: list[str] | None = None, world: World = World()) -> Dataset:
    """The indexed images as train and valid ImageSets, decoded once into the pixel cache.

    `classes` fixes the class order (a checkpoint's); by default it is index-labels' sorted labels.
    """
    index = load_index(index_path)
    classes = classes if classes is not None else class_names(index)
    unknown = sorted(set(index["label"]) - set(classes))
    if unknown:
        raise PetpipeError(f"{index_path} has labels the model was not trained on: {', '.join(unknown[:5])}; "
                           f"rerun train-head (dvc repro)")
    paths = [images / relative for relative in index["path"]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise PetpipeError(f"{len(missing)} indexed images are missing, e.g. {missing[0]}; "
                           f"rerun fetch and index-labels (dvc repro)")
    class_ids = index["label"].map({name: position for position, name in enumerate(classes)}).to_numpy()
    rows = {split: np.flatnonzero((index["split"] == split).to_numpy()) for split in ("train", "valid")}
    if not world.is_main:
        barrier()  # rank 0 decodes the images into the cache first; the others then map it
    # One cache per split, so that each split is one contiguous memory map that batches index directly.
    pixels = {split: load_pixels([paths[row] for row in chosen], list(index["hash"].iloc[chosen]), presize,
                                 workers=workers) for split, chosen in rows.items()}
    if world.is_main and world.distributed:
        barrier()

    def subset(split: str) -> ImageSet:
        return ImageSet.from_cache(pixels[split], class_ids[rows[split]], device)

    return Dataset(classes=classes, train=subset("train"), valid=subset("valid"), index=index)


def progress_bar(description: str):
    """A tqdm bar per epoch, on stderr so stage summaries stay clean on stdout."""
    from tqdm import tqdm

    def wrap(iterator: Iterator[Any], total: int) -> Iterator[Any]:
        return iter(tqdm(iterator, total=total, desc=description, unit="batch", leave=False))

    return wrap


class ResumeFile:
    """The last completed epoch of an interrupted stage, outside DVC's outputs.

    DVC deletes a stage's outputs before rerunning it, so resume state lives in
    `.petpipe/resume/`, keyed by everything the result depends on: a rerun with
    other params or inputs starts over instead of resuming a different run.
    """

    def __init__(self, stage: str, *, params: dict[str, Any], inputs: list[Path], root: Path = Path(".petpipe/resume")):
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
        for path in inputs:
            digest.update(file_digest(path).encode())
        self.path = root / f"{stage}-{digest.hexdigest()[:20]}.pt"

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            checkpoint = load_checkpoint(self.path)
        except PetpipeError as error:
            log.warning("ignoring unreadable resume file %s (%s)", self.path, error)
            return None
        log.info("resuming from %s (epoch %d done)", self.path, checkpoint["resume"]["epoch"])
        return checkpoint

    def save(self, checkpoint: dict[str, Any]) -> None:
        save_checkpoint(self.path, checkpoint)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def final_metrics(history: list[dict[str, float]], *, stage: str) -> dict[str, Any]:
    last = history[-1]
    return {
        "stage": stage,
        "epochs": int(last["epoch"]),
        "train_loss": last["train_loss"],
        "valid_loss": last.get("valid_loss"),
        "accuracy": last.get("accuracy"),
        "error_rate": last.get("error_rate"),
    }  # no timings: the same seed must give the same metrics.json (history.csv has the seconds)


def write_training_outputs(*, model_path: Path, metrics_path: Path, history_path: Path, plot_path: Path,
                           checkpoint: dict[str, Any], metrics: dict[str, Any], title: str) -> None:
    """Write the stage's four outputs, each atomically; the checkpoint last, as the sign of completion."""
    history = pd.DataFrame(checkpoint["history"])
    write_csv(history_path, history)
    save_figure(plot_path, plots.plot_training_history(history, title=title))
    write_json(metrics_path, metrics)
    save_checkpoint(model_path, {**checkpoint, "resume": None})


@dataclass(frozen=True)
class TrainedOutputs:
    """The four outputs of train-head and finetune."""

    model: Path
    metrics: Path
    history: Path
    plot: Path


def train_and_save(
    stage: str, model: Classifier, *, data: Dataset, params: Params, used: dict[str, Any], inputs: list[Path],
    preprocessing: Preprocessing, arch: str, weights: str, img_size: int, presize: int, head_hidden: int,
    head_dropout: float, epochs: int, group_lrs: dict[str, float], schedule: str, freeze_bn_stats: bool,
    outputs: TrainedOutputs, title: str, world: World = World(), cache_features: bool = False,
) -> dict[str, Any]:
    """Fit (resuming an interrupted run of the same stage, params and inputs), log, write outputs.

    With several ranks, every rank trains and rank 0 alone writes files and logs.
    Returns the stage's metrics.
    """
    resume_file = ResumeFile(stage, params=used, inputs=inputs)
    resume = resume_file.load()
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
    device = data.train.pixels.device
    to_device(model, device)
    train, valid = data.train, data.valid
    if cache_features:  # the body is frozen and its BatchNorm fixed: run it once, not every epoch
        train, valid = (with_features(model, images=images, batch_size=params.train.batch_size * 2, size=img_size,
                                      preprocessing=preprocessing, precision=params.train.precision)
                        for images in (train, valid))

    def checkpoint(history: list[dict[str, float]], resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
        return make_checkpoint(
            model, stage=stage, arch=arch, weights=weights, classes=data.classes, preprocessing=preprocessing,
            img_size=img_size, presize=presize, head_hidden=head_hidden, head_dropout=head_dropout, params=used,
            history=history, resume=resume_state)

    logging_context = tracking.stage_run(stage, params=used) if world.is_main else tracking.no_run(stage)
    with logging_context as run_log:
        def on_epoch_end(state: FitState) -> None:
            if not world.is_main:
                return
            resume_file.save(checkpoint(state.history, state.to_dict()))
            row = state.history[-1]
            run_log.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=int(row["epoch"]))

        history = fit(
            model, train=train, valid=valid, epochs=epochs, group_lrs=group_lrs, schedule=schedule,
            weight_decay=params.train.weight_decay, batch_size=params.train.batch_size, size=img_size,
            augment=params.train.augment, preprocessing=preprocessing, seed=stage_seed(params.train.seed, stage),
            freeze_bn_stats=freeze_bn_stats, world=world,
            precision=params.train.precision, compile=params.train.compile,
            resume=resume["resume"] if resume else None, on_epoch_end=on_epoch_end,
            progress=progress_bar(stage) if world.is_main else None,
        )
        metrics = final_metrics(history, stage=stage)
        if world.is_main:
            write_training_outputs(model_path=outputs.model, metrics_path=outputs.metrics,
                                   history_path=outputs.history, plot_path=outputs.plot,
                                   checkpoint=checkpoint(history), metrics=metrics, title=title)
            run_log.log_artifacts([outputs.metrics, outputs.history, outputs.plot])
            example = evaluation_view(data.valid.pixels[:1] if len(data.valid) else data.train.pixels[:1],
                                      size=img_size, preprocessing=preprocessing)
            run_log.log_model(model, input_example=example.cpu().numpy(),
                              registered_name=params.tracking.registered_model if stage == "finetune" else None,
                              metadata={"classes": data.classes, "img_size": img_size,
                                        "mean": list(preprocessing.mean), "std": list(preprocessing.std)})
    if world.is_main:
        resume_file.clear()
    barrier()
    return metrics


def head_fixes_bn_stats(*, cache_features: bool, train_bn: bool) -> bool:
    """Whether train-head keeps the body's BatchNorm statistics fixed: with cached features (the body ran
    once, in eval mode) or without train_bn. finetune.bn_stats auto then keeps them fixed too."""
    return cache_features or not train_bn


def describe_metrics(stage: str, metrics: dict[str, Any]) -> str:
    return (f"{stage}: {metrics['epochs']} epochs, accuracy {metrics['accuracy']:.4f}, "
            f"valid loss {metrics['valid_loss']:.4f}")
