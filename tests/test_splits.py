"""Splits as the user made them: train/ val/ test/ folders kept as they are, a test split that only evaluate
reads, and the layouts and mistakes around them (the random split's rule is tested in tests/test_data.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from helpers import (
    HEAD_TRAINING,
    SMALL,
    audit_outputs,
    outputs_in,
    params_with,
    read_outputs,
    sample_by_breed,
    stage_environment,
)
from petpipe.errors import PetpipeError
from petpipe.stages import audit, evaluate, index_labels, train_head

# Two cats and two dogs that look unlike each other: four classes a small head tells apart on 24 photos.
BREEDS = ("Abyssinian", "Bombay", "pug", "samoyed")


def folder_layout(sample_images: Path, root: Path, counts: dict[str, int], *, class_folders: bool = True) -> Path:
    """The first photos of each of BREEDS as links in split folders: counts {"Train": 6, "val": 2, ...} per breed,
    in <split>/<breed>/ (or loose in <split>/ without class_folders)."""
    by_breed = sample_by_breed(sample_images)
    for breed in BREEDS:
        photos = iter(sorted(by_breed[breed]))
        for split, count in counts.items():
            folder = root / split / breed if class_folders else root / split
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                photo = next(photos)
                (folder / photo.name).symlink_to(photo)
    return root


def index(images: Path, out: Path, **overrides: object) -> tuple[str, pd.DataFrame, dict]:
    outputs = outputs_in(out)
    summary = index_labels.run(
        params_with({**SMALL, "labels.method": "folder", **overrides}), index_labels.Inputs(images=images), outputs
    )
    table, _, report = read_outputs(outputs)
    return summary, table, report


def test_train_val_test_folders_are_the_split_training_never_reads_test_and_evaluate_reports_it(
    sample_images, tmp_path
):
    """Done when of issue 26: every photo stays in its folder's split, index-labels says so; train-head trains
    with the test folder gone (it never decodes a test photo); evaluate's test numbers come from the test photos
    alone; a test photo that is a copy of a training photo is reported as a leak, by index-labels and the audit."""
    images = folder_layout(sample_images, tmp_path / "images", {"Train": 6, "val": 2, "test": 2})
    leaked = next((images / "Train/pug").iterdir())
    shutil.copy(leaked, images / "test/pug/pug_9999.jpg")  # a pug_<n> name: regex labels too
    summary, table, report = index(images, tmp_path / "index", **{"split.test_pct": 0.2})

    expected = {"Train": "train", "val": "valid", "test": "test"}
    assert (table["split"] == table["path"].str.split("/").str[0].map(expected)).all()
    assert (table["label"] == table["path"].str.split("/").str[1]).all() and len(table) == 4 * 10 + 1
    assert (
        "split: folders (auto: the folders Train/, val/, test/; split.test_pct ignored: test/ is the test" in summary
        and "24 train, 8 valid, 9 test" in summary
    )
    assert report["split"]["method"] == "folders"
    assert report["split"]["folders"] == {"train": "Train", "valid": "val", "test": "test"}
    assert {(leak["train"], leak["test"]) for leak in report["leaks"]} == {
        (leaked.relative_to(images).as_posix(), "test/pug/pug_9999.jpg")
    }
    # Regex labels in the same layout: the same classes from the names.
    _, by_name, _ = index(images, tmp_path / "by-name", **{"labels.method": "regex"})
    assert by_name["label"].tolist() == table["label"].tolist()
    assert by_name["split"].tolist() == table["split"].tolist()

    params = params_with(
        {
            **HEAD_TRAINING,
            "evaluate.checkpoint": "train-head",
            "audit.folds": 2,
            "train.memory_format": "contiguous",
            "train.threads": 2,
        }
    )
    hidden = tmp_path / "test-photos-away-while-training"
    (images / "test").rename(hidden)
    head = train_head.Outputs(
        model=tmp_path / "head/model.pt",
        metrics=tmp_path / "head/metrics.json",
        history=tmp_path / "head/history.csv",
        plot=tmp_path / "head/training.png",
    )
    with stage_environment(tmp_path):
        train_head.run(params, train_head.Inputs(images=images, index=tmp_path / "index/index.csv"), head)
    hidden.rename(images / "test")
    trained = json.loads(head.metrics.read_text())
    assert trained["accuracy"] > 0.25, trained  # above chance on valid (four classes)

    folder = tmp_path / "evaluate"
    outputs = evaluate.Outputs(
        metrics=folder / "metrics.json",
        confusion=folder / "confusion.csv",
        confusion_plot=folder / "confusion.png",
        top_losses=folder / "top_losses.png",
        top_losses_table=folder / "top_losses.csv",
        most_confused=folder / "most_confused.csv",
        report=folder / "report.md",
        test_confusion=folder / "test_confusion.csv",
        test_confusion_plot=folder / "test_confusion.png",
        test_top_losses=folder / "test_top_losses.png",
        test_top_losses_table=folder / "test_top_losses.csv",
    )
    inputs = evaluate.Inputs(
        images=images, index=tmp_path / "index/index.csv", finetune_model=head.model, head_model=head.model
    )
    with stage_environment(tmp_path):
        evaluated = evaluate.run(params, inputs, outputs)
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["images"] == 8 and metrics["test_images"] == 9
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"])  # valid: the same photos train-head scored
    confusion = pd.read_csv(outputs.test_confusion)
    assert len(confusion) == 9
    assert metrics["test_accuracy"] == pytest.approx((confusion["actual"] == confusion["predicted"]).mean())
    assert pd.read_csv(outputs.test_top_losses_table)["path"].str.startswith("test/").all()
    recalls = confusion.assign(hit=confusion["actual"] == confusion["predicted"]).groupby("actual")["hit"].mean()
    assert metrics["test_balanced_accuracy"] == pytest.approx(recalls.mean())
    assert f"test (9 images, never tuned on): accuracy {metrics['test_accuracy']:.4f}" in evaluated
    report_md = outputs.report.read_text()
    assert "| metric | valid | test |" in report_md and "test_confusion.png" in report_md
    # The audit stage covers the test photos, and names the copy as a test leak.
    found = audit_outputs(tmp_path / "audit")
    with stage_environment(tmp_path):
        audit.run(params, audit.Inputs(images=images, index=tmp_path / "index/index.csv", checkpoint=head.model), found)
    issues = pd.read_csv(found.label_issues)
    assert (issues["split"] == "test").sum() == 9
    duplicates = pd.read_csv(found.duplicates)
    assert json.loads(found.metrics.read_text())["audit_test_leaks"] >= 1
    assert "test" in set(duplicates["split_a"]) | set(duplicates["split_b"])


def test_half_made_layouts_are_decided_and_said(sample_images, tmp_path):
    # train/ and test/ without a valid folder: valid drawn from train/ by valid_pct, per class.
    images = folder_layout(sample_images, tmp_path / "no-valid", {"train": 8, "test": 2})
    summary, table, report = index(images, tmp_path / "a")
    assert "valid drawn from train/ by split.valid_pct 0.2 (no valid/ or val/ folder)" in summary
    assert (table[table["path"].str.startswith("test/")]["split"] == "test").all()
    assert report["per_class"]["pug"] == {"train": 6, "valid": 2, "test": 2}  # 0.2 x 8 rounds to 2
    # A photo outside the split folders is not indexed, and said.
    (images / "stray.jpg").symlink_to(next((images / "train/pug").iterdir()).resolve())
    summary, table, report = index(images, tmp_path / "b")
    assert report["outside_splits"] == ["stray.jpg"] and "1 outside the split folders" in summary
    # split.method random ignores the folders: the class is then the split folder's child, split at random.
    _, shuffled, report = index(images, tmp_path / "c", **{"split.method": "random"})
    assert report["split"]["method"] == "random" and set(shuffled["label"]) == set(BREEDS)
    assert report["unmatched"] == ["stray.jpg"]  # folder labels: a photo in no folder has no class


def test_layout_mistakes_are_refused_in_one_line(sample_images, tmp_path):
    images = folder_layout(sample_images, tmp_path / "flat", {"photos": 3})
    with pytest.raises(PetpipeError, match=r"split.method folders needs train/ and valid/ .*found none"):
        index(images, tmp_path / "out", **{"split.method": "folders"})

    images = folder_layout(sample_images, tmp_path / "loose-test", {"train": 4, "val": 2})
    folder_layout(sample_images, tmp_path / "loose-test", {"test": 2}, class_folders=False)
    with pytest.raises(PetpipeError, match=r"loose-test/test: 8 images but no class folders; .*test/<class>/"):
        index(images, tmp_path / "out")

    images = folder_layout(sample_images, tmp_path / "unreadable", {"train": 4, "valid": 2})
    for photo in (images / "valid").rglob("*.jpg"):
        photo.unlink()
        photo.write_bytes(b"not a photo")
    with pytest.raises(PetpipeError, match=r"unreadable/valid: none of its 8 images can be read"):
        index(images, tmp_path / "out")

    images = folder_layout(sample_images, tmp_path / "valid-only-class", {"train": 4, "val": 2})
    shutil.rmtree(images / "train/pug")
    with pytest.raises(PetpipeError, match=r"class\(es\) with no training image: pug; add photos of them to train/"):
        index(images, tmp_path / "out")


def test_class_imbalance_is_reported_and_warned_above_ten_times(sample_images, tmp_path):
    images = tmp_path / "imbalanced"
    images.mkdir()
    by_breed = sample_by_breed(sample_images)
    for number, photo in enumerate(sorted(by_breed["Bombay"]) * 2):  # 20 Bombay photos (each twice)...
        (images / f"Bombay_{number}.jpg").symlink_to(photo)
    (images / "pug_1.jpg").symlink_to(sorted(by_breed["pug"])[0])  # ... and one pug
    summary, table, report = index(images, tmp_path / "out", **{"labels.method": "regex"})
    assert report["imbalance"] == {
        "largest": {"class": "Bombay", "images": 20},
        "smallest": {"class": "pug", "images": 1},
        "ratio": 20.0,
    }
    assert "classes of 1 to 20 images (20x)" in summary
    assert any(
        warning.startswith("classes are imbalanced 20x: Bombay has 20 images, pug 1") for warning in report["warnings"]
    )
    # Stratified: Bombay gives valid 4 of its 20, the single pug trains.
    assert table.groupby("label")["split"].apply(lambda splits: (splits == "valid").sum()).to_dict() == {
        "Bombay": 4,
        "pug": 0,
    }
