"""MLflow tracking: the only module that imports mlflow (lazily, so `petpipe --help` stays fast).

Every pipeline run (`dvc repro`, `dvc exp run`) gets one MLflow run with a nested run per stage.
A tracking failure never stops a stage or loses its outputs: it turns logging off for the rest of
the stage and says once, at the stage's end, what was not logged.

Where: MLFLOW_TRACKING_URI, else the embedded store sqlite:///mlflow.db in the project root.
What: the `tracking` section of the project's params.yaml. PETPIPE_TRACKING=off logs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import numbers
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petpipe.stages import ORDER

log = logging.getLogger(__name__)

# The pipeline's stages in run order: a stage that finds itself or a later stage already logged
# under the current pipeline run is the start of a new pipeline run (`dvc repro -f`, a retry).
STAGE_ORDER = ORDER
PIPELINE_KEY_TAG = "petpipe.pipeline_key"
STAGE_TAG = "petpipe.stage"
PARAMS_HASH_TAG = "petpipe.params_hash"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
DVC_EXP_TAG = "dvc.exp_name"
PARENT_TAG = "mlflow.parentRunId"
PIPELINE = "pipeline"  # the petpipe.stage tag of a pipeline run
OFF_VALUES = ("off", "0", "false", "no")

# MLflow retries an unreachable server for about four minutes by default; a stage should lose
# seconds, not minutes, to a dead server. Set only where the user has not chosen.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# MLflow's limits: param value length, params/tags per batch request.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100


# ---------------------------------------------------------------- where and under what to log


def store_root() -> Path:
    """Where the embedded store lives: the DVC project root (petpipe/paths.py)."""
    from petpipe.paths import project_root

    return project_root()


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the embedded store beside the project's dvc.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').as_posix()}"


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
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    params: dict[str, Any]  # the whole params.yaml
    commit: str | None
    exp_name: str | None

    @property
    def pipeline_key(self) -> str:
        """Same for every stage of one `dvc repro` / `dvc exp run`: commit, experiment, params."""
        return params_hash({"commit": self.commit, "exp_name": self.exp_name, "params": self.params})

    @property
    def is_embedded(self) -> bool:
        return self.uri.startswith("sqlite:") or "://" not in self.uri

    def tags(self) -> dict[str, str]:
        tags = {PIPELINE_KEY_TAG: self.pipeline_key}
        if self.commit:
            tags[GIT_COMMIT_TAG] = self.commit
        if self.exp_name:
            tags[DVC_EXP_TAG] = self.exp_name
        return tags


def load_project(workspace: Path, root: Path, settings: Any = None) -> Project:
    """What the stage's runs share: `settings`, the Params the stage runs with (its --params file), or
    else the params.yaml in `workspace` (DVC runs stage commands in the project folder, or in its
    temporary copy for a queued experiment); the git commit of `workspace`; the store at `root`."""
    from petpipe.params import parse_params, read_params_file

    if settings is None:
        path = workspace / "params.yaml"
        settings = parse_params(read_params_file(path), path)
    tracked = settings.tracking
    return Project(
        root=root, uri=tracking_uri(root), experiment=tracked.experiment,
        registered_model=tracked.registered_model, log_models=tuple(tracked.log_models),
        params=settings.model_dump(mode="json"), commit=git_commit(workspace),
        exp_name=os.environ.get("DVC_EXP_NAME") or None,
    )


# ---------------------------------------------------------------- what was not logged


@dataclass
class Missed:
    """Everything a stage tried to log after tracking failed, for the one warning at its end."""

    params: bool = False
    metrics: dict[str, None] = field(default_factory=dict)  # ordered set of names
    steps: set[int] = field(default_factory=set)
    artifacts: list[str] = field(default_factory=list)
    model: str | None = None
    status: bool = False

    def describe(self) -> str:
        parts = []
        if self.params:
            parts.append("params")
        if self.metrics:
            steps = f" at steps {min(self.steps)}-{max(self.steps)}" if self.steps else ""
            parts.append(f"metrics ({', '.join(self.metrics)}{steps})")
        if self.artifacts:
            parts.append(f"artifacts ({', '.join(self.artifacts)})")
        if self.model:
            parts.append(self.model)
        if not parts and self.status:
            parts.append("the run's end status")
        return ", ".join(parts) if parts else "nothing"


def describe_error(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    for marker, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("Max retries exceeded", "no answer")):
        if marker in text:
            return short
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first_line if len(first_line) <= 200 else first_line[:197] + "..."


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """Hide urllib3's line per retry of an MLflow request: the stage's one warning says it all."""
    logger = logging.getLogger("urllib3.connectionpool")
    hide: Callable[[logging.LogRecord], bool] = lambda record: not record.getMessage().startswith("Retrying")
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


# ---------------------------------------------------------------- the stage's run


class StageRun:
    """Logs one stage's params, metrics, artifacts and model to its nested MLflow run."""

    def __init__(self, stage: str, project: Project | None, *, failure: str | None = None):
        self.stage = stage
        self.project = project
        self.failure = failure  # why logging is off; set by the first failed call
        self.missed = Missed()
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self._client: Any = None

    def _attempt(self, action: Callable[[], Any], record: Callable[[], None]) -> None:
        """Run one MLflow call; on any failure turn logging off and remember what was lost."""
        if self.failure is None:
            try:
                with _quiet_retries():
                    action()
                return
            except Exception as error:  # a tracking failure must never reach the stage
                log.debug("mlflow call failed", exc_info=True)
                self.failure = self._headline(error)
        record()

    def _headline(self, error: BaseException) -> str:
        uri = self.project.uri if self.project else "?"
        reason = describe_error(error)
        if uri.startswith(("http://", "https://")) and reason in ("connection refused", "timed out", "no answer",
                                                                  "unknown host"):
            return f"tracking server {uri} unreachable ({reason})"
        return f"logging to {uri} failed ({reason})"

    # -- start and end

    def start(self, params: Mapping[str, Any]) -> None:
        def begin() -> None:
            assert self.project is not None
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.project.uri)
            experiment_id = self._experiment_id()
            self.parent_id = self._pipeline_run(experiment_id)
            tags = {**self.project.tags(), PARENT_TAG: self.parent_id, STAGE_TAG: self.stage,
                    PARAMS_HASH_TAG: params_hash(params), "mlflow.source.name": f"petpipe {self.stage}"}
            run = self._client.create_run(experiment_id, tags=tags, run_name=self.stage)
            self.run_id = run.info.run_id
            self._log_params(self.run_id, flatten(params))

        def lost() -> None:
            self.missed.params = True

        self._attempt(begin, lost)

    def end(self, status: str) -> None:
        def finish() -> None:
            if self.run_id is not None:
                self._client.set_terminated(self.run_id, status)
            if self.parent_id is not None:
                with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link per ended run: one is enough
                    self._client.set_terminated(self.parent_id, status)

        def lost() -> None:
            self.missed.status = True

        if self.run_id is not None:
            self._attempt(finish, lost)
        if self.failure is not None:
            log.warning("mlflow: %s; not logged for stage %s: %s. The stage's outputs are written as usual.",
                        self.failure, self.stage, self.missed.describe())

    def _experiment_id(self) -> str:
        assert self.project is not None
        experiment = self._client.get_experiment_by_name(self.project.experiment)
        if experiment is not None:
            return experiment.experiment_id
        # The embedded store would put artifacts under the working directory, a temporary copy
        # for queued experiments: keep them beside mlflow.db. A server decides for itself.
        folder = re.sub(r"[^\w.-]+", "-", self.project.experiment)
        location = (self.project.root / "mlruns" / folder).as_uri() if self.project.is_embedded else None
        try:
            return self._client.create_experiment(self.project.experiment, artifact_location=location)
        except Exception:  # created meanwhile by another process
            experiment = self._client.get_experiment_by_name(self.project.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _pipeline_run(self, experiment_id: str) -> str:
        """The pipeline run this stage belongs to: found by its key, else created."""
        assert self.project is not None
        key = self.project.pipeline_key
        query = f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{STAGE_TAG}` = '{PIPELINE}'"
        found = self._client.search_runs([experiment_id], filter_string=query,
                                         order_by=["attributes.start_time DESC"], max_results=1)
        if found and not self._already_ran(experiment_id, found[0].info.run_id):
            parent_id = found[0].info.run_id
            self._client.update_run(parent_id, status="RUNNING")
            return parent_id
        name = f"pipeline {self.project.exp_name or (self.project.commit or 'no-git')[:8]}"
        tags = {**self.project.tags(), STAGE_TAG: PIPELINE, PARAMS_HASH_TAG: params_hash(self.project.params),
                "mlflow.source.name": "dvc repro"}
        parent = self._client.create_run(experiment_id, tags=tags, run_name=name)
        self._log_params(parent.info.run_id, flatten(self.project.params))
        return parent.info.run_id

    def _already_ran(self, experiment_id: str, parent_id: str) -> bool:
        """True when this stage, or one after it, is already a child of the pipeline run."""
        children = self._client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
        logged = {child.data.tags.get(STAGE_TAG) for child in children}
        later = STAGE_ORDER[STAGE_ORDER.index(self.stage):] if self.stage in STAGE_ORDER else (self.stage,)
        return any(stage in logged for stage in later)

    def _log_params(self, run_id: str, flat: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, param_value(value)) for key, value in flat.items()]
        for first in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=params[first:first + MAX_PARAMS_PER_BATCH])

    # -- what stages log

    def log_params(self, params: Mapping[str, Any]) -> None:
        """More params for the stage's run, flattened (what a stage decided while running, e.g. its levers)."""
        if self.run_id is None and self.failure is None:
            return

        def send() -> None:
            self._log_params(self.run_id, flatten(params))

        def lost() -> None:
            self.missed.params = True

        self._attempt(send, lost)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        values = {key: float(value) for key, value in metrics.items()
                  if isinstance(value, numbers.Real) and math.isfinite(value)}
        if not values or (self.run_id is None and self.failure is None):
            return

        def send() -> None:
            from mlflow.entities import Metric

            timestamp = int(time.time() * 1000)
            batch = [Metric(key, value, timestamp, step or 0) for key, value in values.items()]
            self._client.log_batch(self.run_id, metrics=batch)

        def lost() -> None:
            self.missed.metrics.update(dict.fromkeys(values))
            if step is not None:
                self.missed.steps.add(step)

        self._attempt(send, lost)

    def log_artifacts(self, paths: list[Path]) -> None:
        existing = [Path(path) for path in paths if Path(path).exists()]
        if not existing or (self.run_id is None and self.failure is None):
            return
        for path in existing:
            def send(path: Path = path) -> None:
                if path.is_dir():
                    self._client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                else:
                    self._client.log_artifact(self.run_id, str(path))

            self._attempt(send, lambda path=path: self.missed.artifacts.append(path.name))

    def log_model(self, checkpoint: Path, *, example: Path, registered_name: str | None = None,
                  metadata: Mapping[str, Any] | None = None) -> None:
        """Log the checkpoint as an MLflow model that takes photos (petpipe/mlflow_model.py, a model from
        code: no pickle) and register it under `registered_name`; `example` is a photo for its input example."""
        if self.project is None or self.stage not in self.project.log_models:
            return
        if self.run_id is None and self.failure is None:
            return

        def send() -> None:
            _log_petpipe_model(checkpoint, uri=self.project.uri, run_id=self.run_id, example=example,
                               registered_name=registered_name, metadata=metadata)

        def lost() -> None:
            self.missed.model = "the model" + (f" (registered name {registered_name})" if registered_name else "")

        self._attempt(send, lost)


MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def model_signature() -> Any:
    """Input: a column `image` (the file's bytes) or `path`; output: the labels with probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                      ColSpec(Array("string"), "top_labels"), ColSpec(Array("double"), "top_probabilities"),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _log_petpipe_model(checkpoint: Path, *, uri: str, run_id: str | None, example: Path,
                       registered_name: str | None, metadata: Mapping[str, Any] | None) -> None:
    import mlflow
    import pandas as pd

    # The fluent API logs models; its global URI is also exported to os.environ: put both back.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        with contextlib.redirect_stdout(io.StringIO()), mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={"checkpoint": str(checkpoint)},
                # petpipe's own code travels with the model, so that the weights meet the code that made them.
                code_paths=[str(Path(__file__).parent)], signature=model_signature(),
                input_example=pd.DataFrame({"image": [Path(example).read_bytes()]}),
                registered_model_name=registered_name, metadata=dict(metadata or {}),
                # Stated, not inferred: inference would re-import the model in a subprocess.
                pip_requirements=_requirements(),
            )
    finally:
        mlflow.set_tracking_uri(previous)


def _requirements() -> list[str]:
    """What the model needs installed to serve: petpipe's own requirements, at the versions in use."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "torchvision", "timm", "pillow", "numpy", "pandas", "mlflow"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


class _Off(StageRun):
    """PETPIPE_TRACKING=off: logs nothing and says nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        pass

    def log_artifacts(self, paths: list[Path]) -> None:
        pass

    def log_model(self, checkpoint: Path, *, example: Path, registered_name: str | None = None,
                  metadata: Mapping[str, Any] | None = None) -> None:
        pass


@contextlib.contextmanager
def no_run(stage: str) -> Iterator[StageRun]:
    """A stage run that logs nothing: for the processes other than rank 0 under torchrun."""
    yield _Off(stage, None)


@contextlib.contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any], settings: Any = None) -> Iterator[StageRun]:
    """A nested MLflow run for `stage` under its pipeline run, ended FINISHED, FAILED or KILLED.

    params: what the stage used (its run's params); settings: the whole Params the stage runs with, whose
    `tracking` section says where and what to log (default: ./params.yaml).
    """
    if os.environ.get("PETPIPE_TRACKING", "").strip().lower() in OFF_VALUES:
        yield _Off(stage, None)
        return
    workspace = Path.cwd()
    try:
        project = load_project(workspace, store_root(), settings)
    except Exception as error:  # no or unreadable params.yaml: the stage itself decides if that matters
        run = StageRun(stage, None, failure=f"no tracking settings in {workspace / 'params.yaml'} "
                                            f"({describe_error(error)})")
        run.missed.params = True
    else:
        run = StageRun(stage, project)
        run.start(params)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.end(status)
