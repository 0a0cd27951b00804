"""What the network sees: the training view (augmented) and the evaluation view (center crop) of images.

One `Views`, built from the model's spec and `train.augment`, serves the fit
loop, lr-find, evaluate (and its TTA), show_batch, predict and export, so
training, evaluation and prediction cannot preprocess differently
(torchvision's references/classification/presets.py, as one object).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from petpipe.data.augment import augment_batch, center_crop_batch, normalize
from petpipe.model.preprocessing import presized_side
from petpipe.model.spec import ModelSpec
from petpipe.params import AugmentParams, ModelParams
from petpipe.train.hardware import MEMORY_FORMATS

NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def training_size(img_size: int, size_ratio: float) -> int | None:
    """The training view's side for a `size_ratio` of img_size (a multiple of 8, at least 16); None at 1."""
    if size_ratio == 1.0:
        return None
    return max(16, int(round(img_size * size_ratio / 8)) * 8)


@dataclass(frozen=True)
class Views:
    """Presized uint8 pixels (B, 3, presize, presize) -> what the network takes (B, 3, size, size)."""

    size: int
    presize: int
    eval_crop: float  # fraction of the presized side that the evaluation view resizes to `size`
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentParams | None = None  # None: evaluation only (predict, export)
    memory_format: str = "channels_last"  # of the batches, as the model's (hardware.Levers)
    train_size: int | None = None  # side of the training view when it differs from `size` (None: `size`)

    @classmethod
    def of(cls, spec: ModelSpec, augment: AugmentParams | None = None, *, size_ratio: float = 1.0) -> Views:
        """The model's views; `size_ratio` < 1 trains on smaller crops than it evaluates (FixRes: the objects in
        a random-resized crop look larger than in the centre view, so a lower training size matches them)."""
        return cls(
            size=spec.img_size,
            presize=spec.presize,
            eval_crop=spec.eval_crop,
            mean=spec.mean,
            std=spec.std,
            augment=augment,
            train_size=training_size(spec.img_size, size_ratio),
        )

    @classmethod
    def for_display(cls, model: ModelParams, augment: AugmentParams) -> Views:
        """Views to draw (show_batch) before any model exists: `augmented` and `cropped` need no normalisation."""
        mean, std = NO_NORMALISATION
        return cls(
            size=model.img_size,
            presize=presized_side(model.img_size, model.presize_ratio),
            eval_crop=model.eval_crop,
            mean=mean,
            std=std,
            augment=augment,
        )

    def augmented(
        self, pixels: torch.Tensor, generator: torch.Generator, geometry: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training view before normalisation: float (B, 3, size, size) in [0, 1] (what show_batch draws).

        `geometry` (an ImageSet's) marks pixels in the wide layout of train.augment.presize_crop random.
        """
        if self.augment is None:
            raise ValueError("these views have no augmentation (built for evaluation only)")
        return augment_batch(
            pixels, size=self.train_size or self.size, augment=self.augment, generator=generator, geometry=geometry
        )

    def cropped(self, pixels: torch.Tensor, geometry: torch.Tensor | None = None) -> torch.Tensor:
        """The evaluation view before normalisation: float (B, 3, size, size) in [0, 1]."""
        return center_crop_batch(pixels, size=self.size, crop=self.eval_crop, geometry=geometry)

    def train(
        self, pixels: torch.Tensor, generator: torch.Generator, geometry: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Augmented and normalised, in the device's memory format: a training batch."""
        return self._normalised(self.augmented(pixels, generator, geometry))

    def evaluate(self, pixels: torch.Tensor, geometry: torch.Tensor | None = None) -> torch.Tensor:
        """Center-cropped and normalised, in the device's memory format: a validation or prediction batch."""
        return self._normalised(self.cropped(pixels, geometry))

    def _normalised(self, batch: torch.Tensor) -> torch.Tensor:
        normalised = normalize(batch, mean=self.mean, std=self.std)
        return normalised.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
