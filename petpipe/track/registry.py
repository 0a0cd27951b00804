"""The model registry, MLflow 3's way: evaluate's numbers go to the LoggedModel that holds the evaluated
weights (found by their digest), the `champion` alias moves only to a version that evaluates better, and
`models:/<name>@<alias>` or `models:/<name>/<version>` becomes a local checkpoint for predict and serve.

Only tracking.py (best effort, from evaluate) and the CLI (predict, serve) call it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput

from petpipe.errors import PetpipeError
from petpipe.interpret.metric_table import LOWER_IS_BETTER
from petpipe.utils.atomic import atomic_directory
from petpipe.utils.file_formats import file_digest

CHAMPION = "champion"  # the registered-model alias that evaluate moves (params.yaml: tracking.promote)
CHECKPOINT_TAG = "petpipe.checkpoint_sha256"  # on a LoggedModel: the weights it holds
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
CHECKPOINT_ARTIFACT = "checkpoint"  # the checkpoint's key in the pyfunc model's artifacts (mlflow_model.py)


# ---------------------------------------------------------------- the champion: a pure decision


def better(metric: str, new: float, old: float) -> bool:
    """Strictly better on `metric`: a tie keeps the champion (no alias churn for the same numbers)."""
    return new < old if metric in LOWER_IS_BETTER else new > old


@dataclass(frozen=True)
class Promotion:
    """What evaluate decided about the `champion` alias, with both numbers."""

    model: str
    metric: str
    version: str
    value: float
    champion: str | None = None  # the version that held the alias before, if any
    champion_value: float | None = None  # its value of `metric` (None: it has none logged)

    @property
    def promoted(self) -> bool:
        if self.champion is None or self.champion == self.version:
            return self.champion is None
        return self.champion_value is None or better(self.metric, self.value, self.champion_value)

    def sentence(self) -> str:
        """The decision in words, saying which split elected it: valid, never test (evaluate reports test
        beside it, but a champion chosen on the test split would make its test numbers optimistic)."""
        return self._decision() + "; elected on the valid split, never on test"

    def _decision(self) -> str:
        mine = f"version {self.version} ({self.metric} {self.value:.4f})"
        if self.champion is None:
            return f"champion: {self.model}@{CHAMPION} -> {mine}, the first evaluated version"
        theirs = f"version {self.champion} ({self.metric} " + (
            "not logged)" if self.champion_value is None else f"{self.champion_value:.4f})"
        )
        if self.champion == self.version:
            return f"champion: {self.model}@{CHAMPION} stays {mine}, evaluated again"
        if self.promoted:
            return f"champion: {self.model}@{CHAMPION} -> {mine}, better than {theirs}"
        return f"champion: {self.model}@{CHAMPION} stays {theirs}; {mine} is not better"

    def tags(self) -> dict[str, str]:
        """For evaluate's run: the decision and both numbers, searchable in the MLflow UI."""
        return {
            "petpipe.champion.decision": "promoted" if self.promoted else "kept",
            "petpipe.champion.metric": self.metric,
            "petpipe.champion.version": self.version,
            "petpipe.champion.value": repr(self.value),
            "petpipe.champion.previous_version": self.champion or "",
            "petpipe.champion.previous_value": "" if self.champion_value is None else repr(self.champion_value),
        }


# ---------------------------------------------------------------- lineage: evaluation -> LoggedModel -> version


def index_dataset(index: Path) -> Any:
    """index.csv as an MLflow dataset: its schema and row count, the file's SHA-256 as its digest (MLflow keeps
    36 characters: the first 32), its path as the source."""
    frame = pd.read_csv(index, dtype=str, keep_default_na=False)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns it is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_pandas(
            frame, source=str(Path(index).resolve()), name="index", targets="label", digest=file_digest(index)[:32]
        )


