"""The evaluate stage on the tiny model conftest trains once on the real sample (`trained`, `evaluated`): every
number checked independently."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import (
    PNG_MAGIC,
    SAMPLE_IMAGES,
    TrainedSample,
    evaluate_outputs,
    run_evaluate,
    stage_environment,
    valid_rows,
)
from petpipe.cli import main
from petpipe.data import image_index
from petpipe.data.pixels import decode_image
from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.interpret import interpretation
from petpipe.model.checkpoint import load_checkpoint
from petpipe.params import with_overrides
from petpipe.stages import evaluate


def independent_log_probabilities(sample: TrainedSample, relative_paths: list[str]) -> np.ndarray:
    """The checkpoint's log-probabilities, decoding each file itself instead of using the pixel cache."""
    checkpoint = load_checkpoint(sample.model)
    model = checkpoint.model().eval()
    views = Views.of(checkpoint.spec)
    pixels = torch.stack(
        [torch.from_numpy(np.array(decode_image(SAMPLE_IMAGES / path, views.presize))) for path in relative_paths]
    ).permute(0, 3, 1, 2)  # (N, 3, P, P) uint8
    with torch.inference_mode():
        logits = model(views.evaluate(pixels))
    return torch.log_softmax(logits.double(), dim=1).numpy()


# ---------------------------------------------------------------- metrics.json against confusion.csv


def test_metrics_agree_with_confusion_csv_recomputed_by_hand(evaluated, trained):
    _, outputs = evaluated
    metrics = json.loads(outputs.metrics.read_text())
    confusion = pd.read_csv(outputs.confusion, dtype=str, keep_default_na=False)
    classes = list(load_checkpoint(trained.model).spec.classes)

    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion["actual"].tolist() == valid_rows(trained)["label"].tolist()  # one row per image, index order
    pairs = list(zip(confusion["actual"], confusion["predicted"]))
    correct = sum(actual == predicted for actual, predicted in pairs)
    assert metrics["images"] == len(pairs) > 30
    assert metrics["checkpoint"] == "train-head"
    assert metrics["accuracy"] == pytest.approx(correct / len(pairs), abs=1e-12)
    assert metrics["error_rate"] == pytest.approx(1 - correct / len(pairs), abs=1e-12)
    assert 1 / 37 < metrics["accuracy"] < 1  # learned something, and some errors to interpret

    assert all(isinstance(value, (int, float, str)) for value in metrics.values())  # dvc exp show: one column each
    per_class = pd.read_csv(outputs.per_class, keep_default_na=False).set_index("class")
    assert per_class.index.tolist() == classes and per_class.columns.tolist() == [
        "precision",
        "recall",
        "f1",
        "support",
    ]
    f1s = []
    for name in classes:
        true_positive = sum(actual == name and predicted == name for actual, predicted in pairs)
        predicted_as = sum(predicted == name for _, predicted in pairs)
        support = sum(actual == name for actual, _ in pairs)
        precision = true_positive / predicted_as if predicted_as else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert per_class.loc[name].to_dict() == pytest.approx(
            {"precision": precision, "recall": recall, "f1": f1, "support": support}, abs=1e-12
        ), name
        if support or predicted_as:
            f1s.append(f1)
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-12)


def test_loss_and_top5_agree_with_an_independent_forward_pass(evaluated, trained):
    _, outputs = evaluated
    metrics = json.loads(outputs.metrics.read_text())
    rows = valid_rows(trained)
    classes = list(load_checkpoint(trained.model).spec.classes)
    log_probabilities = independent_log_probabilities(trained, rows["path"].tolist())
    targets = np.array([classes.index(label) for label in rows["label"]])
    losses = -log_probabilities[np.arange(len(targets)), targets]
    top5 = np.mean([target in np.argsort(-row)[:5] for row, target in zip(log_probabilities, targets)])
    assert metrics["loss"] == pytest.approx(losses.mean(), abs=1e-4)
    assert metrics["top5_accuracy"] == pytest.approx(top5, abs=1e-12)
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    confusion = pd.read_csv(outputs.confusion, dtype=str, keep_default_na=False)
    assert confusion["predicted"].tolist() == [classes[i] for i in log_probabilities.argmax(axis=1)]


def test_top_losses_are_the_true_highest_loss_images(evaluated, trained):
    _, outputs = evaluated
    table = pd.read_csv(
        outputs.top_losses_table, dtype={"path": str, "actual": str, "predicted": str}, keep_default_na=False
    )
    rows = valid_rows(trained)
    classes = list(load_checkpoint(trained.model).spec.classes)
    log_probabilities = independent_log_probabilities(trained, rows["path"].tolist())
    targets = np.array([classes.index(label) for label in rows["label"]])
    losses = -log_probabilities[np.arange(len(targets)), targets]

    assert list(table.columns) == ["path", "actual", "predicted", "loss", "probability_actual", "probability_predicted"]
    assert len(table) == trained.params.evaluate.top_losses == 9
    assert table["loss"].is_monotonic_decreasing
    expected = np.sort(losses)[::-1][:9]
    np.testing.assert_allclose(table["loss"], expected, atol=1e-4)
    # The k-th loss is clear of the (k+1)-th here, so the set of images is exact.
    assert expected[-1] - np.sort(losses)[::-1][9] > 1e-3
    assert set(table["path"]) == set(rows["path"].iloc[np.argsort(-losses)[:9]])
    by_path = dict(zip(rows["path"], range(len(rows))))
    for row in table.itertuples():
        position = by_path[row.path]
        assert row.actual == rows.at[position, "label"]
        assert row.predicted == classes[log_probabilities[position].argmax()]
        assert row.probability_actual == pytest.approx(math.exp(-row.loss), rel=1e-9)
        assert row.probability_predicted == pytest.approx(math.exp(log_probabilities[position].max()), abs=1e-4)
        assert row.probability_predicted >= row.probability_actual
    assert outputs.top_losses.read_bytes()[:8] == PNG_MAGIC


