"""The indexed images as tensors: train and valid (and, for evaluate alone, test) `ImageSet`s read from the
pixel cache.

index-labels decided the split and the labels; this module only reads them
(`data.load_index`) and maps the presized pixels (`pixels.load_pixels`). The test split is decoded only when
asked (`with_test`): the training stages never read a test photo, not even into the pixel cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from petpipe.data.image_index import class_names, load_index
from petpipe.data.pixels import load_pixels, load_wide_pixels
from petpipe.errors import PetpipeError
from petpipe.train.distributed import barrier
from petpipe.train.hardware import Runtime


@dataclass
class ImageSet:
    """Presized uint8 pixels (N, 3, P, P) and class ids (N,), on the training device.

    `features`, when set, holds the frozen body's pooled output (V, N, 2C) of V
    views of each image (the first its evaluation view), computed once: the head
    then trains on them without running the body.
    """

    pixels: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None
    # (N, 2) for pixels in the wide layout of pixels.decode_wide (train.augment.presize_crop random):
    # the fraction of the width each photo fills, and 1.0 where it is stored transposed.
    geometry: torch.Tensor | None = None

    @classmethod
    def from_cache(
        cls, pixels: np.ndarray, targets: np.ndarray, device: torch.device, geometry: np.ndarray | None = None
    ) -> ImageSet:
        """On a CPU the tensor is the (copy-on-write) memory map itself: batches copy only their own
        images, and the OS pages the rest in and out. On a GPU the whole set is copied to the device once."""
        subset = torch.from_numpy(pixels)
        if device.type == "cuda":
            subset = subset.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            subset = subset.to(device)
        shapes = None if geometry is None else torch.from_numpy(np.asarray(geometry, dtype=np.float32))
        return cls(subset, torch.as_tensor(targets, dtype=torch.long, device=device), geometry=shapes)

    def geometry_of(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The wide-layout geometry of the given rows (None for square pixels)."""
        return None if self.geometry is None else self.geometry[rows.cpu()]

    def __len__(self) -> int:
        return self.targets.shape[0]


@dataclass(frozen=True)
class Dataset:
    classes: list[str]
    train: ImageSet
    valid: ImageSet
    index: pd.DataFrame
    folder: Path  # the images folder index.csv's paths are relative to
    test: ImageSet | None = None  # loaded only with_test (evaluate); None for the training stages

    def rows(self, split: str) -> pd.DataFrame:
        """index.csv's rows of one split, in the order of that split's ImageSet."""
        return self.index[self.index["split"] == split].reset_index(drop=True)


def _check_usable(index: pd.DataFrame, index_path: Path, classes: Sequence[str], paths: Sequence[Path]) -> None:
    """Refuse labels the model does not know and indexed images that are gone, each in one line."""
    unknown = sorted(set(index["label"]) - set(classes))
    if unknown:
        raise PetpipeError(
            f"{index_path} has labels the model was not trained on: {', '.join(unknown[:5])}; "
            f"rerun train-head (dvc repro)"
        )
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise PetpipeError(
            f"{len(missing)} indexed images are missing, e.g. {missing[0]}; rerun fetch and index-labels (dvc repro)"
        )


def load_dataset(
    index_path: Path,
    images: Path,
    *,
    presize: int,
    runtime: Runtime,
    workers: int,
    classes: Sequence[str] | None = None,
    wide_train: bool = False,
    with_test: bool = False,
) -> Dataset:
    """The indexed images as train and valid ImageSets on the runtime's device, decoded once into the
    pixel cache; with_test, the test split's too (evaluate's; the training stages leave it unread).

    `classes` fixes the class order (a checkpoint's); by default it is index-labels' sorted labels.
    wide_train: the training split keeps each photo's long side (pixels.decode_wide), for
    train.augment.presize_crop random.
    """
    world, device = runtime.world, runtime.device
    index = load_index(index_path)
    classes = list(classes) if classes is not None else class_names(index)
    # The test split only when asked for and not empty: no pixel cache of nothing.
    splits = ("train", "valid") + (("test",) if with_test and (index["split"] == "test").any() else ())
    rows = {split: np.flatnonzero((index["split"] == split).to_numpy()) for split in splits}
    paths = [images / relative for relative in index["path"]]
    _check_usable(index, index_path, classes, [paths[row] for chosen in rows.values() for row in chosen])
    class_ids = index["label"].map({name: position for position, name in enumerate(classes)}).to_numpy()
    if not world.is_main:
        barrier()  # rank 0 decodes the images into the cache first; the others then map it
    # One cache per split, so that each split is one contiguous memory map that batches index directly.
    pixels, geometry = {}, {}
    for split, chosen in rows.items():
        files, hashes = [paths[row] for row in chosen], list(index["hash"].iloc[chosen])
        if split == "train" and wide_train:
            pixels[split], geometry[split] = load_wide_pixels(files, hashes, presize, workers=workers)
        else:
            pixels[split] = load_pixels(files, hashes, presize, workers=workers)
    if world.is_main and world.distributed:
        barrier()

    def subset(split: str) -> ImageSet:
        return ImageSet.from_cache(pixels[split], class_ids[rows[split]], device, geometry.get(split))

    test = subset("test") if "test" in rows else None
    return Dataset(
        classes=classes, train=subset("train"), valid=subset("valid"), index=index, folder=Path(images), test=test
    )
