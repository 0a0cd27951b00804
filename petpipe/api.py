"""petpipe from Python (a notebook): load a model and predict photos, read what the stages wrote, show it inline.

The same code as the CLI and `petpipe serve`: load_model resolves a model as `petpipe predict --model` does
(predict.model_file, predict.load_predictor) and predicts through predict.predict_images; show_batch draws as
`petpipe show-batch`; the rest reads the files under stages/. Torch is imported only for a checkpoint (and by
show_batch, which draws through the training augmentation). docs/api.md shows it in use:

    import petpipe
    model = petpipe.load_model("models:/petpipe-classifier@champion")
    model.predict(["photo.jpg"], top_k=3)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from petpipe.errors import PetpipeError
from petpipe.inference.predict import Predictor, collect_images, load_predictor, model_file, predict_images
from petpipe.pipeline import ORDER

STAGES = Path("stages")
EVALUATION = STAGES / "evaluate"
# Modes PNG stores as they are; an image in another (CMYK, YCbCr, ...) is converted to RGB first, as decoding does.
PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


# ---------------------------------------------------------------- figures that display inline


class Picture:
    """A PNG that Jupyter shows inline (IPython calls `_repr_png_`): a figure a stage wrote, or one drawn now."""

    def __init__(self, png: bytes, name: str):
        self.png = png
        self.name = name

    @classmethod
    def read(cls, path: Path) -> Picture:
        return cls(Path(path).read_bytes(), str(path))

    @classmethod
    def of(cls, figure: Any, name: str) -> Picture:
        """A matplotlib Figure (petpipe's plots draw without pyplot, so Jupyter would not show it by itself)."""
        out = io.BytesIO()
        figure.savefig(out, format="png", dpi=100)
        return cls(out.getvalue(), name)

    def _repr_png_(self) -> bytes:
        return self.png

    def save(self, path: Path | str) -> None:
        Path(path).write_bytes(self.png)

    def __repr__(self) -> str:
        return f"Picture({self.name!r}, {len(self.png):,} bytes of PNG)"


# ---------------------------------------------------------------- the model


class Model:
    """A loaded model (a checkpoint, a registered model or an ONNX bundle): its classes, and predict."""

    def __init__(self, predictor: Predictor, source: str):
        self.predictor = predictor
        self.source = source

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    def predict(self, images: Any, top_k: int = 3, batch_size: int = 64) -> pd.DataFrame:
        """One row per image, in order: `image`, the top-1 `label` and its `probability`, then `label_2`,
        `probability_2`, ... up to `top_k`, and `error` (why an image could not be read, else None).

        `images`: a path (a file, or a folder searched for images), a PIL image or an image file's bytes, or a
        list of them.
        """
        sources, names = _image_sources(images)
        rows = []
        for prediction in predict_images(self.predictor, sources, names=names, top_k=top_k, batch_size=batch_size):
            row: dict[str, Any] = {"image": prediction.path}
            for rank, (label, probability) in enumerate(prediction.labels, start=1):
                row[_column("label", rank)], row[_column("probability", rank)] = label, probability
            rows.append({**row, "error": prediction.error})
        ranks = range(1, min(top_k, len(self.classes)) + 1)
        columns = ["image", *(_column(name, rank) for rank in ranks for name in ("label", "probability")), "error"]
        return pd.DataFrame(rows, columns=columns)

    def __repr__(self) -> str:
        return f"Model({self.source!r}, {len(self.classes)} classes)"


def _column(name: str, rank: int) -> str:
    """label, probability for the most probable class; label_2, probability_2 for the next, ..."""
    return name if rank == 1 else f"{name}_{rank}"


def load_model(model: str | Path = STAGES / "finetune" / "model.pt", *, device: str = "auto") -> Model:
    """A model.pt checkpoint (run with torch), a bundle folder from `petpipe export` (onnxruntime, no torch),
    or a registered model, `models:/<name>@<alias>` or `models:/<name>/<version>`, as `petpipe predict --model`
    takes it."""
    return Model(load_predictor(model_file(model), device=device), str(model))


def _image_sources(images: Any) -> tuple[list[Path | bytes], list[str]]:
    """Paths (folders searched as `petpipe predict` does), PIL images and bytes as what predict_images decodes,
    with a name for each."""
    items = [images] if isinstance(images, (str, Path, bytes, Image.Image)) else list(images)
    sources: list[Path | bytes] = []
    names: list[str] = []
    for position, item in enumerate(items):
        if isinstance(item, (str, Path)):
            found = collect_images([Path(item)])
            sources += found
            names += [str(path) for path in found]
        elif isinstance(item, Image.Image):
            sources.append(_png_bytes(item))
            names.append(getattr(item, "filename", "") or f"image {position}")
        elif isinstance(item, (bytes, bytearray, memoryview)):
            sources.append(bytes(item))
            names.append(f"image {position}")
        else:
            raise PetpipeError(f"cannot predict a {type(item).__name__}; pass paths, PIL images or image bytes")
    return sources, names


def _png_bytes(image: Image.Image) -> bytes:
    """A PIL image as a lossless PNG, its EXIF (orientation) kept: decoded then as a file is, by one decoder."""
    out = io.BytesIO()
    exif = image.getexif()
    (image if image.mode in PNG_MODES else image.convert("RGB")).save(out, format="PNG", exif=exif)
    return out.getvalue()


# ---------------------------------------------------------------- what the stages wrote


@dataclass(frozen=True)
class StageResults:
    """One stage's outputs as Python objects: metrics.json, history.csv, the other JSON documents, the other
    tables (DataFrames) and the figures (Pictures), each by file name without its extension."""

    stage: str
    folder: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    history: pd.DataFrame | None = None
    documents: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Picture] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"StageResults({self.stage!r}: metrics {sorted(self.metrics)}, history "
            f"{'none' if self.history is None else f'{len(self.history)} epochs'}, documents "
            f"{sorted(self.documents)}, tables {sorted(self.tables)}, figures {sorted(self.figures)})"
        )


