"""Inference outside the pipeline: predict images with a checkpoint or an exported ONNX bundle, export one.

Images go through exactly evaluate's preprocessing (decode at presize, center
crop, normalise), so predict agrees with evaluate on the validation images; its
inference tail (decode_pixels, pixel_batch, most_probable, classify) also serves
`petpipe serve` and the MLflow model.
A bundle is pickle-free: model.onnx plus bundle.json (classes, preprocessing).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from petpipe import data
from petpipe.atomic import atomic_directory, file_digest, write_json
from petpipe.checkpoint import Checkpoint, load_checkpoint
from petpipe.errors import PetpipeError
from petpipe.hardware import autocast, choose_device, to_device
from petpipe.models import Classifier
from petpipe.pixels import decode_image
from petpipe.views import Views


BUNDLE_FORMAT = "petpipe-bundle/1"
BUNDLE_FILE = "bundle.json"
ONNX_FILE = "model.onnx"
# The opset the torch.export-based exporter targets by default.
ONNX_OPSET = 18


# ---------------------------------------------------------------- predictors


class Predictor(Protocol):
    classes: list[str]
    views: Views  # evaluation only

    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Presized uint8 (B, 3, P, P) -> class probabilities (B, C) float64."""


class CheckpointPredictor:
    """A petpipe checkpoint (model.pt), run with torch on the chosen device."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device):
        self.classes = list(checkpoint.spec.classes)
        self.views = Views.of(checkpoint.spec)
        self.device = device
        self.model = to_device(checkpoint.model(), device).eval()

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        batch = self.views.evaluate(pixels.to(self.device))
        with autocast(self.device):
            logits = self.model(batch)
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


class BundlePredictor:
    """An exported bundle (bundle.json + model.onnx), run with onnxruntime."""

    def __init__(self, folder: Path, device: torch.device):
        manifest = read_bundle(folder)
        self.classes = list(manifest["classes"])
        sizes = manifest["preprocessing"]
        size, presize = int(sizes["img_size"]), int(sizes["presize"])
        # Bundles from before eval_crop evaluated on the central img_size pixels.
        self.views = Views(size=size, presize=presize, eval_crop=float(sizes.get("eval_crop", size / presize)),
                           mean=tuple(sizes["mean"]), std=tuple(sizes["std"]))
        self.session = _onnx_session(folder / manifest["model"], device)
        self.input_name = manifest["input"]["name"]

    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        batch = self.views.evaluate(pixels.cpu())
        (logits,) = self.session.run(None, {self.input_name: batch.contiguous().numpy()})
        return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def _onnx_session(path: Path, device: torch.device) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise PetpipeError("predicting with an exported bundle needs onnxruntime: pip install onnxruntime") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise PetpipeError(f"{path}: not a loadable ONNX model ({error}); export it again") from None


def read_bundle(folder: Path) -> dict[str, Any]:
    """bundle.json of an exported bundle, checked enough to trust its fields."""
    path = Path(folder) / BUNDLE_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PetpipeError(f"{folder}: no {BUNDLE_FILE}; pass a model.pt checkpoint or a folder "
                           f"written by `petpipe export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PetpipeError(f"{path}: not valid JSON ({error}); export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise PetpipeError(f"{path}: not a petpipe bundle (format {BUNDLE_FORMAT}); export it again")
    return manifest


def load_predictor(model: Path, *, device: str = "auto") -> Predictor:
    """A checkpoint file (model.pt) or an exported bundle folder, ready to predict on `device`."""
    model = Path(model)
    chosen = choose_device(device, setting="--device")
    if model.is_dir():
        return BundlePredictor(model, chosen)
    return CheckpointPredictor(load_checkpoint(model), chosen)


# ---------------------------------------------------------------- predicting files


@dataclass
class Prediction:
    """One file's top-k (label, probability), most probable first; or why it could not be predicted."""

    path: str
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path,
                "predictions": [{"label": label, "probability": probability} for label, probability in self.labels],
                "error": self.error}


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
            found.extend(file for file in data.scan_images(path) if file.suffix.lower() in extensions)
        else:
            found.append(path)
    return found


def predict_files(predictor: Predictor, paths: Sequence[Path], *, top_k: int = 3,
                  batch_size: int = 64) -> Iterator[Prediction]:
    """Top-k predictions for each file, in order, batched; an unreadable file yields its error instead."""
    if top_k < 1:
        raise PetpipeError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise PetpipeError(f"--batch-size must be at least 1, got {batch_size}")
    workers = min(8, os.cpu_count() or 1)
    # PIL releases the GIL while decoding, so threads decode a batch in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = [Path(path) for path in paths[start:start + batch_size]]
            decoded = list(pool.map(lambda path: read_pixels(path, predictor.views.presize), chunk))
            for path, result in zip(chunk, classify(predictor, decoded, top_k=top_k)):
                if isinstance(result, str):
                    yield Prediction(path=str(path), error=result)
                else:
                    yield Prediction(path=str(path), labels=result)


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


