"""What the training stages share: seeding, the image sets, resume files and their outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from petpipe import plots
from petpipe.atomic import save_figure, write_csv, write_json
from petpipe.checkpoint import file_digest, load_checkpoint, save_checkpoint
from petpipe.data import class_names, load_index
from petpipe.errors import PetpipeError
from petpipe.pixels import load_pixels
from petpipe.training import ImageSet

log = logging.getLogger(__name__)


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
                 classes: list[str] | None = None) -> Dataset:
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
    pixels = load_pixels(paths, list(index["hash"]), presize, workers=workers)
    class_ids = index["label"].map({name: position for position, name in enumerate(classes)}).to_numpy()

    def subset(split: str) -> ImageSet:
        rows = np.flatnonzero((index["split"] == split).to_numpy())
        return ImageSet.from_cache(pixels, rows, class_ids[rows], device)

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
        "seconds": round(sum(row["seconds"] for row in history), 3),
    }


def write_training_outputs(*, model_path: Path, metrics_path: Path, history_path: Path, plot_path: Path,
                           checkpoint: dict[str, Any], metrics: dict[str, Any], title: str) -> None:
    """Write the stage's four outputs, each atomically; the checkpoint last, as the sign of completion."""
    history = pd.DataFrame(checkpoint["history"])
    write_csv(history_path, history)
    save_figure(plot_path, plots.plot_training_history(history, title=title))
    write_json(metrics_path, metrics)
    save_checkpoint(model_path, {**checkpoint, "resume": None})
