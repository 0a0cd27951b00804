"""What the network sees, as one record: the presized square photos are cached at, the evaluation crop and the
size it is resized to, the weights' normalisation and how the resize is done. The checkpoint, the ONNX bundle's
manifest, the MLflow model's metadata, `views.Views` (torch) and `bundle.EvaluationView` (numpy) all write and
read it through `to_dict` and `from_dict`, so none of them parses it its own way. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from petpipe.errors import PetpipeError

VERSION = 1
# How the evaluation view resizes the crop (augment.center_crop_batch: F.interpolate); written down so that a
# reader in another language, or a later petpipe that resizes otherwise, knows what to reproduce.
RESIZE = {"mode": "bilinear", "align_corners": True, "antialias": False}


def presized_side(img_size: int, presize_ratio: float) -> int:
    """Side of the cached, presized square images (model.img_size x model.presize_ratio)."""
    return int(round(img_size * presize_ratio))


@dataclass(frozen=True)
class Preprocessing:
    img_size: int  # the square side the network sees
    presize: int  # the square side photos are decoded and cached at, before cropping
    eval_crop: float  # fraction of the presized side the evaluation view resizes to img_size
    mean: tuple[float, float, float]  # normalisation that belongs to the weights
    std: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "img_size": self.img_size,
            "presize": self.presize,
            "eval_crop": self.eval_crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": dict(RESIZE),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Preprocessing:
        """A record written by any petpipe: before version 1 no `version`, `resize` or (earliest) `eval_crop`
        was written; those evaluated on the central img_size pixels, resized as RESIZE. A record that resizes
        otherwise than this petpipe can, or from a later version, is refused."""
        version = int(raw.get("version", 0))
        if version > VERSION:
            raise PetpipeError(f"preprocessing version {version} is newer than this petpipe's ({VERSION}); upgrade")
        resize = raw.get("resize", RESIZE)
        if resize != RESIZE:
            raise PetpipeError(f"the model resizes with {resize}, this petpipe with {RESIZE}; export it again")
        img_size, presize = int(raw["img_size"]), int(raw["presize"])
        return cls(
            img_size=img_size,
            presize=presize,
            eval_crop=float(raw.get("eval_crop", img_size / presize)),
            mean=tuple(float(value) for value in raw["mean"]),
            std=tuple(float(value) for value in raw["std"]),
        )
