"""What petpipe's MLflow runs are, as plain data (no mlflow, no torch; petpipe/track/mlflow_runs.py logs them): the
project they belong to (store, experiment, commit, params, and the key by which each stage of one pipeline
run finds it again), their tags, and params as MLflow stores them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from petpipe.params import parse_params, read_params_file
from petpipe.utils.paths import project_root

PIPELINE_KEY_TAG = "petpipe.pipeline_key"
STAGE_TAG = "petpipe.stage"
PARAMS_HASH_TAG = "petpipe.params_hash"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
DVC_EXP_TAG = "dvc.exp_name"
PIPELINE = "pipeline"  # the petpipe.stage tag of a pipeline run
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's value


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the embedded store beside the project's dvc.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def params_hash(params: Any) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"augment": {"flip": True}}} -> {"train.augment.flip": True}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    """A param as MLflow stores it: a string, null as YAML writes it, cut to MLflow's limit."""
    text = "null" if value is None else json.dumps(value) if isinstance(value, (list, tuple, bool)) else str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def mlflow_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested params as a run's params: flattened, as strings."""
    return {key: param_value(value) for key, value in flatten(params).items()}


def git_commit(root: Path) -> str | None:
    """The commit the run starts from: an experiment's baseline (DVC_EXP_BASELINE_REV), else HEAD."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


@dataclass(frozen=True)
class Project:
    """What every run of one pipeline run shares: store, experiment, commit, params."""

    root: Path  # where the embedded store and its artifacts live
    uri: str
    experiment: str
    registered_model: str | None
    log_models: tuple[str, ...]
    promote: str | None  # the evaluate metric that elects the champion (registry.py), or None
    params: dict[str, Any]  # the whole params.yaml
    commit: str | None
    exp_name: str | None

    @property
    def pipeline_key(self) -> str:
        """Same for every stage of one `dvc repro` / `dvc exp run`: commit, experiment, params."""
        return params_hash({"commit": self.commit, "exp_name": self.exp_name, "params": self.params})

    @property
    def pipeline_name(self) -> str:
        return f"pipeline {self.exp_name or (self.commit or 'no-git')[:8]}"

    @property
    def artifact_location(self) -> str | None:
        """The embedded store would put artifacts under the working directory, a temporary copy for
        queued experiments: keep them beside mlflow.db. A server decides for itself (None)."""
        if not (self.uri.startswith("sqlite:") or "://" not in self.uri):
            return None
        return (self.root / "mlruns" / re.sub(r"[^\w.-]+", "-", self.experiment)).as_uri()

    @property
    def artifact_folder(self) -> Path | None:
        """Where the embedded store writes artifacts on this machine (None: a server's)."""
        location = self.artifact_location
        return None if location is None else Path(urlparse(location).path)

    def tags(self, stage: str, params: Mapping[str, Any]) -> dict[str, str]:
        """The tags of the run of `stage` (PIPELINE: the pipeline run) with `params`."""
        tags = {
            PIPELINE_KEY_TAG: self.pipeline_key,
            STAGE_TAG: stage,
            PARAMS_HASH_TAG: params_hash(params),
            "mlflow.source.name": "dvc repro" if stage == PIPELINE else f"petpipe {stage}",
        }
        if self.commit:
            tags[GIT_COMMIT_TAG] = self.commit
        if self.exp_name:
            tags[DVC_EXP_TAG] = self.exp_name
        return tags


def load_project(workspace: Path, root: Path | None = None, settings: Any = None) -> Project:
    """What the stage's runs share: `settings`, the Params the stage runs with (its --params file), or
    else the params.yaml in `workspace` (DVC runs stage commands in the project folder, or in its
    temporary copy for a queued experiment); the git commit of `workspace`; the store at `root`, by
    default the DVC project root (petpipe/utils/paths.py)."""
    if settings is None:
        path = workspace / "params.yaml"
        settings = parse_params(read_params_file(path), path)
    root = project_root() if root is None else root
    tracked = settings.tracking
    return Project(
        root=root,
        uri=tracking_uri(root),
        experiment=tracked.experiment,
        registered_model=tracked.registered_model,
        log_models=tuple(tracked.log_models),
        promote=tracked.promote,
        params=settings.model_dump(mode="json"),
        commit=git_commit(workspace),
        exp_name=os.environ.get("DVC_EXP_NAME") or None,
    )
