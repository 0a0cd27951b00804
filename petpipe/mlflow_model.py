"""The MLflow model finetune logs and registers, as a model from code: this file and the checkpoint, no pickle.

MLflow runs this file to load the model (`mlflow.pyfunc.load_model`, `mlflow models serve`), so it is the
one module besides petpipe/tracking.py that imports mlflow. Input: a DataFrame with a column `image`
(the file's bytes; base64 in a REST request) or `path`; output, per row: label, probability, the top-k
labels and probabilities, and error (null, or why that row's image could not be read).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

TOP_K = 5
BATCH = 32
COLUMNS = ["label", "probability", "top_labels", "top_probabilities", "error"]


def image_bytes(value: Any) -> bytes:
    """A cell of the `image` column: bytes as they are, a base64 string decoded (the REST API's form)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the image column holds a string that is not base64-encoded bytes") from None
    raise ValueError(f"the image column holds {type(value).__name__}, not the file's bytes")


def _failed(error: str) -> dict[str, Any]:
    return {"label": None, "probability": None, "top_labels": None, "top_probabilities": None, "error": error}


class PetpipeClassifier(PythonModel):
    """petpipe's predictor behind MLflow's pyfunc interface: decode, resize, crop, normalise, classify."""

    def load_context(self, context: Any) -> None:
        from petpipe.predict import load_predictor

        self.predictor = load_predictor(Path(context.artifacts["checkpoint"]), device="auto")
        self.top_k = int((context.model_config or {}).get("top_k", TOP_K))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", self.top_k))
        decoded = [self._decode(row) for row in model_input.to_dict("records")]
        rows: list[dict[str, Any]] = [_failed(item) if isinstance(item, str) else {} for item in decoded]
        good = [position for position, item in enumerate(decoded) if not isinstance(item, str)]
        for start in range(0, len(good), BATCH):
            chunk = good[start:start + BATCH]
            pixels = torch.from_numpy(np.stack([decoded[position] for position in chunk]))  # (B, 3, P, P)
            for position, probabilities in zip(chunk, self.predictor.probabilities(pixels)):
                rows[position] = self._row(probabilities, top_k)
        # object columns: a missing value stays None (JSON null), where pandas' own dtypes would make it NaN.
        return pd.DataFrame(rows, columns=COLUMNS, dtype=object)

    def _decode(self, row: dict[str, Any]) -> np.ndarray | str:
        """(3, P, P) uint8 pixels of the row's image, or why there are none."""
        from petpipe.pixels import decode_image

        try:
            if row.get("image") is not None:
                source: Any = io.BytesIO(image_bytes(row["image"]))
            elif row.get("path") is not None:
                source = Path(row["path"])
            else:
                return "no image: give the column image (bytes or base64) or path"
            return decode_image(source, self.predictor.views.presize).transpose(2, 0, 1)
        except Exception as error:  # noqa: BLE001  (any unreadable image: report it, predict the rest)
            return f"cannot read image ({type(error).__name__}: {error})"

    def _row(self, probabilities: np.ndarray, top_k: int) -> dict[str, Any]:
        best = np.argsort(-probabilities, kind="stable")[:min(top_k, len(probabilities))]
        labels = [self.predictor.classes[index] for index in best]
        values = [float(probabilities[index]) for index in best]
        return {"label": labels[0], "probability": values[0], "top_labels": labels, "top_probabilities": values,
                "error": None}


mlflow.models.set_model(PetpipeClassifier())
