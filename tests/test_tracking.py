"""MLflow tracking: the sample pipeline against a real `mlflow server`, read back with MlflowClient;
a server killed mid-pipeline costs no output; a dead server costs seconds and one warning per stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from helpers import PROJECT_ROOT, QUIET_MLFLOW, SAMPLE_IMAGES, STAGES, Served, free_port, locked_outputs
from petpipe.track import identity, mlflow_runs

VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- a real tracking server, a real pipeline
# `served` (conftest): the sample pipeline's `dvc repro` against a real `mlflow server`, kept up for the session;
# the server itself is helpers.mlflow_server.


def pipeline_env(**extra: str) -> dict[str, str]:
    """The test's environment with the venv first on PATH and tracking on, plus `extra`."""
    environment = {**os.environ, **QUIET_MLFLOW, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    environment.pop("PETPIPE_TRACKING", None)
    return environment


def test_one_pipeline_run_with_a_nested_run_per_stage(served):
    parent = served.parent
    assert sorted(served.runs) == sorted(STAGES)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=served.project, capture_output=True, text=True
    ).stdout.strip()
    assert parent.info.status == "FINISHED" and parent.data.tags[identity.STAGE_TAG] == identity.PIPELINE
    assert parent.data.tags[identity.GIT_COMMIT_TAG] == commit
    assert parent.data.params["train_head.epochs"] == "2"  # the whole params.yaml, flattened
    for stage, run in served.runs.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED", stage
        assert run.info.run_name == stage and tags[identity.STAGE_TAG] == stage
        assert tags[mlflow_runs.PARENT_TAG] == parent.info.run_id
        assert tags[identity.GIT_COMMIT_TAG] == commit
        assert len(tags[identity.PARAMS_HASH_TAG]) == 16
        assert identity.DVC_EXP_TAG not in tags  # plain `dvc repro`, no experiment
    head = served.runs["train-head"].data.params
    assert head["train_head.epochs"] == "2" and head["train.augment.min_scale"] == "0.75"
    assert served.runs["fetch"].data.params["data.source"].endswith("images")
    assert served.runs["fetch"].data.metrics["images"] == 370
    assert "mlflow:" not in served.output  # nothing failed, nothing to warn about


def test_per_epoch_metrics_by_step_and_the_lr_finder_curve(served):
    for stage in ("train-head", "finetune"):
        history = pd.read_csv(served.project / f"stages/{stage}/history.csv")
        logged = served.client.get_metric_history(served.runs[stage].info.run_id, "accuracy")
        assert [metric.step for metric in logged] == list(history["epoch"])
        assert [metric.value for metric in logged] == pytest.approx(list(history["accuracy"]))
    lr_find = served.runs["lr-find"]
    result = json.loads((served.project / "stages/lr-find/lr_find.json").read_text())
    curve = served.client.get_metric_history(lr_find.info.run_id, "lr_find_smoothed_loss")
    assert [metric.step for metric in curve] == list(range(len(result["curve"]["lr"])))
    for rule, lr in result["suggestions"].items():
        assert lr_find.data.metrics[f"suggested_lr_{rule}"] == pytest.approx(lr)
    evaluation = json.loads((served.project / "stages/evaluate/metrics.json").read_text())
    assert served.runs["evaluate"].data.metrics["accuracy"] == pytest.approx(evaluation["accuracy"])


def test_plots_and_reports_are_artifacts(served, tmp_path):
    expected = {
        "index-labels": {"class_counts.png", "report.json"},
        "train-head": {"training.png", "history.csv", "metrics.json", "show_batch.png"},
        "audit": {"label_issues.csv", "duplicates.csv", "report.md", "metrics.json"},
        "lr-find": {"lr_find.png", "lr_find.csv", "lr_find.json"},
        "finetune": {"training.png", "history.csv", "metrics.json"},
        "evaluate": {"confusion.png", "top_losses.png", "confusion.csv", "report.md", "metrics.json"},
        "export": {"bundle"},  # the folder, as a folder of the same name
    }
    for stage, names in expected.items():
        listed = {artifact.path for artifact in served.client.list_artifacts(served.runs[stage].info.run_id)}
        assert names <= listed, (stage, listed)
    downloaded = served.client.download_artifacts(served.runs["evaluate"].info.run_id, "report.md", str(tmp_path))
    assert Path(downloaded).read_bytes() == (served.project / "stages/evaluate/report.md").read_bytes()


