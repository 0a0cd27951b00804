"""Fixtures: the real sample photos beside the checkout, and what is expensive to build, once per session
(the indexed sample, a trained model and its evaluation, the whole pipeline reproduced). Helpers are in
tests/helpers.py."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    EVALUATE_THE_HEAD,
    HEAD_TRAINING,
    PIPELINE_THREE_WAY,
    QUEUED,
    SAMPLE_IMAGES,
    Experimented,
    ReproducedProject,
    Served,
    ServerKilled,
    TrainedHead,
    TrainedSample,
    as_a_user,
    copy_project,
    default_params,
    make_project,
    mlflow_server,
    outputs_in,
    params_with,
    run_as_a_user,
    run_command,
    run_evaluate,
    train_head_command,
    train_head_outputs,
    wait_for_the_queue,
    wait_until_stage_ended,
    write_params,
)
from petpipe.params import parse_params, with_overrides

# A shell without job control starts a background command (`.ci/run > log &`) with SIGINT ignored, and every
# process it starts inherits that: Ctrl-C tests would then test nothing. Each child starts with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# `make test` runs the suite on every core (pytest-xdist, --dist loadgroup). A worker builds a session or module
# fixture for itself, so the tests that share an expensive one form one work unit: each reproduced pipeline
# (pipeline_project and served, independent so that two workers build them side by side), the trained sample
# model, and otherwise the test's module (its module fixtures). xdist hands out the largest units first. tryfirst:
# xdist reads the marks in its own pytest_collection_modifyitems, which would otherwise run before this one.
SHARED_FIXTURES = {"pipeline": "pipeline_project", "served": "served", "trained": "trained_head"}


def pytest_configure(config):
    """On several workers, OpenMP waits passively. By default a thread that waits for the others spins, and two
    processes that train side by side on two cores then slow each other sixfold (40 steps of EfficientNet-Lite0
    at 64 px: 10 s alone, 66 s each side by side, 17 s each with passive waiting). The workers, and every process
    they start, inherit it; it must be set before torch loads OpenMP, and the workers start after this hook."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((name for name, fixture in SHARED_FIXTURES.items() if fixture in item.fixturenames), None)
        item.add_marker(pytest.mark.xdist_group(group or item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def sample_images() -> Path:
    """The 370 Oxford-IIIT Pet photos (10 per breed) that CI has beside the checkout."""
    assert SAMPLE_IMAGES.is_dir(), f"sample photos missing: {SAMPLE_IMAGES}"
    return SAMPLE_IMAGES


@pytest.fixture(scope="session", autouse=True)
def pixel_cache_in_tmp(tmp_path_factory):
    """Keep the decoded-pixel cache out of the checkout; shared by all tests of a session."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PETPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("pixel-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def tracking_off_unless_asked():
    """No MLflow logging in tests that are not about it (test_tracking and test_team switch it on)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PETPIPE_TRACKING", "off")
        yield


@pytest.fixture(scope="session")
def indexed_sample(tmp_path_factory, sample_images) -> Path:
    """index.csv of the sample photos (index-labels run once per session); returns its path."""
    from petpipe.stages import index_labels

    outputs = outputs_in(tmp_path_factory.mktemp("indexed"))
    index_labels.run(params_with({"model.img_size": 64}), index_labels.Inputs(images=sample_images), outputs)
    return outputs.index


@pytest.fixture(scope="session")
def trained_head(tmp_path_factory, indexed_sample, sample_images) -> TrainedHead:
    """`petpipe train-head` (helpers.HEAD_TRAINING: 64 px, 3 epochs) on the indexed sample in a process of its
    own, once per session. The one trained model of the in-process tests: test_training checks and sweeps it,
    the killed and resumed run must match it byte for byte, two-process DDP must come close to it, and
    test_evaluate, test_predict and the exported bundle (test_security) use it (`trained`, `bundle`)."""
    folder = tmp_path_factory.mktemp("train-head")
    write_params(folder / "params.yaml", HEAD_TRAINING)
    result = run_command(
        train_head_command(folder / "params.yaml", sample_images, indexed_sample, folder / "head"),
        folder,
        PETPIPE_CACHE_DIR=str(folder / "cache"),
    )
    return TrainedHead(
        folder,
        folder / "cache",
        folder / "params.yaml",
        train_head_outputs(folder / "head"),
        result.stdout,
        result.stderr,
    )


@pytest.fixture(scope="session")
def trained(trained_head, indexed_sample) -> TrainedSample:
    """The session's trained head with the params evaluate runs it with (on the head, with TTA)."""
    raw = with_overrides(default_params(), {**HEAD_TRAINING, **EVALUATE_THE_HEAD})
    return TrainedSample(
        root=trained_head.folder,
        index=indexed_sample,
        model=trained_head.outputs.model,
        params=parse_params(raw),
        params_dict=raw,
    )


@pytest.fixture(scope="session")
def evaluated(trained, tmp_path_factory) -> tuple[str, object]:
    """The trained sample evaluated (with TTA) once per session: evaluate's summary and outputs."""
    return run_evaluate(trained, tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="session")
def bundle(trained, tmp_path_factory) -> Path:
    """The trained checkpoint exported through the CLI (`petpipe export`), once: the ONNX export takes seconds.
    tests/test_predict.py checks it agrees with the checkpoint, tests/test_security.py that it holds no pickle."""
    from click.testing import CliRunner

    from petpipe.cli import main

    for module in ("onnxruntime", "onnxscript"):  # petpipe's export dependencies
        pytest.importorskip(module, reason=f"export needs {module} (pip install onnx onnxscript onnxruntime)")
    out = tmp_path_factory.mktemp("export") / "bundle"
    result = CliRunner().invoke(main, ["export", "--model", str(trained.model), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"-> {out}" in result.stdout
    return out


@pytest.fixture(scope="session")
def served(tmp_path_factory, sample_images) -> Iterator[Served]:
    """The session pipeline's params and photos in a fresh project of its own, `dvc repro` against a real
    `mlflow server` kept up for the session: tests/test_tracking.py reads the runs back. Independent of
    pipeline_project (its own caches), so that `make test`'s workers build the two side by side."""
    from mlflow.tracking import MlflowClient

    from petpipe.track import identity, mlflow_runs

    folder = tmp_path_factory.mktemp("served")
    with mlflow_server(folder / "server") as server:
        project = make_project(folder / "project", {**PIPELINE_THREE_WAY, "data.source": str(sample_images)})
        environment = as_a_user(MLFLOW_TRACKING_URI=server.url, PETPIPE_CACHE_DIR=str(folder / "cache"))
        result = subprocess.run(
            ["dvc", "repro"], cwd=project, env=environment, capture_output=True, text=True, timeout=1200
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        client = MlflowClient(tracking_uri=server.url)
        experiment = client.get_experiment_by_name("petpipe")
        runs = client.search_runs([experiment.experiment_id])
        parents = [run for run in runs if mlflow_runs.PARENT_TAG not in run.data.tags]
        assert len(parents) == 1, [run.info.run_name for run in parents]
        children = {run.data.tags[identity.STAGE_TAG]: run for run in runs if run not in parents}
        yield Served(project, folder / "cache", server, output, client, parents[0], children)


@pytest.fixture(scope="session")
def server_killed(served, tmp_path_factory, sample_images) -> ServerKilled:
    """`served`'s pipeline again in a fresh project, with served's caches (so the same timed levers), tracked to
    a server of its own that is killed once index-labels is logged. test_tracking checks that each later stage
    warns once and finishes, test_reproducibility that every output is byte for byte served's."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("server-killed")
    project = make_project(folder / "project", {**PIPELINE_THREE_WAY, "data.source": str(sample_images)})
    log_path = folder / "repro.log"
    with mlflow_server(folder / "server") as server:
        environment = as_a_user(
            MLFLOW_TRACKING_URI=server.url, PETPIPE_CACHE_DIR=str(served.cache), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"
        )
        with open(log_path, "w") as log_file:
            repro = subprocess.Popen(
                ["dvc", "repro"], cwd=project, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=environment
            )
        try:
            wait_until_stage_ended(MlflowClient(tracking_uri=server.url), "index-labels", repro, log_path, timeout=600)
            server.kill()
            returncode = repro.wait(timeout=1200)
        finally:
            if repro.poll() is None:
                repro.kill()
    return ServerKilled(project, server.url, returncode, log_path.read_text())


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, sample_images) -> ReproducedProject:
    """The real `dvc repro` of every stage on the sample, once per session, as a person runs it, on a
    three-way split (split.test_pct 0.2): MLflow tracking to the embedded store and the caches at the project
    root. tests/test_pipeline.py reads its
    outputs; tests that change things (test_browser, test_reproducibility, test_team) work on copies of it
    (helpers.copy_project), where `dvc repro` reruns only what they changed."""
    folder = make_project(
        tmp_path_factory.mktemp("pipeline") / "project", {**PIPELINE_THREE_WAY, "data.source": str(sample_images)}
    )
    result = run_as_a_user(["dvc", "repro"], folder)
    return ReproducedProject(folder, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def experimented(pipeline_project, tmp_path_factory) -> Experimented:
    """A team's evening on the sample: a copy of the session's `dvc repro` (tracked to its embedded store, caches at
    its root) committed as the baseline, `dvc repro` again (nothing to do), then helpers.QUEUED put in DVC's queue
    and run by one worker. test_team compares and shares them; test_reproducibility checks they reused the caches."""
    project = copy_project(pipeline_project.folder, tmp_path_factory.mktemp("experimented") / "project")
    run_as_a_user(["git", "add", "-A"], project)
    run_as_a_user(["git", "commit", "-q", "-m", "baseline results"], project)
    second = run_as_a_user(["dvc", "repro"], project)
    cache = sorted(path.name for path in (project / ".petpipe/cache").iterdir())
    for name, (section, key, value) in QUEUED.items():
        run_as_a_user(["dvc", "exp", "run", "--queue", "-S", f"{section}.{key}={value}", "-n", name], project)
    run_as_a_user(["dvc", "queue", "start", "-j", "1"], project)
    wait_for_the_queue(project)
    logs = {name: run_as_a_user(["dvc", "queue", "logs", name], project).stdout for name in QUEUED}
    return Experimented(project, second.stdout + second.stderr, cache, logs)