def test_most_confused_agrees_with_the_confusion_matrix(evaluated, trained):
    _, outputs = evaluated
    confusion = pd.read_csv(outputs.confusion, dtype=str, keep_default_na=False)
    table = pd.read_csv(outputs.most_confused, dtype={"actual": str, "predicted": str}, keep_default_na=False)
    counts = Counter((a, p) for a, p in zip(confusion["actual"], confusion["predicted"]) if a != p)
    expected = sorted(counts.items(), key=lambda item: (-item[1], item[0][0], item[0][1]))
    assert list(table.columns) == ["actual", "predicted", "count"]
    assert [(row.actual, row.predicted, row.count) for row in table.itertuples()] == [
        (actual, predicted, count) for (actual, predicted), count in expected
    ]
    assert len(table) > 0


def test_min_count_filters_most_confused():
    matrix = np.array([[5, 2, 1], [3, 4, 0], [0, 2, 6]])
    table = interpretation.most_confused(matrix, ["a", "b", "c"], min_count=2)
    assert table.values.tolist() == [["b", "a", 3], ["a", "b", 2], ["c", "b", 2]]


def test_tta_is_reported_beside_the_plain_numbers_never_instead(evaluated, trained, tmp_path):
    _, with_tta = evaluated
    metrics = json.loads(with_tta.metrics.read_text())
    for name in ("accuracy", "error_rate", "top5_accuracy", "loss", "macro_f1"):
        assert 0 <= metrics[f"tta_{name}"] < 10
    assert metrics["tta_error_rate"] == pytest.approx(1 - metrics["tta_accuracy"])

    # Through the CLI, as dvc.yaml runs it, with TTA off: the same plain numbers and no tta_ keys.
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(with_overrides(trained.params_dict, {"evaluate.tta": False})))
    folder = tmp_path / "plain"
    outputs = evaluate_outputs(folder)
    arguments = [
        "evaluate",
        "--params",
        str(params_file),
        "--images",
        str(SAMPLE_IMAGES),
        "--index",
        str(trained.index),
        "--finetune-model",
        str(trained.model),
        "--head-model",
        str(trained.model),
    ]
    for name, path in vars(outputs).items():
        arguments += [f"--{name.replace('_', '-')}", str(path)]
    with stage_environment(trained.root):
        result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert re.search(r"evaluate \(train-head\): \d+ valid images, accuracy 0\.\d{4}, balanced 0\.\d{4}", result.output)
    plain = json.loads(outputs.metrics.read_text())
    assert not [key for key in plain if key.startswith("tta_")]
    assert {key: value for key, value in metrics.items() if not key.startswith("tta_")} == plain


def test_every_output_is_written_and_the_report_links_them(evaluated):
    summary, outputs = evaluated
    assert "evaluate (train-head)" in summary and "with TTA accuracy" in summary
    for path in (outputs.confusion_plot, outputs.confusion_normalized_plot, outputs.top_losses):
        assert path.read_bytes()[:8] == PNG_MAGIC
    report = outputs.report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {Path(link).name for link in links} >= {
        "confusion.png",
        "confusion_normalized.png",
        "top_losses.png",
        "metrics.json",
        "confusion.csv",
        "most_confused.csv",
        "top_losses.csv",
    }
    for link in links:
        assert (outputs.report.parent / link).is_file(), link
    metrics = json.loads(outputs.metrics.read_text())
    assert f"| accuracy | {metrics['accuracy']:.4f} | {metrics['tta_accuracy']:.4f} |" in report
    first = pd.read_csv(outputs.most_confused, keep_default_na=False).iloc[0]
    assert f"| {first['actual']} | {first['predicted']} | {first['count']} |" in report
    assert not list(outputs.metrics.parent.glob(".*.tmp"))  # no temporary files left behind


# ---------------------------------------------------------------- errors a user can fix


def test_an_empty_validation_split_is_refused_with_advice(trained, tmp_path):
    index = image_index.load_index(trained.index).assign(split="train")
    index.to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(PetpipeError, match="no validation images.*split.valid_pct"):
        run_evaluate(trained, tmp_path / "out", index=tmp_path / "index.csv")
    assert not (tmp_path / "out").exists()


