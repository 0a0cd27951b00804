"""MLflow tracking: one run per pipeline run (`dvc repro`, `dvc exp run`), a nested run per stage, from
start to end. A tracking failure never stops a stage: it turns logging off for the rest of the stage, which
says once, at its end, what was not logged. Where: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the
project root; what: params.yaml's `tracking` section; PETPIPE_TRACKING=off logs nothing.

Through MLflow's public API: an MlflowClient on the project's store, every call naming its run; the fluent
API's global URI and active run only around the calls that need them (logging a model, an evaluation's
inputs), and the caller's put back after."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from petpipe.pipeline import ORDER
from petpipe.track.identity import PIPELINE, PIPELINE_KEY_TAG, STAGE_TAG, Project, load_project, mlflow_params
from petpipe.utils.atomic import WRITE_REFUSALS, display, free_bytes, megabytes
from petpipe.utils.file_formats import file_digest

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's kind of experiment: without it `mlflow ui` opens the experiment on the GenAI traces overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
OFF_VALUES = ("off", "0", "false", "no")
# Where export's ONNX bundle goes in the logged model: beside artifacts/model.pt.
BUNDLE_IN_MODEL = "artifacts/onnx"

# MLflow retries an unreachable server for about four minutes by default; a stage should lose
# seconds, not minutes, to a dead server. Set only where the user has not chosen.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _fluent() -> Any:
    """mlflow, imported on first use: `petpipe --help` and untracked stages never pay for it."""
    import mlflow

    return mlflow


# ---------------------------------------------------------------- best effort

UNREACHABLE = {
    "Connection refused": "connection refused",
    "timed out": "timed out",
    "Name or service not known": "unknown host",
    "Max retries exceeded": "no answer",
}


def describe_error(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    short = next((short for marker, short in UNREACHABLE.items() if marker in text), text.splitlines()[0])
    return short if len(short) <= 200 else short[:197] + "..."


def headline(uri: str, error: BaseException, artifacts: Path | None = None) -> str:
    if isinstance(error, OSError) and error.errno in WRITE_REFUSALS:  # a full disk under the artifact store
        where = Path(error.filename) if error.filename else artifacts
        free = free_bytes(where) if where is not None else None
        return f"{WRITE_REFUSALS[error.errno]} writing {display(where) if where else 'to ' + uri}" + (
            f" ({megabytes(free)} free)" if free is not None else ""
        )
    reason = describe_error(error)
    if uri.startswith(("http://", "https://")) and reason in UNREACHABLE.values():
        return f"tracking server {uri} unreachable ({reason})"
    return f"logging to {uri} failed ({reason})"


def not_logged(missed: Mapping[str, Mapping[str, None]], steps: set[int]) -> str:
    """What `missed` holds, by kind: "params, metrics (accuracy at steps 1-2), artifacts (report.md), ..."."""
    names = {kind: ", ".join(found) for kind, found in missed.items()}
    at = f" at steps {min(steps)}-{max(steps)}" if steps else ""
    texts = {
        "params": "params",
        "metrics": f"metrics ({names.get('metrics')}{at})",
        "artifacts": f"artifacts ({names.get('artifacts')})",
        "model": names.get("model"),
    }
    return ", ".join(text for kind, text in texts.items() if kind in missed) or "the run's end status"


def _no_retry_line(record: logging.LogRecord) -> bool:  # urllib3's line per retry: the one warning says it all
    return not record.getMessage().startswith("Retrying")


@contextlib.contextmanager
def _fluent_state(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API logs to its global tracking URI (exported to MLFLOW_TRACKING_URI as well), into its
    active run: for the few calls that need them (a model, its inputs and evaluation), point both at this
    stage's store and run, then put the caller's back (tests and notebooks run stages in-process). Public
    calls only: `is_tracking_uri_set` tells an unset URI from a default one, `set_tracking_uri(None)` unsets."""
    mlflow = _fluent()
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    global_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        # nested: a caller's own active run stays active around it, and is active again after it.
        with mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=False):
            yield
    finally:
        # A global URI equal to the environment's is the environment's: unset it, as it most likely was.
        mlflow.set_tracking_uri(None if global_before == env_before else global_before)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.update({} if env_before is None else {"MLFLOW_TRACKING_URI": env_before})


def _system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's CPU and memory monitor on the stage's run where MLflow's own switch asks for it
    (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING), as a run started by `mlflow.start_run` would have; None otherwise."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    if not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    monitor.start()
    return monitor


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------- the stage's run


