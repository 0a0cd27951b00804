"""An exported bundle (bundle.json + model.onnx) read and run with numpy, Pillow and onnxruntime only: no torch.

Its evaluation view is views.Views.evaluate written in numpy (center crop of the presized square, bilinear
resize with align_corners, normalise), so a bundle predicts what its checkpoint predicts (to 1e-4 in
probabilities; tests/test_predict.py runs it where importing torch fails). Example:

    petpipe export --out bundle/ && petpipe predict --model bundle/ photo.jpg
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from petpipe.errors import PetpipeError
from petpipe.model.preprocessing import Preprocessing

BUNDLE_FORMAT = "petpipe-bundle/1"
BUNDLE_FILE = "bundle.json"
ONNX_FILE = "model.onnx"


def read_bundle(folder: Path) -> dict[str, Any]:
    """bundle.json of an exported bundle, checked enough to trust its fields."""
    path = Path(folder) / BUNDLE_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PetpipeError(
            f"{folder}: no {BUNDLE_FILE}; pass a model.pt checkpoint or a folder written by `petpipe export`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PetpipeError(f"{path}: not valid JSON ({error}); export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise PetpipeError(f"{path}: not a petpipe bundle (format {BUNDLE_FORMAT}); export it again")
    return manifest


@dataclass(frozen=True)
class EvaluationView:
    """Presized uint8 pixels (B, 3, presize, presize) -> the float32 (B, 3, size, size) the network takes."""

    size: int
    presize: int
    eval_crop: float  # fraction of the presized side resized to `size`
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, preprocessing: dict[str, Any]) -> EvaluationView:
        """bundle.json's `preprocessing` (`Preprocessing.from_dict`: a bundle that resizes otherwise than this
        petpipe can is refused)."""
        seen = Preprocessing.from_dict(preprocessing)
        return cls(size=seen.img_size, presize=seen.presize, eval_crop=seen.eval_crop, mean=seen.mean, std=seen.std)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """augment.center_crop_batch, then augment.normalize: the same crop, resize and arithmetic."""
        height, width = pixels.shape[-2:]
        side = min(max(round(self.eval_crop * min(height, width)), 1), min(height, width))
        top, left = (height - side) // 2, (width - side) // 2
        batch = pixels[..., top : top + side, left : left + side].astype(np.float32) / np.float32(255.0)
        if side != self.size:
            batch = resize_bilinear(batch, self.size)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((batch - mean) / std, dtype=np.float32)


def _bilinear_weights(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (low, high) and the high one's weight for each of `target` rows, with align_corners: the
    first and last pixels' centres map onto each other (torch's upsample_bilinear2d, align_corners=True)."""
    scale = np.float32((source - 1) / (target - 1)) if target > 1 else np.float32(0.0)
    position = scale * np.arange(target, dtype=np.float32)
    low = np.minimum(position.astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (position - low).astype(np.float32)


def resize_bilinear(batch: np.ndarray, size: int) -> np.ndarray:
    """(B, C, H, W) float32 -> (B, C, size, size), bilinear with align_corners and no antialiasing, as
    F.interpolate(mode="bilinear", align_corners=True): rows first, then columns."""
    low, high, weight = _bilinear_weights(batch.shape[-2], size)
    rows = batch[..., low, :] * (1 - weight)[:, None] + batch[..., high, :] * weight[:, None]  # (B, C, size, W)
    low, high, weight = _bilinear_weights(batch.shape[-1], size)
    return rows[..., low] * (1 - weight) + rows[..., high] * weight  # (B, C, size, size)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(B, C) logits -> probabilities in float64 (as torch.softmax of the logits in double)."""
    shifted = logits.astype(np.float64) - logits.astype(np.float64).max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


class BundlePredictor:
    """An exported bundle, run with onnxruntime: a predict.Predictor that needs neither torch nor petpipe's
    model code."""

    def __init__(self, folder: Path, *, device: str = "cpu"):
        folder = Path(folder)
        manifest = read_bundle(folder)
        self.classes = list(manifest["classes"])
        self.view = EvaluationView.of(manifest["preprocessing"])
        self.presize = self.view.presize
        self.session = onnx_session(folder / manifest["model"], device)
        self.input_name = manifest["input"]["name"]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Normalised float32 (B, 3, size, size) -> the network's (B, C) logits."""
        (logits,) = self.session.run(None, {self.input_name: batch})
        return logits

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Presized uint8 (B, 3, P, P) -> class probabilities (B, C) float64."""
        return softmax(self.logits(self.view(pixels)))


def onnx_session(path: Path, device: str) -> Any:
    """An onnxruntime session on the CPU, or on CUDA for `auto` and `cuda*` when onnxruntime has it."""
    try:
        import onnxruntime
    except ImportError:
        raise PetpipeError("predicting with an exported bundle needs onnxruntime: pip install onnxruntime") from None
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device.startswith("cuda") and not has_cuda:
        raise PetpipeError(f"--device = {device!r} but this onnxruntime has no CUDA provider; use auto or cpu")
    providers = ["CPUExecutionProvider"]
    if has_cuda and (device == "auto" or device.startswith("cuda")):
        index = device.partition(":")[2] or "0"
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index)}))
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise PetpipeError(f"{path}: not a loadable ONNX model ({error}); export it again") from None