def test_labels_the_model_never_saw_are_refused(trained, tmp_path):
    index = image_index.load_index(trained.index)
    index.loc[index.index[0], "label"] = "okapi"
    index.to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(PetpipeError, match="okapi"):
        run_evaluate(trained, tmp_path / "out", index=tmp_path / "index.csv")


def test_the_finetune_checkpoint_is_the_default_choice(trained, tmp_path):
    params = trained.params.model_copy(
        update={"evaluate": trained.params.evaluate.model_copy(update={"checkpoint": "finetune", "tta": False})}
    )
    inputs = evaluate.Inputs(
        images=SAMPLE_IMAGES, index=trained.index, finetune_model=tmp_path / "missing.pt", head_model=trained.model
    )
    with pytest.raises(PetpipeError, match="missing.pt not found"), stage_environment(trained.root):
        evaluate.run(params, inputs, evaluate_outputs(tmp_path))


def test_evaluate_needs_train_heads_model_only_to_evaluate_it(trained, tmp_path):
    """The audit is a stage of its own: evaluating finetune's model needs no --head-model; evaluating train-head's
    without one says which option to pass."""
    head_params = trained.params.model_copy(
        update={"evaluate": trained.params.evaluate.model_copy(update={"tta": False})}
    )
    finetune_params = head_params.model_copy(
        update={"evaluate": head_params.evaluate.model_copy(update={"checkpoint": "finetune"})}
    )
    inputs = evaluate.Inputs(images=SAMPLE_IMAGES, index=trained.index, finetune_model=trained.model)
    with stage_environment(trained.root):
        summary = evaluate.run(finetune_params, inputs, evaluate_outputs(tmp_path / "finetune"))
        assert summary.startswith("evaluate (finetune): ") and "audit" not in summary
        with pytest.raises(PetpipeError, match="checkpoint is train-head: pass train-head's model.pt as --head-model"):
            evaluate.run(head_params, inputs, evaluate_outputs(tmp_path / "head"))
    assert not (tmp_path / "head").exists()
    assert "label_issues" not in (tmp_path / "finetune" / "report.md").read_text()


# ---------------------------------------------------------------- pure interpretation functions


def test_per_class_metrics_of_a_class_never_predicted_are_zero_not_nan():
    actual, predicted = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])
    matrix = interpretation.confusion_matrix(actual, predicted, num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    table = interpretation.per_class_metrics(actual, predicted, ["a", "b", "c", "d"])
    assert table.loc["c"].tolist() == [0.0, 0.0, 0.0, 1]  # never predicted, one image
    assert table.loc["d"].tolist() == [0.0, 0.0, 0.0, 0]  # absent: excluded from macro F1
    assert table.loc["a", "precision"] == 1.0 and table.loc["a", "recall"] == 0.5
    assert interpretation.macro_f1(actual, predicted) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


def test_top_k_accuracy_breaks_ties_as_argmax_does():
    log_probabilities = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [0.3, 0.6, 0.1]]))
    targets = np.array([1, 1, 1, 1])
    accuracy = float((log_probabilities.argmax(axis=1) == targets).mean())
    assert interpretation.top_k_accuracy(log_probabilities, targets, k=1) == accuracy == 0.25
    assert interpretation.top_k_accuracy(log_probabilities, targets, k=2) == 1.0
    assert interpretation.top_k_accuracy(log_probabilities, targets, k=5) == 1.0  # k capped at the class count


def test_top_k_accuracy_from_scikit_learn_matches_a_stable_sort_with_ties_and_zero_probabilities():
    """The reference: the k first of a stable sort (ties to the lower id); coarse scores make ties common."""
    rng = np.random.default_rng(0)
    for classes in (2, 3, 7, 37):
        probabilities = rng.integers(0, 4, size=(200, classes)).astype(np.float64) + 1e-12 * (classes == 2)
        probabilities[:, 0] = np.where(rng.random(200) < 0.2, 0.0, probabilities[:, 0])  # log(0) = -inf
        with np.errstate(divide="ignore"):
            log_probabilities = np.log(probabilities / np.maximum(probabilities.sum(1, keepdims=True), 1e-300))
        targets = rng.integers(0, classes, size=200)
        for k in (1, 2, 5):
            best = np.argsort(-log_probabilities, axis=1, kind="stable")[:, : min(k, classes)]
            expected = float((best == targets[:, None]).any(axis=1).mean())
            assert interpretation.top_k_accuracy(log_probabilities, targets, k=k) == expected, (classes, k)


def test_the_results_page_reads_the_per_class_table_from_per_class_csv(evaluated):
    """metrics.json holds no per_class (dvc exp show); petpipe serve's Results page reads per_class.csv."""
    from petpipe.serve import pages

    _, outputs = evaluated
    assert "per_class" not in json.loads(outputs.metrics.read_text())
    table = pd.read_csv(outputs.per_class, keep_default_na=False)
    read = pages.read_evaluation(outputs.metrics.parent)["metrics"]["per_class"]
    assert list(read) == table["class"].tolist()
    assert [row["f1"] for row in read.values()] == pytest.approx(table["f1"].tolist())
    assert [row["support"] for row in read.values()] == table["support"].tolist()