def pixel_batch(pixels: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(3, P, P) images, or a (B, 3, P, P) slice of the pixel cache, as the uint8 (B, 3, P, P) tensor
    Predictor.probabilities takes."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(pixels)))


def most_probable(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most probable (label, probability) of one image's (C,) probabilities, most probable first; a tie
    keeps class order, and k beyond the classes gives them all."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[index], float(probabilities[index])) for index in best]


def classify(predictor: Predictor, decoded: Sequence[np.ndarray | str], *,
             top_k: int) -> list[list[tuple[str, float]] | str]:
    """Each image's top-k (label, probability), the readable ones in one batch; a reason an image could not be
    read (read_pixels's string) passes through in its place."""
    results: list[list[tuple[str, float]] | str] = [item if isinstance(item, str) else [] for item in decoded]
    readable = [position for position, item in enumerate(decoded) if not isinstance(item, str)]
    if readable:
        probabilities = predictor.probabilities(pixel_batch([decoded[position] for position in readable]))  # (B, C)
        for position, row in zip(readable, probabilities):
            results[position] = most_probable(row, predictor.classes, top_k)
    return results


# ---------------------------------------------------------------- export


def export_bundle(checkpoint_path: Path, out: Path, *, check_tolerance: float = 1e-4) -> dict[str, Any]:
    """Write `out/` = model.onnx + bundle.json from a checkpoint; return the manifest.

    The folder appears whole or not at all (written beside, then renamed). The
    export is checked before it is kept: onnxruntime's probabilities on a
    random batch must match torch's within `check_tolerance`.
    """
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    spec = checkpoint.spec
    model = checkpoint.model().eval()
    example = torch.randn(2, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": ONNX_FILE,
        "runtime": "onnxruntime",
        "input": {"name": "images", "shape": ["batch", 3, spec.img_size, spec.img_size], "dtype": "float32",
                  "layout": "NCHW, RGB, (pixel / 255 - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", spec.num_classes],
                   "meaning": "unnormalised scores; softmax gives class probabilities"},
        "classes": list(spec.classes),
        "preprocessing": {
            "img_size": spec.img_size, "presize": spec.presize, "eval_crop": spec.eval_crop,
            "mean": list(spec.mean), "std": list(spec.std),
            "steps": ["apply EXIF orientation, convert to RGB",
                      "resize the shorter side to presize and center-crop a presize square (bilinear)",
                      "center-crop eval_crop of that square's side and resize it to img_size "
                      "(bilinear, align_corners; no resampling when the crop is img_size pixels)",
                      "scale to [0, 1], subtract mean and divide by std per channel"],
        },
        "arch": spec.arch,
        "stage": checkpoint.stage,
        "source": {"checkpoint": checkpoint_path.name, "sha256": file_digest(checkpoint_path)},
        "opset": ONNX_OPSET,
    }
    with atomic_directory(out) as folder:
        _export_onnx(model, example, folder / ONNX_FILE)
        write_json(folder / BUNDLE_FILE, manifest)
        _check_export(model, example, folder, tolerance=check_tolerance)
        folder.chmod(0o755)  # the temporary folder is private (0700); the bundle is meant to be shared
    return manifest


def _export_onnx(model: Classifier, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        raise PetpipeError("export needs onnx, onnxscript and onnxruntime: "
                           "pip install onnx onnxscript onnxruntime") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The graph optimiser logs every initializer it merges at INFO; that is not news for the user.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        # One self-contained file (external_data=False): these models stay far below ONNX's 2 GB limit.
        # dynamic_shapes by position, so renaming forward's argument cannot break the export.
        program = torch.onnx.export(model, (example,), None, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True,
                                    external_data=False, verbose=False)
        program.save(str(path), external_data=False)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _check_export(model: Classifier, example: torch.Tensor, folder: Path, *, tolerance: float) -> None:
    predictor = BundlePredictor(folder, torch.device("cpu"))
    batch = torch.cat([example, example.flip(0), example * 0.5])  # another batch size than the export's
    exported = predictor.session.run(None, {predictor.input_name: batch.numpy()})[0]
    with torch.inference_mode():
        reference = torch.softmax(model(batch).double(), dim=1).numpy()
    difference = np.abs(torch.softmax(torch.from_numpy(exported).double(), dim=1).numpy() - reference).max()
    if not difference <= tolerance:
        raise PetpipeError(f"the exported model disagrees with the checkpoint (probabilities differ by up to "
                           f"{difference:.2e} > {tolerance:.0e}); nothing was written")


# ---------------------------------------------------------------- show-batch
