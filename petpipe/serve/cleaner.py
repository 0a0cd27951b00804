"""The Clean page's data: each indexed image's loss under the model (fastai's ImageClassifierCleaner), and
the labels.corrections file its decisions go to."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from petpipe.data import image_index
from petpipe.data.pixels import load_pixels
from petpipe.errors import PetpipeError
from petpipe.inference.predict import Predictor, pixel_batch
from petpipe.interpret import interpretation
from petpipe.utils.file_formats import write_csv

log = logging.getLogger(__name__)

BATCH_SIZE = 64
# What a decision on the Clean page can be: no correction, or one of the file's actions.
DECISIONS = ("keep", *image_index.CORRECTION_ACTIONS)


class Cleaner:
    """Per-image losses of one split of index.csv, computed on first request and kept in memory (until
    index.csv changes); the model is the one the Try it page predicts with."""

    def __init__(self, predictor: Predictor, *, index: Path, images: Path, lock: threading.Lock):
        self.predictor = predictor
        self.index_path = Path(index)
        self.images = Path(images)
        self.lock = lock  # one model, used by one request at a time
        self._losses: dict[tuple[str, tuple[int, int]], pd.DataFrame] = {}
        self._index: tuple[tuple[int, int], pd.DataFrame] | None = None

    def index(self) -> pd.DataFrame:
        """index.csv, reread when it changes (a `dvc repro` while the server runs)."""
        if not self.images.is_dir():
            raise PetpipeError(f"{self.images}: images folder not found; run `dvc repro` or pass --images")
        stamp = self._stamp()
        if self._index is None or self._index[0] != stamp:
            self._index = (stamp, image_index.load_index(self.index_path))
        return self._index[1]

    def _stamp(self) -> tuple[int, int]:
        try:
            status = self.index_path.stat()
        except FileNotFoundError:
            raise PetpipeError(f"{self.index_path}: index not found; run `dvc repro` or pass --index") from None
        return status.st_mtime_ns, status.st_size

    def losses(self, split: str) -> pd.DataFrame:
        """path, label, predicted, probability (of predicted), loss of every image of the split, highest
        loss first."""
        index = self.index()
        key = (split, self._stamp())
        with self.lock:
            if key not in self._losses:
                self._losses[key] = self._compute(index[index["split"] == split].reset_index(drop=True))
        return self._losses[key]

    def _compute(self, rows: pd.DataFrame) -> pd.DataFrame:
        classes = self.predictor.classes
        unknown = sorted(set(rows["label"]) - set(classes))
        if unknown:
            raise PetpipeError(
                f"{self.index_path} has labels the model does not know ({', '.join(unknown[:5])}); "
                "run `dvc repro` to retrain, or pass the matching --model"
            )
        log.info("computing the losses of %d images", len(rows))
        files = [self.images / relative for relative in rows["path"]]
        # The decoded-pixel cache the training stages share: usually already built, so nothing is decoded.
        pixels = load_pixels(files, list(rows["hash"]), self.predictor.presize)  # (N, 3, P, P)
        chunks = [
            self.predictor.probabilities(pixel_batch(pixels[start : start + BATCH_SIZE]))
            for start in range(0, len(rows), BATCH_SIZE)
        ]
        probabilities = np.concatenate(chunks) if chunks else np.empty((0, len(classes)))  # (N, C)
        targets = rows["label"].map({name: position for position, name in enumerate(classes)}).to_numpy()
        log_probabilities = np.log(np.clip(probabilities, np.finfo(np.float64).tiny, None))
        predicted = probabilities.argmax(axis=1) if len(rows) else np.empty(0, dtype=int)
        table = pd.DataFrame(
            {
                "path": rows["path"],
                "label": rows["label"],
                "predicted": [classes[i] for i in predicted],
                "probability": probabilities[np.arange(len(rows)), predicted],
                "loss": interpretation.per_image_losses(log_probabilities, targets),
            }
        )
        return table.sort_values(["loss", "path"], ascending=[False, True], kind="stable").reset_index(drop=True)


class CorrectionsFile:
    """labels.corrections, read on every request (someone may edit it by hand) and rewritten whole and
    atomically on every decision."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()

    def read(self) -> dict[str, image_index.Correction]:
        return image_index.load_corrections(self.path) if self.path.exists() else {}

    def decide(self, path: str, decision: str, label: str) -> dict[str, image_index.Correction]:
        """Record one image's decision (keep removes its correction); return every correction."""
        with self.lock:
            corrections = self.read()
            if decision == "keep":
                corrections.pop(path, None)
            else:
                corrections[path] = image_index.Correction(decision, label if decision == "relabel" else "")
            write_csv(self.path, image_index.corrections_table(corrections))
        return corrections


def counts(corrections: dict[str, image_index.Correction]) -> dict[str, int]:
    """How many images the corrections relabel and exclude."""
    actions = [correction.action for correction in corrections.values()]
    return {"relabel": actions.count("relabel"), "exclude": actions.count("exclude")}
