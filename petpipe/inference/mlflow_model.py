"""The MLflow model finetune logs and registers, as a model from code: this file and the checkpoint, no pickle.

MLflow runs this file to load the model (`mlflow.pyfunc.load_model`, `mlflow models serve`); with
petpipe/track/mlflow_runs.py and petpipe/track/registry.py it is one of the three modules that import mlflow. Input: a
DataFrame with a column `image` (the file's bytes; base64 in a REST request) or `path`; output, per row: label,
probability, the top-k labels and probabilities, and error (null, or why that row's image could not be read).
`log_model`, at the end, packages it (signature, pip requirements) into the stage's run; the export stage later
puts the checkpoint's ONNX bundle beside the checkpoint (artifacts/onnx/: `petpipe predict --model` runs it
without torch).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from petpipe.interpret.metric_table import TOP_K

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
        from petpipe.inference.predict import load_predictor

        self.predictor = load_predictor(Path(context.artifacts["checkpoint"]), device="auto")
        self.top_k = int((context.model_config or {}).get("top_k", TOP_K))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # petpipe predict's inference tail: the same pixels, batch and top-k as `petpipe predict` and serve.
        from petpipe.inference.predict import classify

        top_k = int((params or {}).get("top_k", self.top_k))
        records = model_input.to_dict("records")
        rows: list[dict[str, Any]] = []
        for start in range(0, len(records), BATCH):
            decoded = [self._decode(row) for row in records[start : start + BATCH]]
            rows += [
                _failed(result) if isinstance(result, str) else self._row(result)
                for result in classify(self.predictor, decoded, top_k=top_k)
            ]
        # object columns: a missing value stays None (JSON null), where pandas' own dtypes would make it NaN.
        return pd.DataFrame(rows, columns=COLUMNS, dtype=object)

    def _decode(self, row: dict[str, Any]) -> np.ndarray | str:
        """(3, P, P) uint8 pixels of the row's image, or why there are none."""
        from petpipe.inference.predict import read_pixels

        if row.get("image") is not None:
            try:
                image: bytes | Path = image_bytes(row["image"])
            except ValueError as error:
                return f"cannot read image (ValueError: {error})"
        elif row.get("path") is not None:
            image = Path(row["path"])
        else:
            return "no image: give the column image (bytes or base64) or path"
        return read_pixels(image, self.predictor.presize)

    @staticmethod
    def _row(labels: list[tuple[str, float]]) -> dict[str, Any]:
        """One image's answer from its top-k (label, probability), most probable first."""
        names, values = [label for label, _ in labels], [probability for _, probability in labels]
        return {
            "label": names[0],
            "probability": values[0],
            "top_labels": names,
            "top_probabilities": values,
            "error": None,
        }


# ---------------------------------------------------------------- packaging: what finetune logs and registers


def model_signature() -> Any:
    """Input: a column `image` (the file's bytes) or `path`; output: the labels with probabilities; param
    `top_k` (how many labels per image). MLflow drops a param the signature does not declare."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "probability"),
            ColSpec(Array("string"), "top_labels"),
            ColSpec(Array("double"), "top_probabilities"),
            ColSpec("string", "error", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]))


def requirements() -> list[str]:
    """What the model needs installed to serve: petpipe's own requirements, at the versions in use."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("torch", "torchvision", "timm", "pillow", "numpy", "pandas", "mlflow"):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_model(
    checkpoint: Path, *, example: Path, registered_name: str | None = None, metadata: Mapping[str, Any] | None = None
) -> Any:
    """Log this file and `checkpoint` to the active MLflow run (petpipe/track/mlflow_runs.py opens it) as the model
    `model`, registered under `registered_name`; `example`, a photo, is its input example. The export stage
    attaches the checkpoint's ONNX bundle afterwards (StageRun.attach_bundle), as artifacts/onnx/. Returns MLflow's
    ModelInfo (its `model_id`: the LoggedModel that evaluate's metrics go to)."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=__file__,
        artifacts={"checkpoint": str(checkpoint)},
        # petpipe's own code travels with the model, so that the weights meet the code that made them.
        code_paths=[str(Path(__file__).parent)],
        signature=model_signature(),
        input_example=pd.DataFrame({"image": [Path(example).read_bytes()]}),
        registered_model_name=registered_name,
        metadata=dict(metadata or {}),
        # Stated, not inferred: inference would re-import the model in a subprocess.
        pip_requirements=requirements(),
    )


mlflow.models.set_model(PetpipeClassifier())
