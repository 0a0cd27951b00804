"""The torch side of prediction: a checkpoint's predictor, and its export as an ONNX bundle checked against it.

petpipe/inference/predict.py loads this module only for a checkpoint, so that predicting with a bundle never imports
torch (petpipe/inference/bundle.py runs it with numpy, Pillow and onnxruntime). Example:

    petpipe export --model stages/finetune/model.pt --out bundle/
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.inference.bundle import BUNDLE_FILE, BUNDLE_FORMAT, ONNX_FILE, BundlePredictor, softmax
from petpipe.model.backbones import Classifier
from petpipe.model.checkpoint import Checkpoint, load_checkpoint
from petpipe.train.hardware import autocast, choose_device, to_device
from petpipe.utils.atomic import atomic_directory
from petpipe.utils.file_formats import file_digest, write_json

# The opset the torch.export-based exporter targets by default.
ONNX_OPSET = 18


class CheckpointPredictor:
    """A petpipe checkpoint (model.pt), run with torch on the chosen device: a predict.Predictor."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device):
        self.classes = list(checkpoint.spec.classes)
        self.views = Views.of(checkpoint.spec)
        self.presize = self.views.presize
        self.device = device
        self.model = to_device(checkpoint.model(), device).eval()

    @classmethod
    def load(cls, path: Path, *, device: str) -> CheckpointPredictor:
        """The checkpoint at `path` on `device` (a name: auto, cpu, cuda, cuda:N or mps)."""
        return cls(load_checkpoint(path), choose_device(device, setting="--device"))

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Presized uint8 (B, 3, P, P) -> class probabilities (B, C) float64."""
        batch = self.views.evaluate(torch.from_numpy(pixels).to(self.device))
        with autocast(self.device):
            logits = self.model(batch)
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


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
    manifest = _manifest(checkpoint, checkpoint_path)
    with atomic_directory(out) as folder:
        _export_onnx(model, example, folder / ONNX_FILE)
        write_json(folder / BUNDLE_FILE, manifest)
        _check_export(model, example, folder, tolerance=check_tolerance)
        folder.chmod(0o755)  # the temporary folder is private (0700); the bundle is meant to be shared
    return manifest


def _manifest(checkpoint: Checkpoint, checkpoint_path: Path) -> dict[str, Any]:
    """bundle.json: the ONNX graph's input and output, the classes and what the network sees."""
    spec = checkpoint.spec
    return {
        "format": BUNDLE_FORMAT,
        "model": ONNX_FILE,
        "runtime": "onnxruntime",
        "input": {
            "name": "images",
            "shape": ["batch", 3, spec.img_size, spec.img_size],
            "dtype": "float32",
            "layout": "NCHW, RGB, (pixel / 255 - mean) / std",
        },
        "output": {
            "name": "logits",
            "shape": ["batch", spec.num_classes],
            "meaning": "unnormalised scores; softmax gives class probabilities",
        },
        "classes": list(spec.classes),
        "preprocessing": {
            **spec.preprocessing.to_dict(),
            "steps": [
                "apply EXIF orientation, convert to RGB",
                "resize the shorter side to presize and center-crop a presize square (bilinear)",
                "center-crop eval_crop of that square's side and resize it to img_size "
                "(bilinear, align_corners; no resampling when the crop is img_size pixels)",
                "scale to [0, 1], subtract mean and divide by std per channel",
            ],
        },
        "arch": spec.arch,
        "stage": checkpoint.stage,
        "source": {"checkpoint": checkpoint_path.name, "sha256": file_digest(checkpoint_path)},
        "opset": ONNX_OPSET,
    }


def _export_onnx(model: Classifier, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError:
        raise PetpipeError(
            "export needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime"
        ) from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The graph optimiser logs every initializer it merges at INFO; that is not news for the user.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        # One self-contained file (external_data=False): these models stay far below ONNX's 2 GB limit.
        # dynamic_shapes by position, so renaming forward's argument cannot break the export.
        program = torch.onnx.export(
            model,
            (example,),
            None,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _check_export(model: Classifier, example: torch.Tensor, folder: Path, *, tolerance: float) -> None:
    predictor = BundlePredictor(folder, device="cpu")
    batch = torch.cat([example, example.flip(0), example * 0.5])  # another batch size than the export's
    exported = softmax(predictor.logits(batch.numpy()))
    with torch.inference_mode():
        reference = torch.softmax(model(batch).double(), dim=1).numpy()
    difference = np.abs(exported - reference).max()
    if not difference <= tolerance:
        raise PetpipeError(
            f"the exported model disagrees with the checkpoint (probabilities differ by up to "
            f"{difference:.2e} > {tolerance:.0e}); nothing was written"
        )
