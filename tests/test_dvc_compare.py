"""Comparing experiments in DVC as a person does: `dvc exp show` (scalar metrics only, one column each, the
changed param, lr-find's suggestions and chosen lr) and `dvc plots diff` (both revisions, every figure as an
image, the lr-find curve on a logarithmic x axis through .dvc/plots/lr_find_log_x.json).

An experiment on a copy of the session's reproduced pipeline that changes only evaluate.top_losses (9, the
default, to 4), so only evaluate reruns (seconds, no training), compared with the baseline commit."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from helpers import copy_project, run_as_a_user

FIRST, SECOND = "HEAD", "four-top-losses"  # the baseline commit, the experiment
FIGURES = [
    "stages/index-labels/class_counts.png",
    "stages/train-head/training.png",
    "stages/train-head/show_batch.png",
    "stages/lr-find/lr_find.png",
    "stages/finetune/training.png",
    "stages/evaluate/confusion.png",
    "stages/evaluate/confusion_normalized.png",
    "stages/evaluate/top_losses.png",
    "stages/evaluate/test_confusion.png",
    "stages/evaluate/test_top_losses.png",
]  # the test split's figures are plots even where it is empty
LR_FIND_METRICS = [
    "suggested_lr_minimum",
    "suggested_lr_steep",
    "suggested_lr_valley",
    "suggested_lr_slide",
    "suggested_lr_edge",
    "chosen_lr",
    "trusted",
    "iterations",
    "lr_reached",
]


class Compared(NamedTuple):
    project: Path
    runs: str  # what `dvc exp run` printed


@pytest.fixture(scope="module")
def compared(pipeline_project, tmp_path_factory) -> Compared:
    project = copy_project(pipeline_project.folder, tmp_path_factory.mktemp("compare") / "project")
    run_as_a_user(["git", "add", "-A"], project)
    run_as_a_user(["git", "commit", "-q", "-m", "baseline results"], project)
    result = run_as_a_user(["dvc", "exp", "run", "-S", "evaluate.top_losses=4", "-n", SECOND], project)
    return Compared(project, result.stdout + result.stderr)


def flat(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """params.yaml's leaves as dvc exp show names them: section.key.subkey."""
    return [
        name
        for key, value in tree.items()
        for name in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def exp_show(project: Path) -> list[dict[str, str]]:
    output = run_as_a_user(["dvc", "exp", "show", "--csv"], project).stdout
    return list(csv.DictReader(io.StringIO(output)))


def test_only_evaluate_reruns_for_an_evaluate_param(compared):
    assert "Running stage 'evaluate'" in compared.runs
    for stage in ("fetch", "index-labels", "train-head", "audit", "lr-find", "finetune", "export"):
        assert f"Running stage '{stage}'" not in compared.runs, stage


def test_exp_show_has_one_column_per_scalar_and_the_changed_param(compared):
    rows = exp_show(compared.project)
    columns = list(rows[0])
    assert not [column for column in columns if "per_class" in column or "Abyssinian" in column]
    # The rest: a column per param (params.yaml's leaves) and per dependency (a path) after the metrics.
    params = set(flat(yaml.safe_load((compared.project / "params.yaml").read_text())))
    metric_columns = [
        column
        for column in columns[5:]  # after Experiment, rev, typ, Created, parent
        if column not in params and not ("/" in column and ":" not in column)
    ]
    assert 20 <= len(metric_columns) < 45, metric_columns  # 37 breeds x 4 numbers would be 148 more
    for name in LR_FIND_METRICS:
        assert any(column.split(":")[-1] == name for column in columns), (name, columns)
    by_name = {row["Experiment"] or row["rev"]: row for row in rows}  # the baseline is its branch, main
    assert {"main", SECOND} <= set(by_name)
    (top_losses,) = [column for column in columns if column.endswith("evaluate.top_losses")]
    assert (by_name["main"][top_losses], by_name[SECOND][top_losses]) == ("9", "4")
    (chosen,) = [column for column in columns if column.split(":")[-1] == "chosen_lr"]
    lr_find_result = json.loads((compared.project / "stages/lr-find/lr_find.json").read_text())
    assert float(by_name[SECOND][chosen]) == pytest.approx(lr_find_result["chosen"]["lr"])
    (trusted,) = [column for column in columns if column.split(":")[-1] == "trusted"]
    assert by_name[SECOND][trusted] == str(int(lr_find_result["trusted"]))


def test_only_changed_shows_the_param_that_differs(compared):
    output = run_as_a_user(["dvc", "exp", "show", "--csv", "--only-changed"], compared.project).stdout
    columns = next(csv.reader(io.StringIO(output)))
    assert any(column.endswith("evaluate.top_losses") for column in columns)
    assert not any(column.endswith("finetune.lr") or column.endswith("train.seed") for column in columns)


def test_plots_diff_shows_both_experiments_every_figure_and_the_log_x_curve(compared, tmp_path):
    project = compared.project
    plots: dict[str, Any] = json.loads(
        run_as_a_user(["dvc", "plots", "diff", FIRST, SECOND, "--json"], project).stdout
    )["data"]
    for figure in FIGURES:
        images = plots[figure]
        assert {image["type"] for image in images} == {"image"}, figure
        assert {image["revisions"][0] for image in images} == {FIRST, SECOND}, figure
        assert all(Path(image["url"]).is_file() for image in images), figure
    for curve in ("lr-find curve", "stages/lr-find/lr_find.csv"):
        (rendered,) = plots[curve]
        assert rendered["content"]["encoding"]["x"]["scale"] == {"type": "log"}, curve
        assert {row["rev"] for row in rendered["content"]["data"]["values"]} == {FIRST, SECOND}, curve
    (per_class,) = plots["stages/evaluate/per_class.csv"]
    assert {row["rev"] for row in per_class["content"]["data"]["values"]} == {FIRST, SECOND}
    assert len(per_class["content"]["data"]["values"]) == 2 * 37

    html = tmp_path / "plots"
    run_as_a_user(["dvc", "plots", "diff", FIRST, SECOND, "-o", str(html)], project)
    page = (html / "index.html").read_text()
    assert '"type": "log"' in page and "lr_find.png" in page and "top_losses.png" in page
    assert len(list((html / "static").glob("*.png"))) == 2 * len(FIGURES)