def registered_model(served: Served) -> tuple[Any, Path]:
    """The registered model's info and a local copy of it, from the server."""
    import mlflow

    uri = "models:/petpipe-classifier/1"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(served.server.url)
    try:
        return mlflow.models.get_model_info(uri), Path(mlflow.artifacts.download_artifacts(uri))
    finally:
        mlflow.set_tracking_uri(previous)


def test_finetune_model_is_registered_takes_photos_and_holds_no_pickle(served):
    import mlflow

    from petpipe.inference.predict import load_predictor, predict_files

    versions = served.client.search_model_versions("name='petpipe-classifier'")
    assert len(versions) == 1 and versions[0].run_id == served.runs["finetune"].info.run_id
    assert "Created version '1' of model 'petpipe-classifier'" in served.output
    info, local = registered_model(served)
    classes = json.loads((served.project / "stages/index-labels/classes.json").read_text())["classes"]
    assert info.metadata["classes"] == classes and info.metadata["img_size"] == 64
    # A model from code: petpipe/inference/mlflow_model.py and the checkpoint; nothing pickled anywhere in it.
    files = {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}
    assert "mlflow_model.py" in files and "artifacts/model.pt" in files
    # export's bundle (stages/export/bundle), attached to the model finetune logged: it runs without torch.
    assert {"artifacts/onnx/bundle.json", "artifacts/onnx/model.onnx"} <= files
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))]

    photos = sorted((served.project / "stages/fetch/images").glob("*.jpg"))[:6]
    model = mlflow.pyfunc.load_model(str(local))
    by_bytes = model.predict(pd.DataFrame({"image": [photo.read_bytes() for photo in photos]}))
    by_path = model.predict(pd.DataFrame({"path": [str(photo) for photo in photos]}))
    expected = list(
        predict_files(load_predictor(served.project / "stages/finetune/model.pt", device="cpu"), photos, top_k=5)
    )
    for rows in (by_bytes, by_path):
        assert list(rows["label"]) == [prediction.labels[0][0] for prediction in expected]
        for row, prediction in zip(rows.itertuples(), expected):
            assert list(row.top_labels) == [label for label, _ in prediction.labels]
            assert row.top_probabilities == pytest.approx([value for _, value in prediction.labels], abs=1e-4)
            assert row.error is None  # null, not NaN: what a JSON answer carries
    # top_k is a param of the signature: MLflow passes it on (an undeclared param would be dropped).
    assert info.signature.params.to_dict() == [{"name": "top_k", "type": "long", "default": 5, "shape": None}]
    three = model.predict(pd.DataFrame({"path": [str(photos[0])]}), params={"top_k": 3})
    assert list(three["top_labels"][0]) == [label for label, _ in expected[0].labels[:3]]
    broken = model.predict(pd.DataFrame({"image": [b"not an image", photos[0].read_bytes()]}))
    assert "cannot read image" in broken["error"][0] and broken["label"][1] == expected[0].labels[0][0]


