"""End to end: the real `dvc repro` of every stage on the sample photos, read back through DVC."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from helpers import STAGES, make_project, run_command


@pytest.fixture(scope="module")
def project(pipeline_project):
    return pipeline_project.folder, pipeline_project.stdout, pipeline_project.stderr


def test_dvc_repro_runs_every_stage(project):
    folder, log, _ = project
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    assert len(list((folder / "stages/fetch/images").glob("*.jpg"))) == 370


def test_index_labels_outputs(project):
    folder, _, _ = project
    index = pd.read_csv(folder / "stages/index-labels/index.csv")
    classes = json.loads((folder / "stages/index-labels/classes.json").read_text())["classes"]
    assert len(index) == 370 and len(classes) == 37
    # A three-way split (split.test_pct 0.2), stratified: 2 valid and 2 test photos of each breed's 10.
    per_class = index.groupby("label")["split"].value_counts().unstack()[["train", "valid", "test"]]
    assert (per_class == [6, 2, 2]).all().all()
    report = json.loads((folder / "stages/index-labels/report.json").read_text())
    assert report["images"] == 370 and report["skipped"] == [] and report["unmatched"] == []
    assert (report["train"], report["valid"], report["test"]) == (222, 74, 74) and report["split"]["method"] == "random"
    assert report["imbalance"]["ratio"] == 1.0
    assert (folder / "stages/index-labels/class_counts.png").read_bytes().startswith(b"\x89PNG")
    # show_batch.png is train-head's: drawn through the augmentation it trains with.
    assert not (folder / "stages/index-labels/show_batch.png").exists()
    assert (folder / "stages/train-head/show_batch.png").read_bytes().startswith(b"\x89PNG")


def test_training_stage_outputs(project):
    folder, _, _ = project
    for stage in ("train-head", "finetune"):
        metrics = json.loads((folder / f"stages/{stage}/metrics.json").read_text())
        assert metrics["accuracy"] >= 3 / 37, (stage, metrics)
        assert (folder / f"stages/{stage}/model.pt").stat().st_size > 1_000_000
        assert len(pd.read_csv(folder / f"stages/{stage}/history.csv")) == metrics["epochs"]
    lr_find = json.loads((folder / "stages/lr-find/lr_find.json").read_text())
    assert set(lr_find["suggestions"]) == {"valley", "slide", "minimum", "steep", "edge"}
    sweep = json.loads((folder / "stages/lr-find/metrics.json").read_text())  # the same, as DVC metrics
    assert sweep == {
        **{f"suggested_lr_{name}": lr for name, lr in lr_find["suggestions"].items()},
        "chosen_lr": lr_find["chosen"]["lr"],
        "trusted": int(lr_find["trusted"]),
        "iterations": lr_find["iterations"],
        "lr_reached": lr_find["lr_reached"],
    }


def test_evaluate_outputs(project):
    folder, _, _ = project
    metrics = json.loads((folder / "stages/evaluate/metrics.json").read_text())
    assert metrics["accuracy"] >= 3 / 37 and "per_class" not in metrics  # scalars only: dvc exp show's columns
    assert len(pd.read_csv(folder / "stages/evaluate/per_class.csv")) == 37
    confusion = pd.read_csv(folder / "stages/evaluate/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert (confusion["actual"] == confusion["predicted"]).mean() == pytest.approx(metrics["accuracy"])
    assert "accuracy" in (folder / "stages/evaluate/report.md").read_text().lower()


def test_evaluate_reports_the_test_split_nothing_tuned_on(project):
    """test_ numbers from the 74 test photos alone, beside valid's; training never read them."""
    folder, log, _ = project
    metrics = json.loads((folder / "stages/evaluate/metrics.json").read_text())
    index = pd.read_csv(folder / "stages/index-labels/index.csv")
    test_paths = set(index.loc[index["split"] == "test", "path"])
    assert metrics["images"] == 74 and metrics["test_images"] == 74
    confusion = pd.read_csv(folder / "stages/evaluate/test_confusion.csv")
    assert metrics["test_accuracy"] == pytest.approx((confusion["actual"] == confusion["predicted"]).mean())
    assert 3 / 37 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["test_balanced_accuracy"] <= 1
    assert metrics["test_error_rate"] == pytest.approx(1 - metrics["test_accuracy"])
    assert set(pd.read_csv(folder / "stages/evaluate/test_top_losses.csv")["path"]) <= test_paths
    for picture in ("test_confusion.png", "test_top_losses.png"):
        assert (folder / "stages/evaluate" / picture).read_bytes().startswith(b"\x89PNG")
    assert "| metric | valid | test |" in (folder / "stages/evaluate/report.md").read_text()
    # Training never decoded a test photo: the test split's pixel cache was written by evaluate, after finetune.
    from petpipe.data.pixels import cache_key
    from petpipe.model.preprocessing import presized_side
    from petpipe.params import load_params

    model = load_params(folder / "params.yaml").model
    presize = presized_side(model.img_size, model.presize_ratio)
    test_hashes = list(index.loc[index["split"] == "test", "hash"])
    test_cache = folder / ".petpipe/cache" / f"pixels-{cache_key(test_hashes, presize)}.npy"
    assert test_cache.stat().st_mtime > (folder / "stages/finetune/model.pt").stat().st_mtime
    shown = run_command(["dvc", "metrics", "show", "--json"], folder).stdout
    assert "test_accuracy" in shown and "test_balanced_accuracy" in shown