class StageRun:
    """One stage's MLflow run, nested under its pipeline run; a `with` block ends it FINISHED, FAILED or KILLED.
    Without a project it is the null run: it logs nothing and, unless it has a `failure` to report (no
    readable settings), says nothing."""

    def __init__(self, stage: str, project: Project | None = None, *, failure: str | None = None):
        self.stage = stage
        self.project = project
        self.failure = failure  # why logging is off; set by the first failed call
        self.missed: dict[str, dict[str, None]] = {}  # kind -> the names not logged, for the warning at the end
        self.missed_steps: set[int] = set()
        self._client: Any = None  # an MlflowClient on the project's store: every call names its run
        self._run_id: str | None = None
        self._parent_id: str | None = None
        self._monitor: Any = None  # MLflow's system metrics, where MLflow's switch is on
        self._experiment: str | None = None
        self.model_id: str | None = None  # the LoggedModel log_model logged

    def _best_effort(self, action: Callable[[], Any], kind: str, *names: str, step: int | None = None) -> None:
        """The one guard of every MLflow call: after the first failure, calls are only noted for the warning."""
        if self.project is not None and self.failure is None:
            urllib3 = logging.getLogger("urllib3.connectionpool")
            urllib3.addFilter(_no_retry_line)
            try:
                action()
                return
            except Exception as error:  # a tracking failure must never reach the stage
                log.debug("mlflow call failed", exc_info=True)
                self.failure = headline(self.project.uri, error, self.project.artifact_folder)
            finally:
                urllib3.removeFilter(_no_retry_line)
        if self.failure is not None:
            self.missed.setdefault(kind, {}).update(dict.fromkeys(names))
            self.missed_steps.update([] if step is None else [step])

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.end("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def start(self, params: Mapping[str, Any]) -> StageRun:
        def begin() -> None:
            from mlflow.tracking.context.registry import resolve_tags

            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            self._client = _fluent().MlflowClient(self.project.uri)
            experiment_id = self._experiment = self._experiment_id()
            self._parent_id = self._pipeline_run(experiment_id)
            # The tags mlflow.start_run would add (user, source type), the stage's own, and its parent's id.
            tags = resolve_tags({**self.project.tags(self.stage, params), PARENT_TAG: self._parent_id})
            self._run_id = self._client.create_run(experiment_id, tags=tags, run_name=self.stage).info.run_id
            self._monitor = _system_metrics(self._run_id, self.project.uri)
            self._send_params(self._run_id, params)

        self._best_effort(begin, "params")
        return self

    def end(self, status: str) -> None:
        def finish() -> None:
            if self._monitor is not None:
                self._monitor.finish()
            with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a link per ended run: one is enough
                self._client.set_terminated(self._run_id, status)
                self._client.set_terminated(self._parent_id, status)

        self._best_effort(finish, "status")
        if self.failure is not None:
            log.warning(
                "mlflow: %s; not logged for stage %s: %s. The stage's outputs are written as usual.",
                self.failure,
                self.stage,
                not_logged(self.missed, self.missed_steps),
            )

    def _experiment_id(self) -> str:
        name = self.project.experiment
        if (experiment := self._client.get_experiment_by_name(name)) is None:
            try:
                return self._client.create_experiment(
                    name, artifact_location=self.project.artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except Exception:  # created meanwhile by another process?
                if (experiment := self._client.get_experiment_by_name(name)) is None:
                    raise
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older petpipe, or by hand
            self._client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _pipeline_run(self, experiment_id: str) -> str:
        """The pipeline run this stage belongs to, running again: found by its key, else created."""
        query = f"tags.`{PIPELINE_KEY_TAG}` = '{self.project.pipeline_key}' and tags.`{STAGE_TAG}` = '{PIPELINE}'"
        found = self._client.search_runs(
            [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if found and not self._already_ran(experiment_id, found[0].info.run_id):
            self._client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = self.project.tags(PIPELINE, self.project.params)
        run_id = self._client.create_run(experiment_id, tags=tags, run_name=self.project.pipeline_name).info.run_id
        self._send_params(run_id, self.project.params)
        return run_id

    def _send_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Flattened params, in batches of the size MLflow's store accepts."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        entries = [Param(key, value) for key, value in mlflow_params(params).items()]
        for batch in _batches(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(run_id, params=batch)

    def _already_ran(self, experiment_id: str, parent_id: str) -> bool:
        """True when this stage or a later one already ran in it: this is a new pipeline run (`dvc repro -f`)."""
        children = self._client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
        logged = {child.data.tags.get(STAGE_TAG) for child in children}
        later = ORDER[ORDER.index(self.stage) :] if self.stage in ORDER else (self.stage,)
        return any(stage in logged for stage in later)

    # -- what stages log

    def log_params(self, params: Mapping[str, Any]) -> None:
        """More params for the stage's run, flattened (what a stage decided while running, e.g. its levers)."""
        self._best_effort(lambda: self._send_params(self._run_id, params), "params")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        values = {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, numbers.Real) and math.isfinite(value)
        }
        if values:
            self._best_effort(lambda: self._send_metrics(values, step), "metrics", *values, step=step)

    def _send_metrics(self, values: Mapping[str, float], step: int | None) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step or 0) for key, value in values.items()]
        for batch in _batches(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=batch)

    def log_artifacts(self, paths: list[Path]) -> None:
        """Files, and folders as folders of the same name."""
        for path in map(Path, paths):
            if path.is_dir():
                self._best_effort(
                    lambda: self._client.log_artifacts(self._run_id, str(path), artifact_path=path.name),
                    "artifacts",
                    path.name,
                )
            elif path.exists():
                self._best_effort(lambda: self._client.log_artifact(self._run_id, str(path)), "artifacts", path.name)

    def log_model(
        self,
        checkpoint: Path,
        *,
        example: Path,
        index: Path,
        registered_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """The checkpoint as the MLflow model that takes photos (petpipe/inference/mlflow_model.py), registered under
        `registered_name`, with `index` (index.csv) as the run's training dataset; `example` is a photo for its
        input example. Only for the stages in log_models."""
        if self.project is None or self.stage not in self.project.log_models:
            return

        def send() -> None:
            from petpipe.inference import mlflow_model
            from petpipe.track import registry  # here, not at the top: importing it sets MLflow's model

            with _fluent_state(self.project.uri, self._run_id):  # pyfunc.log_model logs into the active run
                info = mlflow_model.log_model(
                    checkpoint, example=example, registered_name=registered_name, metadata=metadata
                )
                _fluent().log_input(registry.index_dataset(index), context="training")
            self.model_id = info.model_id
            # The weights' digest, by which evaluate finds this LoggedModel again (registry.logged_model_of).
            self._client.set_logged_model_tags(info.model_id, {registry.CHECKPOINT_TAG: file_digest(checkpoint)})

        self._best_effort(
            send, "model", "the model" + (f" (registered name {registered_name})" if registered_name else "")
        )

    def attach_bundle(self, checkpoint: Path, bundle: Path) -> None:
        """export's ONNX bundle into the MLflow model that holds `checkpoint` (tracking.log_models logged it), as
        artifacts/onnx/ beside artifacts/model.pt: who downloads the model can predict with numpy, Pillow and
        onnxruntime alone. Nothing when no logged model holds these weights."""

        def send() -> None:
            from petpipe.track import registry

            model_id = registry.logged_model_of(self._client, self._experiment, checkpoint)
            if model_id is not None:
                self._client.log_model_artifacts(model_id, str(bundle), artifact_path=BUNDLE_IN_MODEL)

        self._best_effort(send, "model", "its ONNX bundle")

    def log_evaluation(self, checkpoint: Path, metrics: Mapping[str, float], *, index: Path) -> str | None:
        """evaluate's metrics on the LoggedModel that holds `checkpoint` (logged by finetune), the index as
        their dataset; then tracking.promote's decision on the registered model's `champion` alias, returned as
        a sentence (None when there is nothing to decide: no such model, or promote off)."""
        decided: list[str] = []

        def send() -> None:
            from petpipe.track import registry

            model_id = registry.logged_model_of(self._client, self._experiment, checkpoint)
            if model_id is None:  # not logged (tracking.log_models), or logged to another store
                return
            with _fluent_state(self.project.uri, self._run_id):  # the evaluation's inputs go to the active run
                registry.log_evaluation(model_id, metrics, index=index)
            name, metric = self.project.registered_model, self.project.promote
            version = None if name is None else registry.version_of(self._client, name, model_id)
            if version is None or metric is None or metric not in metrics:
                return
            decision = registry.promote(self._client, name, version, metric, float(metrics[metric]))
            for key, value in decision.tags().items():
                self._client.set_tag(self._run_id, key, value)
            decided.append(decision.sentence())

        self._best_effort(send, "metrics", "the evaluation of the logged model")
        return decided[0] if decided else None


def no_run(stage: str) -> StageRun:
    """The null run: logs nothing and says nothing (tracking off; the processes other than rank 0 under torchrun)."""
    return StageRun(stage)


@contextlib.contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any], settings: Any = None) -> Iterator[StageRun]:
    """The run of `stage`, started on entering the `with` block. params: what the stage used (its run's
    params); settings: the whole Params the stage runs with, whose `tracking` section says where and what
    to log (default: ./params.yaml)."""
    if os.environ.get("PETPIPE_TRACKING", "").strip().lower() in OFF_VALUES:
        yield no_run(stage)
        return
    workspace = Path.cwd()
    try:
        run = StageRun(stage, load_project(workspace, settings=settings))
    except Exception as error:  # no or unreadable params.yaml: the stage itself decides if that matters
        run = StageRun(stage, failure=f"no tracking settings in {workspace / 'params.yaml'} ({describe_error(error)})")
    with run.start(params):
        yield run