def test_the_registered_version_carries_its_evaluation_and_is_the_champion(served):
    """MLflow 3's lineage: finetune's LoggedModel holds evaluate's metrics (on the index as their dataset), the
    registered version is made from it, and the first evaluated version takes the `champion` alias."""
    from petpipe.track import registry

    client = served.client
    experiment = client.get_experiment_by_name("petpipe")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI overview
    (version,) = client.search_model_versions("name='petpipe-classifier'")
    model_id = version.model_id or version.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == served.runs["finetune"].info.run_id
    checkpoint = served.project / "stages/finetune/model.pt"
    assert logged.tags[registry.CHECKPOINT_TAG] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    evaluated = json.loads((served.project / "stages/evaluate/metrics.json").read_text())
    index = served.project / "stages/index-labels/index.csv"
    digest = hashlib.sha256(index.read_bytes()).hexdigest()[:32]
    frame = pd.read_csv(index, dtype=str, keep_default_na=False)
    split_digests = {
        split: hashlib.sha256(frame[frame["split"] == split].to_csv(index=False).encode()).hexdigest()[:32]
        for split in ("valid", "test")
    }
    on_model = {metric.key: metric for metric in logged.metrics if metric.run_id == served.runs["evaluate"].info.run_id}
    # Both sets of numbers, each with its dataset: valid's (what elects the champion) and test's.
    for name in ("accuracy", "error_rate", "top5_accuracy", "loss", "macro_f1", "balanced_accuracy"):
        for split, key in (("valid", name), ("test", f"test_{name}")):
            assert on_model[key].value == pytest.approx(evaluated[key]), key
            assert (on_model[key].dataset_name, on_model[key].dataset_digest) == (split, split_digests[split])

    # The runs' inputs: finetune trained on the index; evaluate evaluated that model on its valid and test rows.
    inputs = client.get_run(served.runs["finetune"].info.run_id).inputs
    (dataset,) = inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("index", digest)
    assert {tag.key: tag.value for tag in dataset.tags}["mlflow.data.context"] == "training"
    inputs = client.get_run(served.runs["evaluate"].info.run_id).inputs
    assert {(dataset.dataset.name, dataset.dataset.digest) for dataset in inputs.dataset_inputs} == set(
        split_digests.items()
    )
    assert {
        tag.value for dataset in inputs.dataset_inputs for tag in dataset.tags if tag.key == "mlflow.data.context"
    } == {"evaluation"}
    assert [model.model_id for model in client.get_run(served.runs["evaluate"].info.run_id).inputs.model_inputs] == [
        model_id
    ]

    champion = client.get_model_version_by_alias("petpipe-classifier", "champion")
    assert champion.version == version.version
    decision = client.get_run(served.runs["evaluate"].info.run_id).data.tags
    assert decision["petpipe.champion.decision"] == "promoted"
    assert float(decision["petpipe.champion.value"]) == pytest.approx(evaluated["accuracy"])
    assert (
        f"champion: petpipe-classifier@champion -> version 1 (accuracy {evaluated['accuracy']:.4f}), "
        "the first evaluated version"
    ) in served.output


