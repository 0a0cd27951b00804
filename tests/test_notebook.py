"""docs/tutorial.ipynb runs from top to bottom (nbclient, a real Jupyter kernel) on a copy of the session's
reproduced sample project, so its `dvc repro` cells find every stage cached: what it costs is the kernel, the
head's evaluation and the model it loads. Then the registered champion predicts from Python what `petpipe
predict` prints."""

from __future__ import annotations

import json
import os
import subprocess

import nbclient  # the dev extra installs nbclient, nbformat and ipykernel: a missing one fails, never skips
import nbformat
import pytest
import torch

import petpipe
from helpers import PIPELINE_THREE_WAY, PROJECT_ROOT, SAMPLE_IMAGES, as_a_user, copy_project

NOTEBOOK = PROJECT_ROOT / "docs" / "tutorial.ipynb"
CHAMPION = "models:/petpipe-classifier@champion"


def with_parameters(notebook, values: dict[str, object]):
    """papermill's way: a cell assigning `values` right after the cell tagged `parameters`."""
    position = next(index for index, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(position + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


def images_shown(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def outputs_written(project) -> dict[str, int]:
    """When each stage output was last written (ns)."""
    return {str(path): path.stat().st_mtime_ns for path in (project / "stages").rglob("*") if path.is_file()}


@pytest.mark.slow
def test_the_tutorial_notebook_runs_on_the_sample_and_the_champion_predicts_as_the_cli(
    pipeline_project, tmp_path, monkeypatch
):
    project = copy_project(pipeline_project.folder, tmp_path / "project")
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert images_shown(committed) >= 8, "the committed notebook carries the figures of a real run"
    notebook = with_parameters(
        nbformat.read(NOTEBOOK, as_version=4),
        {"PHOTOS": str(SAMPLE_IMAGES), "PROJECT": str(project), "SETTINGS": PIPELINE_THREE_WAY},
    )
    written = outputs_written(project)
    environment = as_a_user()  # as a person runs it: MLflow on to the project's store, caches at its root
    for name in set(os.environ) - set(environment):
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    # Any cell that raises fails the test (nbclient's CellExecutionError names the cell and the traceback).
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    # Nothing was trained again: the notebook's params.yaml is the session pipeline's, every stage cached, so its
    # `dvc repro` cells rewrote no output (they would all run again on params that differ in one value).
    assert outputs_written(project) == written
    status = subprocess.run(
        ["dvc", "status", "--json"], cwd=project, env=environment, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout or "{}") == {}
    assert (project / "head-evaluation" / "top_losses.png").is_file()
    assert images_shown(notebook) >= 8  # show_batch twice, class counts, training twice, lr-find, top losses ...
    text = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "accuracy: head " in text and "Traceback" not in text

    monkeypatch.chdir(project)  # models:/ resolves against the project's mlflow.db, as `petpipe predict` does
    photos = sorted((project / "stages" / "fetch" / "images").glob("*_1*.jpg"))[:6]
    # With the threads `petpipe predict` starts with, one per CPU it may use: an earlier test in this process may
    # have set another number, and a probability's last bits follow the order of the sums.
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        table = petpipe.load_model(CHAMPION, device="cpu").predict(photos)
    finally:
        torch.set_num_threads(threads)
    printed = subprocess.run(
        ["petpipe", "predict", "--model", CHAMPION, "--json", *map(str, photos)],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    expected = json.loads(printed.stdout)
    assert table["label"].tolist() == [item["predictions"][0]["label"] for item in expected]
    assert table["probability"].tolist() == pytest.approx(
        [item["predictions"][0]["probability"] for item in expected], abs=1e-9
    )
