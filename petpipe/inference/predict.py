"""Inference outside the pipeline: predict images with a checkpoint or an exported ONNX bundle.

Images go through exactly evaluate's preprocessing (decode at presize, center
crop, normalise), so predict agrees with evaluate on the validation images; its
inference tail (decode_pixels, pixel_batch, most_probable, classify) also serves
`petpipe serve` and the MLflow model. This module does not import torch: a
checkpoint's predictor (petpipe/inference/onnx_export.py) loads it, a bundle's
(petpipe/inference/bundle.py) needs only numpy, Pillow and onnxruntime.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from petpipe.data.folders import visible_files
from petpipe.data.pixels import decode_image
from petpipe.errors import PetpipeError
from petpipe.inference.bundle import BundlePredictor
from petpipe.utils.devices import DEVICE_CHOICES, is_device_name

# ---------------------------------------------------------------- predictors


class Predictor(Protocol):
    classes: list[str]
    presize: int  # the side images are decoded at (decode_pixels)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Presized uint8 (B, 3, P, P) -> class probabilities (B, C) float64."""


def model_file(model: str | Path) -> Path:
    """A model as a local path: a registered model (models:/<name>@<alias> or models:/<name>/<version>) is
    downloaded once per version into .petpipe/models/ from MLFLOW_TRACKING_URI (else the project's mlflow.db);
    a path stays as it is. `petpipe predict`, `petpipe serve` and petpipe.load_model resolve --model here."""
    if not str(model).startswith("models:/"):  # a path: no MLflow import
        return Path(model)
    from petpipe.track import registry
    from petpipe.track.identity import tracking_uri
    from petpipe.utils.paths import petpipe_folder, project_root

    return registry.checkpoint_of(
        str(model), tracking_uri=tracking_uri(project_root()), cache=petpipe_folder() / "models"
    )


def load_predictor(model: Path, *, device: str = "auto") -> Predictor:
    """A checkpoint file (model.pt), run with torch, or an exported bundle folder, run with onnxruntime alone,
    ready to predict on `device`."""
    model = Path(model)
    if not is_device_name(device):
        raise PetpipeError(f"--device = {device!r} is not a device; use {DEVICE_CHOICES}")
    if model.is_dir():
        return BundlePredictor(model, device=device)
    from petpipe.inference.onnx_export import CheckpointPredictor  # here: a bundle must not pay for (or need) torch

    return CheckpointPredictor.load(model, device=device)


# ---------------------------------------------------------------- predicting files


@dataclass
class Prediction:
    """One file's top-k (label, probability), most probable first; or why it could not be predicted."""

    path: str
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "predictions": [{"label": label, "probability": probability} for label, probability in self.labels],
            "error": self.error,
        }


def _image_extensions() -> frozenset[str]:
    return frozenset(extension.lower() for extension in Image.registered_extensions())


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders replaced by the image files under them (sorted); missing paths kept.

    A missing path stays in the list so that predicting it reports the error by name.
    """
    extensions = _image_extensions()
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(path / file for file in visible_files(path) if file.suffix.lower() in extensions)
        else:
            found.append(path)
    return found


def predict_files(
    predictor: Predictor, paths: Sequence[Path], *, top_k: int = 3, batch_size: int = 64
) -> Iterator[Prediction]:
    """Top-k predictions for each file, in order, batched; an unreadable file yields its error instead."""
    paths = [Path(path) for path in paths]
    return predict_images(predictor, paths, names=[str(path) for path in paths], top_k=top_k, batch_size=batch_size)


def predict_images(
    predictor: Predictor, images: Sequence[Path | bytes], *, names: Sequence[str], top_k: int = 3, batch_size: int = 64
) -> Iterator[Prediction]:
    """Top-k predictions for each image (a file, or an image file's bytes), named by `names`, in order and
    batched; an unreadable image yields its error instead."""
    if top_k < 1:
        raise PetpipeError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise PetpipeError(f"--batch-size must be at least 1, got {batch_size}")
    workers = min(8, os.cpu_count() or 1)
    # PIL releases the GIL while decoding, so threads decode a batch in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            decoded = list(pool.map(lambda image: read_pixels(image, predictor.presize), chunk))
            for name, result in zip(names[start : start + batch_size], classify(predictor, decoded, top_k=top_k)):
                if isinstance(result, str):
                    yield Prediction(path=name, error=result)
                else:
                    yield Prediction(path=name, labels=result)


def format_prediction(prediction: Prediction) -> str:
    """`path<TAB>label 0.9312<TAB>label 0.0411 ...`: one line per image, easy to cut and grep."""
    return "\t".join([prediction.path, *(f"{label} {probability:.4f}" for label, probability in prediction.labels)])


# ---------------------------------------------------------------- the inference tail: pixels in, top-k out
# One path for `petpipe predict`, `petpipe serve` (Try it and Clean pages) and the MLflow model.


def decode_pixels(image: Path | str | bytes, presize: int) -> np.ndarray:
    """One image, a file or its bytes as uploaded, as the (3, P, P) uint8 pixels evaluate's pixel cache holds
    (decoded at presize); the decoder's own exception when it cannot be read."""
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
    return decode_image(source, presize).transpose(2, 0, 1)


def read_pixels(image: Path | str | bytes, presize: int) -> np.ndarray | str:
    """decode_pixels, or why the image cannot be read: one bad image is reported, the rest are predicted."""
    try:
        return decode_pixels(image, presize)
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory"
    except Exception as error:  # noqa: BLE001  (any decoder failure: report it, predict the rest)
        return f"cannot read image ({type(error).__name__}: {error})"


def pixel_batch(pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(3, P, P) images, or a (B, 3, P, P) slice of the pixel cache, as the contiguous uint8 (B, 3, P, P)
    array Predictor.probabilities takes."""
    return np.ascontiguousarray(np.stack(pixels))


def most_probable(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most probable (label, probability) of one image's (C,) probabilities, most probable first; a tie
    keeps class order, and k beyond the classes gives them all."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[index], float(probabilities[index])) for index in best]


def classify(
    predictor: Predictor, decoded: Sequence[np.ndarray | str], *, top_k: int
) -> list[list[tuple[str, float]] | str]:
    """Each image's top-k (label, probability), the readable ones in one batch; a reason an image could not be
    read (read_pixels's string) passes through in its place."""
    results: list[list[tuple[str, float]] | str] = [item if isinstance(item, str) else [] for item in decoded]
    readable = [position for position, item in enumerate(decoded) if not isinstance(item, str)]
    if readable:
        probabilities = predictor.probabilities(pixel_batch([decoded[position] for position in readable]))  # (B, C)
        for position, row in zip(readable, probabilities):
            results[position] = most_probable(row, predictor.classes, top_k)
    return results
