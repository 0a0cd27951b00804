"""The model as one value: architecture, weights, classes, head, image sizes and normalisation.

train-head builds a `ModelSpec` from `params.model` and the classes; it is saved
in every checkpoint, and training, evaluation, prediction and export rebuild the
network (`models.build_model`) and what it sees (`views.Views`) from it, so
they cannot disagree (nanoGPT's GPTConfig, timm's PretrainedCfg).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from petpipe.model.backbones import normalisation
from petpipe.model.preprocessing import Preprocessing, presized_side
from petpipe.params import ModelParams


@dataclass(frozen=True)
class HeadSpec:
    """fastai's create_head settings: hidden units, and dropout (the first dropout is half of it)."""

    hidden: int
    dropout: float


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    weights: str  # what the body started from: imagenet, none, a file, pkg:<name>
    classes: tuple[str, ...]  # position i is class id i
    head: HeadSpec
    img_size: int  # the square side the network sees
    presize: int  # the square side images are decoded and cached at, before cropping
    eval_crop: float  # fraction of the presized side the evaluation view resizes to img_size
    mean: tuple[float, float, float]  # normalisation that belongs to the weights
    std: tuple[float, float, float]

    @classmethod
    def from_params(cls, model: ModelParams, classes: Sequence[str]) -> ModelSpec:
        mean, std = normalisation(model.arch, model.weights)
        return cls(
            arch=model.arch,
            weights=model.weights,
            classes=tuple(classes),
            head=HeadSpec(hidden=model.head_hidden, dropout=model.head_dropout),
            img_size=model.img_size,
            presize=presized_side(model.img_size, model.presize_ratio),
            eval_crop=model.eval_crop,
            mean=mean,
            std=std,
        )

    @property
    def preprocessing(self) -> Preprocessing:
        """What the network sees, as the record checkpoints, bundles and MLflow models carry."""
        return Preprocessing(self.img_size, self.presize, self.eval_crop, self.mean, self.std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
