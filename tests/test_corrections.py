"""labels.corrections: the cleaner's relabel/exclude decisions, read, checked and applied by index-labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import PROJECT_ROOT, SMALL, copy_subset, outputs_in, params_with, read_outputs, write_params
from petpipe.cli import main
from petpipe.data import image_index
from petpipe.errors import PetpipeError
from petpipe.stages.index_labels import Inputs, run

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

LABELS = {"a_1.jpg": "a", "a_2.jpg": "a", "b_1.jpg": "b", "b_2.jpg": "b"}
FOLDER = [*LABELS, "unusable.jpg", "notes.txt"]


def corrections_file(folder: Path, rows: str) -> Path:
    path = folder / "corrections.csv"
    path.write_text("path,action,label\n" + rows, encoding="utf-8")
    return path


def test_the_committed_corrections_file_is_a_header_row_and_the_default_param():
    assert (PROJECT_ROOT / "labels" / "corrections.csv").read_text() == "path,action,label\n"
    assert params_with().labels.corrections == "labels/corrections.csv"
    assert image_index.load_corrections(PROJECT_ROOT / "labels" / "corrections.csv") == {}


def test_corrections_relabel_exclude_and_ignore_files_without_a_label(tmp_path):
    path = corrections_file(tmp_path, "a_2.jpg,relabel,b\n./b_1.jpg,Exclude,\nunusable.jpg,exclude,\n")
    corrections = image_index.load_corrections(path)
    assert corrections == {
        "a_2.jpg": image_index.Correction("relabel", "b"),
        "b_1.jpg": image_index.Correction("exclude"),
        "unusable.jpg": image_index.Correction("exclude"),
    }
    labels, done = image_index.apply_corrections(
        LABELS, corrections, folder_files=FOLDER, source="labels.corrections x"
    )
    assert labels == {"a_1.jpg": "a", "a_2.jpg": "b", "b_2.jpg": "b"}
    assert done == {"relabelled": 1, "excluded": 1, "ignored": ["unusable.jpg"]}
    # Written back sorted by path, as petpipe serve writes it: the same corrections.
    table = image_index.corrections_table(corrections)
    assert table["path"].tolist() == ["a_2.jpg", "b_1.jpg", "unusable.jpg"]
    table.to_csv(tmp_path / "again.csv", index=False)
    assert image_index.load_corrections(tmp_path / "again.csv") == corrections


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a_1.jpg,rename,b\n", r"action must be relabel or exclude, got a_1.jpg='rename'"),
        ("a_1.jpg,relabel,\n", r"relabel without a new label for a_1.jpg"),
        ("a_1.jpg,exclude,\na_1.jpg,relabel,b\n", r"listed more than once: a_1.jpg"),
        ("../elsewhere/a_9.jpg,exclude,\n", r"1 path\(s\) not found in the images folder, e.g. ../elsewhere/a_9.jpg"),
        ("a_1.jpg,relabel,c\n", r"relabel to unknown class\(es\) c; use one of the classes the images have \(a, b\)"),
    ],
)
def test_a_wrong_correction_is_refused_with_one_line(tmp_path, rows, message):
    with pytest.raises(PetpipeError, match=message) as raised:
        corrections = image_index.load_corrections(corrections_file(tmp_path, rows))
        image_index.apply_corrections(LABELS, corrections, folder_files=FOLDER, source="labels.corrections x")
    assert "\n" not in str(raised.value)


def test_a_missing_or_headerless_corrections_file_says_what_it_needs(tmp_path):
    with pytest.raises(PetpipeError, match="file not found; fix the path in params.yaml"):
        image_index.load_corrections(tmp_path / "nothing.csv")
    (tmp_path / "bare.csv").write_text("a_1.jpg,exclude,\n")
    with pytest.raises(PetpipeError, match="missing column.*header row path,action,label"):
        image_index.load_corrections(tmp_path / "bare.csv")


def test_index_labels_applies_and_reports_the_corrections(sample_images, tmp_path):
    names = copy_subset(sample_images, tmp_path / "images", breeds=3, per_breed=4)
    relabelled, excluded = names[0], names[5]  # an Abyssinian photo called a Bengal, a Bengal photo dropped
    corrections = corrections_file(tmp_path, f"{relabelled},relabel,Bengal\n{excluded},exclude,\n")
    outputs = outputs_in(tmp_path / "out")
    summary = run(params_with(SMALL), Inputs(images=tmp_path / "images", corrections=corrections), outputs)

    index, classes, report = read_outputs(outputs)
    assert report["corrections"] == {"file": str(corrections), "relabelled": 1, "excluded": 1, "ignored": []}
    assert len(index) == 11 and excluded not in set(index["path"])
    assert index.set_index("path").loc[relabelled, "label"] == "Bengal"
    assert report["per_class"]["Abyssinian"]["train"] + report["per_class"]["Abyssinian"]["valid"] == 3
    assert f"1 relabelled, 1 excluded by {corrections}" in summary

    # Without corrections every photo keeps its file name's label.
    run(params_with(SMALL), Inputs(images=tmp_path / "images"), outputs_in(tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert plain["images"] == 12 and plain["corrections"]["relabelled"] == 0 and plain["corrections"]["file"] is None


def test_the_cli_refuses_a_correction_of_a_file_not_in_the_images_folder(sample_images, tmp_path):
    copy_subset(sample_images, tmp_path / "images", breeds=2, per_breed=2)
    corrections = corrections_file(tmp_path, "beagle_1.jpg,exclude,\n")
    write_params(tmp_path / "params.yaml", SMALL)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "index-labels",
            "--params",
            str(tmp_path / "params.yaml"),
            "--images",
            str(tmp_path / "images"),
            "--corrections",
            str(corrections),
            "--index",
            str(out / "index.csv"),
            "--classes",
            str(out / "classes.json"),
            "--report",
            str(out / "report.json"),
            "--class-counts",
            str(out / "c.png"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: labels.corrections {corrections}: 1 path(s) not found in the images "
        "folder, e.g. beagle_1.jpg; its paths are relative to the images folder"
    )
    assert not out.exists()