def test_the_audit_stage_scores_every_indexed_image_from_train_heads_body(project):
    """stages/audit: every image of the index (test included) once, with its label and a quality in [0, 1], most
    suspect first; pairs above the threshold only; counts that match the tables. evaluate no longer audits."""
    folder, _, _ = project
    index = pd.read_csv(folder / "stages/index-labels/index.csv", dtype=str, keep_default_na=False)
    issues = pd.read_csv(folder / "stages/audit/label_issues.csv", dtype={"path": str, "label": str})
    assert sorted(issues["path"]) == sorted(index["path"])
    assert issues.set_index("path").loc[index["path"], "label"].tolist() == index["label"].tolist()
    assert issues["quality"].between(0, 1).all() and issues["quality"].is_monotonic_increasing
    pairs = pd.read_csv(folder / "stages/audit/duplicates.csv")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    assert (pairs["similarity"] >= params["audit"]["duplicate_similarity"]).all()
    counts = json.loads((folder / "stages/audit/metrics.json").read_text())
    assert counts["audit_images"] == len(index) and counts["audit_label_issues"] == int(issues["issue"].sum())
    assert counts["audit_duplicate_pairs"] == len(pairs)
    assert not [name for name in json.loads((folder / "stages/evaluate/metrics.json").read_text()) if "audit" in name]
    assert not (folder / "stages/evaluate/label_issues.csv").exists()


def test_the_export_stage_bundle_predicts_the_checkpoints_classes(project):
    """stages/export/bundle (a DVC output): onnxruntime on it gives finetune's checkpoint's top class on every
    test photo, and its probabilities to 1e-4."""
    import numpy as np

    from petpipe.inference.bundle import BundlePredictor
    from petpipe.inference.predict import decode_pixels, load_predictor, pixel_batch

    folder, _, _ = project
    bundle = BundlePredictor(folder / "stages/export/bundle")
    checkpoint = load_predictor(folder / "stages/finetune/model.pt", device="cpu")
    assert bundle.classes == checkpoint.classes and bundle.presize == checkpoint.presize
    index = pd.read_csv(folder / "stages/index-labels/index.csv", dtype=str, keep_default_na=False)
    photos = [folder / "stages/fetch/images" / path for path in index.loc[index["split"] == "test", "path"]]
    pixels = pixel_batch([decode_pixels(photo, bundle.presize) for photo in photos])  # (74, 3, P, P)
    expected = checkpoint.probabilities(pixels)
    found = bundle.probabilities(pixels)
    assert (found.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(found - expected).max() <= 1e-4
    assert "stages/export/bundle" in (folder / "dvc.lock").read_text()  # DVC knows it: `dvc push` carries it


def test_progress_a_person_can_follow(project):
    _, _, progress = project
    assert "lr-find:" in progress and "batch" in progress  # lr-find's bar
    for stage, epochs in (("train-head", 2), ("finetune", 1)):  # fastai's table, a line per epoch
        assert f"{stage}: epoch  train_loss  valid_loss  accuracy    time" in progress
        assert f"{stage}: {epochs}/{epochs} " in progress
    # Each computing stage ends with where its time went: its phases add up to at most its total.
    for stage, phases in (
        ("train-head", ("decode", "levers", "features", "epochs", "validation", "write")),
        ("lr-find", ("decode", "sweep")),
        ("finetune", ("decode", "epochs", "validation")),
        ("evaluate", ("decode", "predict", "plots")),
    ):
        line = next(text for text in progress.splitlines() if text.startswith(f"{stage}: ") and " s = " in text)
        total, parts = line.removeprefix(f"{stage}: ").split(" s = ", 1)
        seconds = dict(part.rsplit(" ", 1) for part in parts.split(" (after")[0].split(", "))
        assert set(phases) <= seconds.keys() and "other" in seconds, line
        assert sum(map(float, seconds.values())) <= float(total) + 0.05 * len(seconds), line


def test_dvc_sees_a_clean_reproducible_pipeline(project):
    folder, _, _ = project
    status = run_command(["dvc", "status"], folder).stdout
    assert "up to date" in status
    again = run_command(["dvc", "repro"], folder).stdout
    assert "Running stage" not in again
    dag = run_command(["dvc", "dag"], folder).stdout
    for stage in STAGES:
        assert stage in dag
    shown = run_command(["dvc", "metrics", "show", "--json"], folder).stdout
    assert "accuracy" in shown


def test_default_source_without_network_fails_fast_with_the_fix(tmp_path):
    folder = make_project(tmp_path / "offline", {})
    result = subprocess.run(
        [sys.executable, "-m", "petpipe.cli", "fetch", "--out", "stages/fetch/images"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "robots.ox.ac.uk" in result.stderr and "data.source" in result.stderr
    assert "Traceback" not in result.stderr
