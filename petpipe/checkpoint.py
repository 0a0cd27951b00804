"""Checkpoints as plain dicts: saved atomically with torch.save, loaded with weights_only=True.

Never a pickled model object: a checkpoint holds the state_dict, the
architecture, class names, preprocessing and the params that made it, so
`model_from_checkpoint` can rebuild the network anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from petpipe.atomic import atomic_path
from petpipe.errors import PetpipeError
from petpipe.models import Classifier, Preprocessing, build_model

FORMAT = "petpipe-checkpoint/1"


def make_checkpoint(
    model: Classifier, *, stage: str, arch: str, weights: str, classes: list[str], preprocessing: Preprocessing,
    img_size: int, presize: int, head_hidden: int, head_dropout: float, params: dict[str, Any],
    history: list[dict[str, float]], resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "stage": stage,
        "arch": arch,
        "weights": weights,
        "classes": list(classes),
        "head": {"hidden": head_hidden, "dropout": head_dropout},
        "preprocessing": {"img_size": img_size, "presize": presize,
                          "mean": list(preprocessing.mean), "std": list(preprocessing.std)},
        "layer_groups": model.layer_groups(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "params": params,
        "history": history,
        # Optimizer, scheduler and RNG states after the last completed epoch (resume only).
        "resume": resume,
    }


def save_checkpoint(path: Path | str, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a failed or killed write leaves the previous file intact."""
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PetpipeError(f"checkpoint {path} not found; run the stage that writes it (dvc repro)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file or a pickle that weights_only refuses
        raise PetpipeError(f"checkpoint {path} cannot be read safely ({error}); rerun the stage that wrote it") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise PetpipeError(f"{path} is not a petpipe checkpoint (format {FORMAT})")
    return checkpoint


def preprocessing_of(checkpoint: dict[str, Any]) -> Preprocessing:
    info = checkpoint["preprocessing"]
    return Preprocessing(mean=tuple(info["mean"]), std=tuple(info["std"]))


def model_from_checkpoint(checkpoint: dict[str, Any]) -> Classifier:
    """Rebuild the network (no download: weights come from the checkpoint) and load its state."""
    model, _ = build_model(checkpoint["arch"], "none", num_classes=len(checkpoint["classes"]),
                           head_hidden=checkpoint["head"]["hidden"], head_dropout=checkpoint["head"]["dropout"])
    model.load_state_dict(checkpoint["state_dict"])
    return model

