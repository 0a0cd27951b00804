"""What the network sees: the training view (augmented) and the evaluation view (center crop) of images.

One `Views`, built from the model's spec and `train.augment`, serves the fit
loop, lr-find, evaluate (and its TTA), show_batch, predict and export, so
training, evaluation and prediction cannot preprocess differently
(torchvision's references/classification/presets.py, as one object).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from petpipe.augment import augment_batch, center_crop_batch, normalize
from petpipe.hardware import memory_format
from petpipe.params import AugmentParams
from petpipe.spec import ModelSpec

NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Views:
    """Presized uint8 pixels (B, 3, presize, presize) -> what the network takes (B, 3, size, size)."""

    size: int
    presize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentParams | None = None  # None: evaluation only (predict, export)

    @classmethod
    def of(cls, spec: ModelSpec, augment: AugmentParams | None = None) -> Views:
        return cls(size=spec.img_size, presize=spec.presize, mean=spec.mean, std=spec.std, augment=augment)

    @classmethod
    def for_display(cls, *, size: int, presize: int, augment: AugmentParams) -> Views:
        """Views to draw (show_batch) before any model exists: `augmented` and `cropped` need no normalisation."""
        mean, std = NO_NORMALISATION
        return cls(size=size, presize=presize, mean=mean, std=std, augment=augment)

    def augmented(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training view before normalisation: float (B, 3, size, size) in [0, 1] (what show_batch draws)."""
        if self.augment is None:
            raise ValueError("these views have no augmentation (built for evaluation only)")
        return augment_batch(pixels, size=self.size, augment=self.augment, generator=generator)

    def cropped(self, pixels: torch.Tensor) -> torch.Tensor:
        """The evaluation view before normalisation: float (B, 3, size, size) in [0, 1]."""
        return center_crop_batch(pixels, size=self.size)

    def train(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented and normalised, in the device's memory format: a training batch."""
        return self._normalised(self.augmented(pixels, generator))

    def evaluate(self, pixels: torch.Tensor) -> torch.Tensor:
        """Center-cropped and normalised, in the device's memory format: a validation or prediction batch."""
        return self._normalised(self.cropped(pixels))

    def _normalised(self, batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch, mean=self.mean, std=self.std).contiguous(memory_format=memory_format(batch.device))
