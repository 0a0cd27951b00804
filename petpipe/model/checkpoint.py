"""Checkpoints: a typed `Checkpoint` in memory, a plain dict on disk (torch.save, loaded with weights_only=True).

Never a pickled model object: a checkpoint holds the state_dict, the model's
spec (architecture, classes, head, sizes, normalisation), the params that made
it and its history, so `Checkpoint.model()` rebuilds the network anywhere.
This is the only module that knows the keys of the dict on disk.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from petpipe.errors import PetpipeError
from petpipe.model.backbones import Classifier, build_model
from petpipe.model.preprocessing import Preprocessing
from petpipe.model.spec import HeadSpec, ModelSpec
from petpipe.utils import timing
from petpipe.utils.atomic import atomic_path

FORMAT = "petpipe-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    stage: str  # the stage that wrote it
    state_dict: dict[str, torch.Tensor]
    params: dict[str, Any]  # the params sections the stage used
    history: list[dict[str, float]]  # one row per epoch
    layer_groups: dict[str, list[str]]  # layer group -> module names (informational)
    # Optimizer, scheduler and RNG states after the last completed epoch (resume files only).
    resume: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        model: Classifier,
        spec: ModelSpec,
        *,
        stage: str,
        params: dict[str, Any],
        history: list[dict[str, float]],
        resume: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """The model's current weights, copied to the CPU."""
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        return cls(
            spec=spec,
            stage=stage,
            state_dict=state,
            params=params,
            history=list(history),
            layer_groups=model.layer_groups(),
            resume=resume,
        )

    def model(self) -> Classifier:
        """Rebuild the network from the spec (no download: the weights come from the checkpoint)."""
        model = build_model(self.spec, pretrained=False)
        model.load_state_dict(self.state_dict)
        return model

    def with_history(self, history: list[dict[str, float]]) -> Checkpoint:
        return dataclasses.replace(self, history=list(history))


def _to_dict(checkpoint: Checkpoint) -> dict[str, Any]:
    spec = checkpoint.spec
    return {
        "format": FORMAT,
        "stage": checkpoint.stage,
        "arch": spec.arch,
        "weights": spec.weights,
        "classes": list(spec.classes),
        "head": dataclasses.asdict(spec.head),
        "preprocessing": spec.preprocessing.to_dict(),
        "layer_groups": checkpoint.layer_groups,
        "state_dict": checkpoint.state_dict,
        "params": checkpoint.params,
        "history": checkpoint.history,
        "resume": checkpoint.resume,
    }


def _from_dict(raw: dict[str, Any]) -> Checkpoint:
    seen = Preprocessing.from_dict(raw["preprocessing"])
    spec = ModelSpec(
        arch=raw["arch"],
        weights=raw["weights"],
        classes=tuple(raw["classes"]),
        head=HeadSpec(**raw["head"]),
        img_size=seen.img_size,
        presize=seen.presize,
        eval_crop=seen.eval_crop,
        mean=seen.mean,
        std=seen.std,
    )
    return Checkpoint(
        spec=spec,
        stage=raw["stage"],
        state_dict=raw["state_dict"],
        params=raw["params"],
        history=list(raw["history"]),
        layer_groups=raw.get("layer_groups", {}),
        resume=raw.get("resume"),
    )


def save_checkpoint(path: Path | str, checkpoint: Checkpoint) -> None:
    """Write atomically: a failed or killed write leaves the previous file intact."""
    with atomic_path(path) as temporary:
        write_checkpoint(temporary, checkpoint)


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """torch.save through a Python file that keeps the OS's error: torch turns a failed write into
    `RuntimeError: basic_ios::clear: iostream error` (or `unexpected pos`), naming nothing; the OSError
    (ENOSPC, EFBIG) is raised instead, which petpipe.utils.atomic turns into one line. The caller makes it atomic."""
    with open(path, "wb", buffering=0) as file:
        writer = _KeepingErrors(file)
        try:
            torch.save(_to_dict(checkpoint), writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise


class _KeepingErrors:
    """A file that writes every byte it is given, and remembers the OSError that stopped it (a write cut short
    by `ulimit -f` returns a short count first; asking for the rest raises EFBIG)."""

    def __init__(self, file: io.FileIO):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.file.write(view) :]
        except OSError as error:
            self.error = error
            raise
        return len(data)

    def flush(self) -> None:
        self.file.flush()


@timing.timed("model")
def load_checkpoint(path: Path | str) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise PetpipeError(f"checkpoint {path} not found; run the stage that writes it (dvc repro)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file or a pickle that weights_only refuses
        raise PetpipeError(
            f"checkpoint {path} cannot be read safely ({error}); rerun the stage that wrote it"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PetpipeError(f"{path} is not a petpipe checkpoint (format {FORMAT})")
    try:
        return _from_dict(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise PetpipeError(
            f"checkpoint {path} lacks what this petpipe needs ({type(error).__name__}: {error}); "
            f"rerun train-head (dvc repro -f train-head)"
        ) from None