def logged_model_of(client: MlflowClient, experiment_id: str, checkpoint: Path) -> str | None:
    """The newest LoggedModel of the experiment that holds these weights (tracking.log_models logged it)."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{CHECKPOINT_TAG}` = '{file_digest(checkpoint)}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    return found[0].model_id if found else None


def split_dataset(index: Path, split: str) -> Any:
    """index.csv's rows of one split as an MLflow dataset named after it (valid, test): its schema and row
    count, the SHA-256 of those rows as CSV as its digest (the first 32 characters), the index as its source."""
    frame = pd.read_csv(index, dtype=str, keep_default_na=False)
    rows = frame[frame["split"] == split].reset_index(drop=True)
    digest = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:32]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_pandas(
            rows, source=str(Path(index).resolve()), name=split, targets="label", digest=digest
        )


def log_evaluation(model_id: str, metrics: Mapping[str, float], *, index: Path) -> None:
    """In the active (evaluate's) run: the model as its input, and its metrics on it, each set with its
    dataset: the valid split's (the unprefixed ones, what elects the champion) and the test split's (test_)."""
    for split, chosen in (
        ("valid", {k: v for k, v in metrics.items() if not k.startswith("test_")}),
        ("test", {k: v for k, v in metrics.items() if k.startswith("test_")}),
    ):
        if not chosen:
            continue
        dataset = split_dataset(index, split)
        mlflow.log_input(dataset, context="evaluation", model=LoggedModelInput(model_id))
        mlflow.log_metrics(chosen, model_id=model_id, dataset=dataset)


def version_of(client: MlflowClient, name: str, model_id: str) -> str | None:
    """The registered version of `name` made from the LoggedModel `model_id`, if any (its source names it)."""
    for version in client.search_model_versions(f"name='{name}'"):
        if (version.model_id or version.source) in (model_id, f"models:/{model_id}"):
            return str(version.version)
    return None


def metric_of(client: MlflowClient, name: str, version: str, metric: str) -> float | None:
    """The latest value of `metric` logged on the LoggedModel behind a registered version."""
    source = client.get_model_version(name, version)
    model_id = source.model_id or str(source.source).removeprefix("models:/")
    try:
        logged = client.get_logged_model(model_id).metrics or []
    except Exception:  # a version registered from a run's artifacts, not from a LoggedModel
        return None
    values = sorted((entry.timestamp, entry.step, entry.value) for entry in logged if entry.key == metric)
    return float(values[-1][2]) if values and math.isfinite(values[-1][2]) else None


def promote(client: MlflowClient, name: str, version: str, metric: str, value: float) -> Promotion:
    """Move `name@champion` to `version` if it beats the current champion on `metric` (or none holds it)."""
    try:
        champion: str | None = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception as error:
        if "not found" not in str(error).lower():
            raise
        champion = None
    before = None if champion is None else metric_of(client, name, champion, metric)
    decision = Promotion(name, metric, version, value, champion, before)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, f"petpipe.{metric}", repr(value))
    return decision


# ---------------------------------------------------------------- models:/ URIs for predict and serve


def checkpoint_of(uri: str, *, tracking_uri: str, cache: Path) -> Path:
    """The checkpoint of a registered version, downloaded once into `cache/<name>/<version>/`.
    An alias is looked up on every call (it moves); the version it names is downloaded only once."""
    match = MODEL_URI.match(uri)
    if match is None:
        raise PetpipeError(
            f"{uri}: not a registered model URI; use models:/<name>@<alias> "
            "(e.g. models:/petpipe-classifier@champion) or models:/<name>/<version>"
        )
    name = match["name"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = (
            str(client.get_model_version_by_alias(name, match["alias"]).version)
            if match["alias"]
            else str(client.get_model_version(name, match["version"]).version)
        )
    except Exception as error:
        raise PetpipeError(
            f"{uri}: not found in the model registry at {tracking_uri} ({_first_line(error)}); "
            f"`mlflow ui` lists the registered models, or set MLFLOW_TRACKING_URI to the "
            f"server that holds it"
        ) from None
    folder = cache / _safe(name) / version
    if not (folder / "MLmodel").is_file():  # downloaded whole or not at all (atomic_directory)
        with atomic_directory(folder) as temporary:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(temporary), tracking_uri=tracking_uri
            )
    return _checkpoint_in(folder, uri)


def _checkpoint_in(folder: Path, uri: str) -> Path:
    """The checkpoint file that the model's MLmodel names among its pyfunc artifacts."""
    flavor = mlflow.models.Model.load(str(folder)).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts", {})
    relative = artifacts.get(CHECKPOINT_ARTIFACT, {}).get("path")
    if relative is None:
        raise PetpipeError(
            f"{uri}: this registered model holds no petpipe checkpoint (artifacts: "
            f"{json.dumps(sorted(artifacts))}); register one that petpipe's finetune logged"
        )
    return folder / relative


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0][:200]