def test_predict_and_serve_take_a_registered_model(served, tmp_path):
    """--model models:/<name>@champion (or /<version>): the registered checkpoint, downloaded once per version
    into .petpipe/models/, predicts what the pipeline's own checkpoint predicts."""
    photos = sorted((served.project / "stages/fetch/images").glob("*.jpg"))[:3]
    environment = pipeline_env(MLFLOW_TRACKING_URI=served.server.url)

    def predict(model: str, images: list[Path] = photos) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "petpipe"), "predict", "--model", model, "--json", *map(str, images)],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )

    local = predict(str(served.project / "stages/finetune/model.pt"))
    assert local.returncode == 0, local.stderr
    for uri in ("models:/petpipe-classifier@champion", "models:/petpipe-classifier/1"):
        remote = predict(uri)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == json.loads(local.stdout), uri
    assert [path.name for path in (tmp_path / ".petpipe/models/petpipe-classifier").iterdir()] == ["1"]

    for uri, said in (
        ("models:/petpipe-classifier@nope", "not found in the model registry"),
        ("models:/petpipe-classifier/7", "not found in the model registry"),
        ("models:/petpipe-classifier", "not a registered model URI"),
    ):
        refused = predict(uri)
        assert refused.returncode == 1 and refused.stdout == "", uri
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"Error: {uri}: {said}"), line

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [str(VENV_BIN / "petpipe"), "serve", "--model", "models:/petpipe-classifier@champion", "--port", "0"],
            cwd=served.project,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "http://" not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)
        url = log_path.read_text().split("petpipe serve: ")[1].split()[0]
        request = urllib.request.Request(
            f"{url}api/predict?name={photos[0].name}", data=photos[0].read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        # The page predicts one photo: compare with a batch of that one photo, since a CPU's kernels for a
        # batch of 3 and of 1 differ in the last bits (1e-6 of a probability).
        alone = predict(str(served.project / "stages/finetune/model.pt"), photos[:1])
        expected = json.loads(alone.stdout)[0]["predictions"][0]
        assert answer["predictions"][0]["label"] == expected["label"]
        assert answer["predictions"][0]["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_mlflow_models_serve_answers_a_jpeg_with_the_breed(served, tmp_path):
    """`mlflow models serve` on 127.0.0.1: a POST of a base64 JPEG gets the breed; a bad image gets an error
    for that image, and the server keeps answering."""
    import base64

    from petpipe.inference.predict import load_predictor, predict_files

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/petpipe-classifier/1",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=pipeline_env(MLFLOW_TRACKING_URI=served.server.url),
        )
    try:
        _wait_for_url(f"http://127.0.0.1:{port}/ping", process, log_path, timeout=300)
        photo = sorted((served.project / "stages/fetch/images").glob("*.jpg"))[3]
        expected = next(
            predict_files(load_predictor(served.project / "stages/finetune/model.pt", device="cpu"), [photo], top_k=5)
        ).labels[0][0]
        encoded = base64.b64encode(photo.read_bytes()).decode()
        for images, top_k in (([encoded], 5), (["bm90IGFuIGltYWdl", encoded], 2), ([encoded], 1)):
            # the second holds "not an image"; top_k travels as a param of the request, as MLflow's clients send it
            body = json.dumps(
                {
                    "dataframe_split": {"columns": ["image"], "data": [[image] for image in images]},
                    "params": {"top_k": top_k},
                }
            )
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                rows = json.loads(response.read())["predictions"]
            assert rows[-1]["label"] == expected and rows[-1]["error"] is None
            assert len(rows[-1]["top_labels"]) == len(rows[-1]["top_probabilities"]) == top_k
            if len(rows) == 2:
                assert rows[0]["label"] is None and "cannot read image" in rows[0]["error"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_for_url(url: str, process: subprocess.Popen, log_path: Path, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s:\n{log_path.read_text()[-3000:]}")


def test_server_killed_mid_pipeline_costs_no_output(server_killed):
    """The server killed once index-labels is logged (conftest's `server_killed`): the later stages each warn
    once and still finish; test_reproducibility checks that their outputs are byte for byte `served`'s."""
    output = server_killed.output
    assert server_killed.returncode == 0, output[-6000:]
    warnings = [line for line in output.splitlines() if line.startswith("mlflow: ")]
    for stage in STAGES:
        mine = [line for line in warnings if f"not logged for stage {stage}:" in line]
        assert len(mine) == (0 if stage in ("fetch", "index-labels") else 1), (stage, mine)
    assert all(server_killed.server_url in line and "unreachable" in line for line in warnings), warnings
    assert "Traceback" not in output
    project = server_killed.project
    assert (
        "up to date"
        in subprocess.run(["dvc", "status"], cwd=project, env=pipeline_env(), capture_output=True, text=True).stdout
    )
    outputs = list(locked_outputs(project))
    assert len(outputs) >= 20 and all((project / path).exists() for path in outputs)


# ---------------------------------------------------------------- in-process, no pipeline


@pytest.fixture()
def embedded_project(tmp_path, monkeypatch) -> Path:
    """A folder with the project's params.yaml, the working directory, with the default (embedded) store."""
    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "PETPIPE_TRACKING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**QUIET_MLFLOW, **mlflow_runs.HTTP_DEFAULTS}.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def test_stage_runs_group_into_pipeline_runs_in_the_embedded_store(embedded_project, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "tidy-exp")
    for stage in ("fetch", "index-labels"):
        with mlflow_runs.stage_run(stage, params={"train": {"augment": {"flip": True}}, "note": None}) as run:
            run.log_metrics({"images": 3, "skipped": None}, step=None)  # None is not a metric: skipped
    with pytest.raises(ZeroDivisionError):  # the stage's own error comes through, untouched
        with mlflow_runs.stage_run("fetch", params={}):  # fetch again: a new pipeline run (dvc repro -f)
            _ = 1 / 0

    client = MlflowClient(tracking_uri=f"sqlite:///{embedded_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("petpipe")
    assert experiment.artifact_location == (embedded_project / "mlruns" / "petpipe").as_uri()
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run for run in runs if mlflow_runs.PARENT_TAG not in run.data.tags]
    assert [parent.info.run_name for parent in parents] == ["pipeline tidy-exp", "pipeline tidy-exp"]
    children = {
        parent.info.run_id: [run for run in runs if run.data.tags.get(mlflow_runs.PARENT_TAG) == parent.info.run_id]
        for parent in parents
    }
    first, second = (children[parent.info.run_id] for parent in parents)
    assert [run.info.run_name for run in first] == ["fetch", "index-labels"]
    assert [(run.info.run_name, run.info.status) for run in second] == [("fetch", "FAILED")]
    assert parents[1].info.status == "FAILED"
    assert first[0].data.params == {"train.augment.flip": "true", "note": "null"}
    assert first[0].data.metrics == {"images": 3.0}
    assert all(run.data.tags[identity.DVC_EXP_TAG] == "tidy-exp" for run in runs)


def test_unreachable_server_costs_seconds_and_one_warning(embedded_project, monkeypatch, caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    (embedded_project / "report.md").write_text("# report")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        with mlflow_runs.stage_run("finetune", params={"finetune": {"epochs": 2}}) as run:
            for epoch in (1, 2):
                run.log_metrics({"accuracy": 0.5, "train_loss": 1.0}, step=epoch)
            run.log_artifacts([embedded_project / "report.md"])
            run.log_model(
                embedded_project / "model.pt",
                example=embedded_project / "photo.jpg",
                index=embedded_project / "index.csv",
                registered_name="pets",
            )
            finished = True
    assert finished and time.monotonic() - started < 60
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0] == (
        f"mlflow: tracking server {url} unreachable (connection refused); not logged for stage finetune: "
        "params, metrics (accuracy, train_loss at steps 1-2), artifacts (report.md), "
        "the model (registered name pets). The stage's outputs are written as usual."
    )


def logged_model_files(project: Path, uri: str, into: Path) -> tuple[Path, set[str]]:
    """A local copy of the logged model at `uri` in the project's embedded store, and its files."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(into)))
    finally:
        mlflow.set_tracking_uri(None)
    return local, {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}


def test_the_export_stage_puts_its_bundle_into_the_logged_model_which_predicts_as_the_checkpoint(
    embedded_project, trained
):
    """finetune logs its model (the checkpoint, no export); the export stage writes the bundle, its DVC output, and
    attaches it to that model as artifacts/onnx/ beside artifacts/model.pt: the registered version, downloaded, runs
    the bundle with numpy and onnxruntime to the checkpoint's probabilities within 1e-4."""
    import mlflow
    import numpy as np

    from petpipe.inference.bundle import BundlePredictor
    from petpipe.inference.predict import decode_pixels, load_predictor, pixel_batch
    from petpipe.params import load_params
    from petpipe.stages import export

    pytest.importorskip("onnxscript", reason="export needs onnxscript (pip install onnx onnxscript onnxruntime)")
    photos = sorted(SAMPLE_IMAGES.glob("*.jpg"))[::50]  # 8 breeds, landscapes and portraits
    with mlflow_runs.stage_run("finetune", params={"finetune": {"epochs": 1}}) as run:
        run.log_model(trained.model, example=photos[0], index=trained.index, registered_name="pets")
    assert run.failure is None and run.model_id is not None
    _, before = logged_model_files(embedded_project, "models:/pets/1", embedded_project / "before")
    assert "artifacts/model.pt" in before and not [name for name in before if name.startswith("artifacts/onnx")]

    outputs = export.Outputs(bundle=embedded_project / "stages/export/bundle")
    summary = export.run(load_params(embedded_project / "params.yaml"), export.Inputs(model=trained.model), outputs)
    assert summary.endswith(f"-> {outputs.bundle}")
    local, files = logged_model_files(embedded_project, "models:/pets/1", embedded_project / "downloaded")
    assert {"artifacts/model.pt", "artifacts/onnx/bundle.json", "artifacts/onnx/model.onnx"} <= files
    assert (local / "artifacts/onnx/model.onnx").read_bytes() == (outputs.bundle / "model.onnx").read_bytes()

    bundle = BundlePredictor(local / "artifacts" / "onnx")
    checkpoint = load_predictor(trained.model, device="cpu")
    assert bundle.classes == checkpoint.classes and bundle.presize == checkpoint.presize
    pixels = pixel_batch([decode_pixels(photo, bundle.presize) for photo in photos])  # (8, 3, P, P)
    expected = checkpoint.probabilities(pixels)
    assert np.abs(bundle.probabilities(pixels) - expected).max() <= 1e-4
    # The pyfunc itself still predicts from the checkpoint beside the bundle.
    answer = mlflow.pyfunc.load_model(str(local)).predict(pd.DataFrame({"path": [str(photos[0])]}))
    assert answer["label"][0] == checkpoint.classes[int(expected[0].argmax())]


def test_logging_a_model_exports_nothing(embedded_project, trained, monkeypatch, caplog):
    """The ONNX export is the export stage's job alone: finetune's model logging never calls it, so an exporter
    that would fail costs the logged model nothing and says nothing."""
    from petpipe.errors import PetpipeError
    from petpipe.inference import onnx_export

    def no_exporter(*args, **kwargs):
        raise PetpipeError("export needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime")

    monkeypatch.setattr(onnx_export, "export_bundle", no_exporter)
    with caplog.at_level(logging.WARNING), mlflow_runs.stage_run("finetune", params={}) as run:
        run.log_model(trained.model, example=next(SAMPLE_IMAGES.glob("*.jpg")), index=trained.index)
    assert run.failure is None and run.model_id is not None
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    _, files = logged_model_files(embedded_project, f"models:/{run.model_id}", embedded_project / "downloaded")
    assert "artifacts/model.pt" in files and not [name for name in files if name.startswith("artifacts/onnx")]


def test_a_stage_logs_where_its_own_params_file_says(embedded_project, sample_images, monkeypatch):
    """`petpipe <stage> --params other.yaml`: the tracking section of other.yaml, not ./params.yaml's, decides."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from petpipe.cli import main

    other = embedded_project / "other.yaml"
    other.write_text(
        (PROJECT_ROOT / "params.yaml")
        .read_text()
        .replace("experiment: petpipe", "experiment: other-experiment")
        .replace("source: data/oxford-iiit-pet.url", f"source: {sample_images}")
        .replace("checksum: md5:", "checksum: null #")
    )
    result = CliRunner().invoke(main, ["fetch", "--params", str(other), "--out", "stages/fetch/images"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{embedded_project / 'mlflow.db'}")
    assert client.get_experiment_by_name("petpipe") is None
    experiment = client.get_experiment_by_name("other-experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags[identity.STAGE_TAG] for run in runs) == ["fetch", "pipeline"]
    parent = next(run for run in runs if run.data.tags[identity.STAGE_TAG] == "pipeline")
    assert parent.data.params["tracking.experiment"] == "other-experiment"  # the whole file it ran with


def test_tracking_off_logs_nothing(embedded_project, monkeypatch):
    monkeypatch.setenv("PETPIPE_TRACKING", "off")
    with mlflow_runs.stage_run("fetch", params={"data": {}}) as run:
        run.log_metrics({"images": 1})
    assert not (embedded_project / "mlflow.db").exists()


def test_system_metrics_follow_mlflows_own_switch(embedded_project, monkeypatch):
    """MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, as for any MLflow run: CPU and memory on the stage's run."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    with mlflow_runs.stage_run("fetch", params={}):
        time.sleep(1.5)
    client = MlflowClient(tracking_uri=f"sqlite:///{embedded_project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("petpipe").experiment_id])
    (stage,) = [run for run in runs if run.data.tags[identity.STAGE_TAG] == "fetch"]
    assert "system/cpu_utilization_percentage" in stage.data.metrics and stage.info.status == "FINISHED"


def test_a_stage_run_puts_mlflows_global_state_back(embedded_project, monkeypatch):
    """In-process callers (tests, notebooks) keep their global tracking URI, MLFLOW_TRACKING_URI and active run."""
    import mlflow

    callers_uri, stage_uri = (f"sqlite:///{embedded_project / name}" for name in ("callers.db", "mlflow.db"))
    mlflow.set_tracking_uri(callers_uri)
    try:
        with mlflow.start_run() as callers:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", stage_uri)  # where the stage logs
            with mlflow_runs.stage_run("fetch", params={}) as run:
                run.log_metrics({"images": 3})
            assert mlflow.active_run().info.run_id == callers.info.run_id
            assert mlflow.get_tracking_uri() == callers_uri and os.environ["MLFLOW_TRACKING_URI"] == stage_uri
    finally:
        mlflow.set_tracking_uri(None)
    assert mlflow.MlflowClient(callers_uri).get_run(callers.info.run_id).data.metrics == {}
    store = mlflow.MlflowClient(stage_uri)
    runs = store.search_runs([store.get_experiment_by_name("petpipe").experiment_id])
    assert sorted(run.data.tags[identity.STAGE_TAG] for run in runs) == ["fetch", "pipeline"]
    assert next(run for run in runs if run.info.run_name == "fetch").data.metrics == {"images": 3.0}


def test_params_flatten_to_mlflow_strings():
    flat = identity.flatten({"train": {"augment": {"flip": True, "min_scale": 0.75}}, "log_models": ["finetune"]})
    assert {key: identity.param_value(value) for key, value in flat.items()} == {
        "train.augment.flip": "true",
        "train.augment.min_scale": "0.75",
        "log_models": '["finetune"]',
    }
    long = identity.param_value("x" * 10_000)
    assert len(long) == identity.MAX_PARAM_VALUE and long.endswith("...")


def test_the_champion_moves_only_to_a_better_version(embedded_project):
    """registry.promote against a real (embedded) registry: the first evaluated version becomes champion, a worse
    one leaves the alias where it is, a better one takes it; lower wins for loss; both numbers are said."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from petpipe.track import registry

    uri = f"sqlite:///{embedded_project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    versions = {}
    with mlflow.start_run():
        for accuracy, loss in ((0.80, 0.70), (0.75, 0.60), (0.90, 0.65)):
            model = mlflow.create_external_model(name="model")
            mlflow.log_metrics({"accuracy": accuracy, "loss": loss}, model_id=model.model_id)
            versions[accuracy] = str(mlflow.register_model(f"models:/{model.model_id}", "pets").version)
            assert registry.version_of(client, "pets", model.model_id) == versions[accuracy]
    mlflow.set_tracking_uri(None)

    first = registry.promote(client, "pets", versions[0.80], "accuracy", 0.80)
    assert (
        first.promoted
        and first.sentence()
        == "champion: pets@champion -> version 1 (accuracy 0.8000), the first evaluated version; elected on the valid "
        "split, never on test"
    )
    worse = registry.promote(client, "pets", versions[0.75], "accuracy", 0.75)
    assert (
        not worse.promoted
        and worse.sentence()
        == "champion: pets@champion stays version 1 (accuracy 0.8000); version 2 (accuracy 0.7500) is not better; "
        "elected on the valid split, never on test"
    )
    assert str(client.get_model_version_by_alias("pets", "champion").version) == "1"
    assert worse.tags()["petpipe.champion.decision"] == "kept"
    better = registry.promote(client, "pets", versions[0.90], "accuracy", 0.90)
    assert better.promoted and str(client.get_model_version_by_alias("pets", "champion").version) == "3"
    assert better.sentence().endswith(
        "better than version 1 (accuracy 0.8000); elected on the valid split, never on test"
    )
    # loss: lower wins, read from the champion's LoggedModel (0.65), not from the call
    by_loss = registry.promote(client, "pets", versions[0.75], "loss", 0.60)
    assert (by_loss.champion, by_loss.champion_value, by_loss.promoted) == ("3", 0.65, True)
    assert str(client.get_model_version_by_alias("pets", "champion").version) == "2"
    again = registry.promote(client, "pets", "2", "loss", 0.60)
    assert not again.promoted and "evaluated again" in again.sentence()
    assert client.get_model_version("pets", "2").tags["petpipe.loss"] == "0.6"