def read_stage(stage: str, folder: Path) -> StageResults:
    """The JSON, CSV and PNG files of a stage's folder (models and image folders are left where they are)."""
    documents = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))}
    tables = {path.stem: read_table(path) for path in sorted(folder.glob("*.csv"))}
    return StageResults(
        stage=stage,
        folder=folder,
        metrics=documents.pop("metrics", {}),
        history=tables.pop("history", None),
        documents=documents,
        tables=tables,
        figures={path.stem: Picture.read(path) for path in sorted(folder.glob("*.png"))},
    )


def read_table(path: Path) -> pd.DataFrame:
    """A CSV a stage wrote; a class or file named "NA" or "null" stays text (only empty cells are missing)."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def results(stages: str | Path = STAGES) -> dict[str, StageResults]:
    """Each stage that has run, in pipeline order: its metrics, history, tables and figures.

    `stages`: the stages/ folder, or the project folder that holds it.
    """
    folder = Path(stages)
    folder = folder / "stages" if (folder / "stages").is_dir() else folder
    if not folder.is_dir():
        raise PetpipeError(f"{folder}: no such folder; run `dvc repro` first, or pass the project's stages/ folder")
    return {stage: read_stage(stage, folder / stage) for stage in ORDER if (folder / stage).is_dir()}


# ---------------------------------------------------------------- fastai's show_batch and interpretation


def show_batch(split: str = "train", n: int = 9, *, project: str | Path = ".", seed: int | None = None) -> Picture:
    """fastai's show_batch: `n` images of a split as the model sees them (train: augmented; valid: the center
    crops evaluate and predict use), with the project's params.yaml, as `petpipe show-batch` draws them."""
    from petpipe.data.image_index import load_index
    from petpipe.data.views import Views
    from petpipe.interpret.draw_batch import show_batch_figure
    from petpipe.params import load_params

    project = Path(project)
    if split not in ("train", "valid"):
        raise PetpipeError(f"split = {split!r}; use 'train' or 'valid'")
    params = load_params(project / "params.yaml")
    views = Views.for_display(params.model, params.train.augment)
    figure = show_batch_figure(
        load_index(project / STAGES / "index-labels" / "index.csv"),
        project / STAGES / "fetch" / "images",
        split=split,
        count=n,
        views=views,
        seed=params.train.seed if seed is None else seed,
    )
    return Picture.of(figure, f"show_batch ({split})")


def _evaluation_file(evaluation: str | Path, name: str) -> Path:
    path = Path(evaluation) / name
    if not path.is_file():
        raise PetpipeError(f"{path}: not found; run `dvc repro evaluate` (or pass evaluate's folder)")
    return path


def top_losses(evaluation: str | Path = EVALUATION) -> Picture:
    """fastai's plot_top_losses as evaluate drew it (evaluate.top_losses images, highest loss first); the same
    images as a table: results()["evaluate"].tables["top_losses"]."""
    return Picture.read(_evaluation_file(evaluation, "top_losses.png"))


def confusion(evaluation: str | Path = EVALUATION, *, normalized: bool = False) -> Picture:
    """fastai's plot_confusion_matrix as evaluate drew it: counts, or each row divided by its sum."""
    return Picture.read(_evaluation_file(evaluation, "confusion_normalized.png" if normalized else "confusion.png"))


def most_confused(evaluation: str | Path = EVALUATION, *, min_count: int = 1) -> pd.DataFrame:
    """fastai's most_confused(min_val): (actual, predicted, count) pairs seen at least `min_count` times, most
    first, from evaluate's actual and predicted class of every validation image (confusion.csv)."""
    from petpipe.interpret import interpretation  # scikit-learn: only when asked

    table = read_table(_evaluation_file(evaluation, "confusion.csv")).astype(str)
    classes = sorted(set(table["actual"]) | set(table["predicted"]))
    position = {name: index for index, name in enumerate(classes)}
    matrix = interpretation.confusion_matrix(
        table["actual"].map(position).to_numpy(), table["predicted"].map(position).to_numpy(), num_classes=len(classes)
    )
    return interpretation.most_confused(matrix, classes, min_count=min_count)


__all__ = [
    "Model",
    "Picture",
    "StageResults",
    "confusion",
    "load_model",
    "most_confused",
    "results",
    "show_batch",
    "top_losses",
]
