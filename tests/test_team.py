"""DVC as a team uses it, on the sample: repro caches, an experiment, comparisons, a remote round trip,
and the embedded MLflow store that mirrors it (one pipeline run per repro or experiment)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import RERAN, STAGES, copy_project, locked_outputs, run_as_a_user

EXPERIMENT = "lr-low"  # helpers.QUEUED: finetune.lr 0.0003, queued by conftest's `experimented`


def dvc(arguments: list[str], cwd: Path) -> str:
    """What a person sees: stdout and stderr (tracking on, to the embedded store)."""
    result = run_as_a_user(arguments, cwd)
    return result.stdout + result.stderr


def dvc_json(arguments: list[str], cwd: Path) -> Any:
    return json.loads(run_as_a_user(arguments, cwd).stdout)


def ran(log: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in log]


@dataclass
class Team:
    project: Path
    baseline: str  # the first `dvc repro`'s output (the session's pipeline_project)
    second: str  # a second `dvc repro` with nothing changed
    experiment: str  # the queued `dvc exp run -S finetune.lr=0.0003`'s log


@pytest.fixture(scope="module")
def team(pipeline_project, experimented) -> Team:
    """The sample pipeline (a copy of the session's `dvc repro`, tracked in its embedded store) committed as a
    baseline, then experiments run by DVC's queue (conftest's `experimented`): one changes a finetune param,
    one an evaluate param."""
    return Team(
        experimented.project,
        pipeline_project.stdout + pipeline_project.stderr,
        experimented.second,
        experimented.logs[EXPERIMENT],
    )


def test_repro_runs_each_stage_once_and_then_nothing(team):
    assert ran(team.baseline) == STAGES
    assert ran(team.second) == [] and "up to date" in team.second


def test_a_finetune_param_reruns_only_finetune_export_and_evaluate_as_an_experiment(team):
    assert ran(team.experiment) == ["finetune", "export", "evaluate"]
    shown = dvc_json(["dvc", "exp", "show", "--json"], team.project)
    baseline = next(row for row in shown if row.get("name") == "main")
    (experiment,) = [rev for exp in baseline["experiments"] for rev in exp["revs"] if rev["name"] == EXPERIMENT]
    params = experiment["data"]["params"]["params.yaml"]["data"]
    assert (
        params["finetune"]["lr"] == 0.0003
        and baseline["data"]["params"]["params.yaml"]["data"]["finetune"]["lr"] == "auto"
    )  # the default: lr-find's chosen suggestion
    metrics = experiment["data"]["metrics"]
    assert {"stages/train-head/metrics.json", "stages/finetune/metrics.json", "stages/evaluate/metrics.json"} <= set(
        metrics
    )
    assert 0 <= metrics["stages/evaluate/metrics.json"]["data"]["accuracy"] <= 1


def test_metrics_diff_and_plots_diff_compare_two_experiments(team):
    diff = dvc_json(["dvc", "metrics", "diff", "HEAD", EXPERIMENT, "--all", "--json"], team.project)
    for stage in ("train-head", "finetune", "evaluate"):
        assert {"accuracy", "error_rate"} <= set(diff[f"stages/{stage}/metrics.json"]), stage
    assert all(
        change["old"] == change["new"]  # train-head did not rerun: nothing changed
        for change in diff["stages/train-head/metrics.json"].values()
    )
    assert any(change["old"] != change["new"] for change in diff["stages/finetune/metrics.json"].values())
    plots = dvc_json(["dvc", "plots", "diff", "HEAD", EXPERIMENT, "--json"], team.project)["data"]
    for plot in (
        "losses per epoch",
        "lr-find curve",
        "confusion matrix, rows normalised",
        "stages/train-head/history.csv",
        "stages/finetune/history.csv",
        "stages/evaluate/confusion.csv",
    ):
        (rendered,) = plots[plot]
        assert {row["rev"] for row in rendered["content"]["data"]["values"]} == {"HEAD", EXPERIMENT}, plot


def test_push_then_pull_into_a_clean_clone_restores_every_output(team, tmp_path):
    project = copy_project(team.project, tmp_path / "project")  # a commit of its own: the session's keeps its HEAD
    remote = tmp_path / "remote"
    dvc(["dvc", "remote", "add", "-d", "storage", str(remote)], project)
    dvc(["git", "commit", "-q", "-m", "a DVC remote", ".dvc/config"], project)
    dvc(["dvc", "push", "--all-commits"], project)  # HEAD's outputs and the experiments'

    clone = tmp_path / "clone"
    dvc(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    outputs = list(locked_outputs(clone))
    assert not (clone / ".dvc/cache").exists() and not any((clone / path).exists() for path in outputs)
    dvc(["dvc", "pull"], clone)
    assert "up to date" in dvc(["dvc", "status"], clone)
    assert len(outputs) >= 20 and all((clone / path).exists() for path in outputs)
    assert len(list((clone / "stages/fetch/images").glob("*.jpg"))) == 370
    assert "Running stage" not in dvc(["dvc", "repro"], clone)  # everything restored, nothing to recompute


def test_embedded_mlflow_store_has_a_pipeline_run_per_repro_and_experiment(team):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{team.project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("petpipe")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    stages = [
        [
            run.data.tags["petpipe.stage"]
            for run in runs
            if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ]
        for parent in parents
    ]
    # The second repro ran nothing and logged nothing; the queue ran the experiments one after the other.
    assert stages == [STAGES, *RERAN.values()]
    assert "dvc.exp_name" not in parents[0].data.tags
    assert [parent.data.tags["dvc.exp_name"] for parent in parents[1:]] == list(RERAN)
    versions = client.search_model_versions("name='petpipe-classifier'")
    assert sorted(int(version.version) for version in versions) == [1, 2]
