"""The index-labels stage on real sample photos: labels, split, bad files, reports and the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import PNG_MAGIC, SMALL, copy_subset, outputs_in, params_with, read_outputs, sample_by_breed, write_params
from petpipe.cli import main
from petpipe.data import image_index
from petpipe.errors import PetpipeError
from petpipe.stages.index_labels import Inputs, run


def test_full_sample_is_labelled_split_and_reported(sample_images, tmp_path):
    outputs = outputs_in(tmp_path)
    summary = run(params_with(SMALL), Inputs(images=sample_images), outputs)

    index, classes, report = read_outputs(outputs)
    assert len(classes) == 37
    assert classes[:2] == ["Abyssinian", "Bengal"] and "american_bulldog" in classes
    assert classes[-1] == "yorkshire_terrier"
    assert classes == sorted(sample_by_breed(sample_images))
    assert len(index) == report["images"] == 370
    assert list(index.columns) == ["path", "label", "split", "width", "height", "hash"]
    assert index["path"].tolist() == sorted(index["path"])
    assert index["hash"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert (index["width"] > 0).all() and (index["height"] > 0).all()
    assert 50 <= report["valid"] <= 100 and report["train"] + report["valid"] == 370
    assert all(counts["train"] > 0 for counts in report["per_class"].values())
    assert sum(counts["valid"] for counts in report["per_class"].values()) == report["valid"]
    assert report["skipped"] == [] and report["unmatched"] == [] and report["leaks"] == []
    assert "370 images of 37 classes" in summary
    assert outputs.class_counts.read_bytes()[:8] == PNG_MAGIC


def test_split_of_existing_files_survives_added_files(sample_images, tmp_path):
    """The stratified split's stability on real photos: a new photo per class moves at most one other photo of
    its class (tests/test_data.py checks the rule on any names)."""
    folder = tmp_path / "images"
    copy_subset(sample_images, folder, breeds=5, per_breed=6)
    params = params_with({**SMALL, "split.valid_pct": 0.3})
    run(params, Inputs(images=folder), outputs_in(tmp_path / "before"))
    before = image_index.load_index(tmp_path / "before" / "index.csv")

    for photo in sorted(folder.iterdir())[::6]:  # one new name per breed, the bytes of its first photo
        shutil.copy(photo, folder / f"{photo.stem.rsplit('_', 1)[0]}_9000.jpg")
    run(params, Inputs(images=folder), outputs_in(tmp_path / "after"))
    after = image_index.load_index(tmp_path / "after" / "index.csv")
    report = json.loads((tmp_path / "after" / "report.json").read_text())

    assert len(before) == 30 and len(after) == 35
    moved = before.set_index("path")["split"] != after.set_index("path").loc[before["path"], "split"]
    assert before.assign(moved=moved.to_numpy()).groupby("label")["moved"].sum().max() <= 1
    assert (after.groupby("label")["split"].apply(lambda splits: (splits == "valid").sum()) == 2).all()
    # A copy that fell on the other side of the split from its original is a leak, an identical pair.
    hashes = after.set_index("path")["hash"]
    for leak in report["leaks"]:
        assert hashes[leak["train"]] == hashes[leak["valid"]] == leak["hash"]
    crossing = sum(set(group["split"]) == {"train", "valid"} for _, group in after.groupby("hash"))
    assert len(report["leaks"]) == crossing  # each photo has at most one copy: one pair per hash


def test_bad_and_unmatched_files_are_reported_and_the_rest_indexed(sample_images, tmp_path):
    folder = tmp_path / "images"
    names = copy_subset(sample_images, folder, breeds=3, per_breed=5)
    photo = (folder / names[0]).read_bytes()
    (folder / "Abyssinian_9001.jpg").write_bytes(photo[: len(photo) // 2])
    (folder / "Abyssinian_9002.jpg").write_bytes(b"")
    (folder / "Abyssinian_9003.jpg").write_text("this is not a photo")
    (folder / "notes.txt").write_text("readme")
    (folder / "IMG0001.jpg").write_bytes(photo)
    (folder / ".hidden_1.jpg").write_bytes(b"")

    outputs = outputs_in(tmp_path / "out")
    summary = run(params_with(SMALL), Inputs(images=folder), outputs)
    index, classes, report = read_outputs(outputs)

    assert sorted(index["path"]) == sorted(names)
    assert classes == ["Abyssinian", "Bengal", "Birman"]
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons["Abyssinian_9002.jpg"] == "zero-byte file"
    assert reasons["Abyssinian_9003.jpg"] == "not an image (cannot identify image file)"
    assert reasons["Abyssinian_9001.jpg"].startswith("truncated or corrupt: ")
    assert len(reasons) == 3
    assert report["unmatched"] == ["IMG0001.jpg", "notes.txt"]
    assert "3 skipped, 2 unmatched" in summary


def test_folder_method_labels_by_parent_folder(sample_images, tmp_path):
    folder = tmp_path / "images"
    breeds = sample_by_breed(sample_images)
    for label, breed in [("cats", "Bengal"), ("dogs", "pug")]:
        (folder / "set" / label).mkdir(parents=True)
        for photo in breeds[breed][:5]:
            shutil.copy(photo, folder / "set" / label / photo.name)
    shutil.copy(breeds["pug"][9], folder / "loose.jpg")

    outputs = outputs_in(tmp_path / "out")
    run(params_with({**SMALL, "labels.method": "folder"}), Inputs(images=folder), outputs)
    index, classes, report = read_outputs(outputs)

    assert classes == ["cats", "dogs"]
    assert len(index) == 10 and index["path"].str.startswith("set/").all()
    assert set(index.loc[index["path"].str.startswith("set/cats/"), "label"]) == {"cats"}
    assert report["unmatched"] == ["loose.jpg"]


def test_csv_method_labels_from_a_file_and_refuses_bad_ones(sample_images, tmp_path):
    folder = tmp_path / "images"
    names = copy_subset(sample_images, folder, breeds=2, per_breed=5)
    labels_csv = tmp_path / "labels.csv"
    rows = [f"{name},{'cat' if name.startswith('Abyssinian') else 'other cat'}" for name in names[:-1]]
    labels_csv.write_text("path,label\n" + "\n".join(rows) + "\n")

    outputs = outputs_in(tmp_path / "out")
    params = params_with({**SMALL, "labels.method": "csv", "labels.csv": str(labels_csv)})
    run(params, Inputs(images=folder), outputs)
    index, classes, report = read_outputs(outputs)
    assert classes == ["cat", "other cat"]
    assert len(index) == 9 and report["unmatched"] == [names[-1]]

    labels_csv.write_text("path,label\n" + "\n".join(rows) + "\nmissing_1.jpg,cat\n")
    with pytest.raises(PetpipeError, match=r"labels.csv .*1 path\(s\) not found in the images folder.*missing_1.jpg"):
        run(params, Inputs(images=folder), outputs_in(tmp_path / "bad"))
    labels_csv.write_text("file,breed\n")
    with pytest.raises(PetpipeError, match="missing column"):
        run(params, Inputs(images=folder), outputs_in(tmp_path / "bad"))
    missing = params_with({**SMALL, "labels.method": "csv", "labels.csv": str(tmp_path / "nope.csv")})
    with pytest.raises(PetpipeError, match="nope.csv: file not found"):
        run(missing, Inputs(images=folder), outputs_in(tmp_path / "bad"))


def test_no_usable_images_is_a_clear_error(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat_1.jpg").write_text("text")
    (folder / "cat_2.jpg").write_bytes(b"")
    (folder / "README.md").write_text("hello")
    expected = f"no usable images in {folder}: 3 files, 2 skipped, 1 unmatched; check labels.pattern / data.source"
    with pytest.raises(PetpipeError, match=re.escape(expected)):
        run(params_with(SMALL), Inputs(images=folder), outputs_in(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def write_split_file(path: Path, splits: dict[str, str]) -> Path:
    path.write_text("path,split\n" + "".join(f"{name},{split}\n" for name, split in splits.items()))
    return path


def test_class_without_training_images_is_refused(sample_images, tmp_path):
    folder = tmp_path / "images"
    names = copy_subset(sample_images, folder, breeds=3, per_breed=3)
    splits = {name: "valid" if name.startswith("Bengal") else "train" for name in names}
    params = params_with({**SMALL, "split.file": str(write_split_file(tmp_path / "split.csv", splits))})
    with pytest.raises(
        PetpipeError,
        match=r"no training image: Bengal; mark at least one image of each as train "
        r"in split.file \(.*split.csv\)",
    ):
        run(params, Inputs(images=folder), outputs_in(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_split_with_no_validation_image_is_refused_before_anything_is_written(sample_images, tmp_path):
    # Two photos a class at valid_pct 0.2: a class's share of valid rounds to one from three photos, so valid
    # would be empty and train-head would have nothing to report on.
    folder = tmp_path / "images"
    copy_subset(sample_images, folder, breeds=3, per_breed=2)
    with pytest.raises(
        PetpipeError,
        match=r"the split has no validation image; raise split.valid_pct \(now 0.2: "
        r"a class needs at least 3 images to give one, the largest has 2\)",
    ):
        run(params_with(SMALL), Inputs(images=folder), outputs_in(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # At valid_pct 0.3 each class of two gives one photo to valid and keeps one for training.
    summary = run(params_with({**SMALL, "split.valid_pct": 0.3}), Inputs(images=folder), outputs_in(tmp_path / "ok"))
    assert "(3 train, 3 valid, 0 test;" in summary


def test_split_file_fixes_the_split_and_leaks_and_empty_valid_are_warnings(sample_images, tmp_path):
    folder = tmp_path / "images"
    names = copy_subset(sample_images, folder, breeds=2, per_breed=4)
    shutil.copy(folder / names[0], folder / "Abyssinian_9999.jpg")  # same bytes, other split
    splits = {name: "train" for name in names} | {names[1]: "valid", "Abyssinian_9999.jpg": "valid", names[5]: "test"}
    split_file = write_split_file(tmp_path / "split.csv", splits)

    outputs = outputs_in(tmp_path / "out")
    summary = run(params_with({**SMALL, "split.file": str(split_file)}), Inputs(images=folder), outputs)
    index, _, report = read_outputs(outputs)

    assert dict(zip(index["path"], index["split"])) == splits
    assert report["per_class"] == {
        "Abyssinian": {"train": 3, "valid": 2, "test": 0},
        "Bengal": {"train": 3, "valid": 0, "test": 1},
    }
    assert report["split"]["method"] == "file" and f"split: file (split.file {split_file})" in summary
    assert [(leak["train"], leak["valid"]) for leak in report["leaks"]] == [(names[0], "Abyssinian_9999.jpg")]
    assert any("no validation image: Bengal" in warning for warning in report["warnings"])

    write_split_file(split_file, {name: "train" for name in names})
    with pytest.raises(PetpipeError, match="1 image.*no split.*Abyssinian_9999.jpg"):
        run(params_with({**SMALL, "split.file": str(split_file)}), Inputs(images=folder), outputs_in(tmp_path / "x"))


@pytest.fixture()
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    write_params(path, {"model.img_size": 32})
    return path


def cli_arguments(params_file: Path, images: Path, out: Path) -> list[str]:
    return [
        "index-labels",
        "--params",
        str(params_file),
        "--images",
        str(images),
        "--index",
        str(out / "index.csv"),
        "--classes",
        str(out / "classes.json"),
        "--report",
        str(out / "report.json"),
        "--class-counts",
        str(out / "class_counts.png"),
    ]


def test_cli_writes_all_four_outputs(sample_images, params_file, tmp_path):
    folder = tmp_path / "images"
    copy_subset(sample_images, folder, breeds=4, per_breed=5)
    out = tmp_path / "stages" / "index-labels"

    result = CliRunner().invoke(main, cli_arguments(params_file, folder, out))

    assert result.exit_code == 0, result.output
    assert "indexed 20 images of 4 classes" in result.output
    assert sorted(path.name for path in out.iterdir()) == [
        "class_counts.png",
        "classes.json",
        "index.csv",
        "report.json",
    ]
    assert (out / "class_counts.png").read_bytes()[:8] == PNG_MAGIC
    assert image_index.load_classes(out / "classes.json") == ["Abyssinian", "Bengal", "Birman", "Bombay"]


def test_cli_reports_user_errors_without_a_traceback(params_file, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("no photos here")
    result = CliRunner().invoke(main, cli_arguments(params_file, folder, tmp_path / "out"))
    assert result.exit_code == 1
    assert "Error: no usable images in" in result.output and "Traceback" not in result.output
