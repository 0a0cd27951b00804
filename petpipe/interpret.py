"""Interpretation of a classifier's predictions: metrics, confusion matrix, most_confused, top losses.

Pure functions on arrays, as fastai's ClassificationInterpretation: they take
log-probabilities (N, C) and true class ids (N,) and return numbers and frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

# fastai's top_k_accuracy default and the tutorial's second metric.
TOP_K = 5


def per_image_losses(log_probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy of each image, -log p(actual): (N, C), (N,) -> (N,)."""
    return -log_probabilities[np.arange(len(targets)), targets]


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Counts (C, C): row = actual class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(actual), np.asarray(predicted)), 1)
    return matrix


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall on the diagonal); rows of a class with no image stay 0."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)


def per_class_metrics(matrix: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, indexed by class name, in class order.

    A class never predicted has precision 0.0 and a class with no image recall
    0.0 (scikit-learn's zero_division=0): never NaN, which JSON cannot hold.
    """
    true_positives = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
    return pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "support": support},
                        index=pd.Index(list(classes), name="class"))


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 over the classes that occur, as actual or as predicted (scikit-learn's default labels).

    A class absent from the validation split and never predicted says nothing
    about the model, so it does not drag the mean to zero.
    """
    occurring = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    if not occurring.any():
        return 0.0
    f1 = per_class_metrics(matrix, [str(position) for position in range(len(matrix))])["f1"].to_numpy()
    return float(f1[occurring].mean())


def top_k_accuracy(log_probabilities: np.ndarray, targets: np.ndarray, *, k: int = TOP_K) -> float:
    """Fraction of images whose actual class is among the k most probable (k capped at the class count)."""
    k = min(k, log_probabilities.shape[1])
    # Stable sort: ties go to the lower class id, as argmax breaks them, so top-1 equals accuracy.
    best = np.argsort(-log_probabilities, axis=1, kind="stable")[:, :k]
    return float((best == np.asarray(targets)[:, None]).any(axis=1).mean())


def classification_metrics(log_probabilities: np.ndarray, targets: np.ndarray,
                           classes: Sequence[str]) -> dict[str, Any]:
    """The headline numbers and per-class table of metrics.json, from log-probabilities (N, C)."""
    if len(targets) == 0:
        raise ValueError("no images to evaluate")
    predicted = log_probabilities.argmax(axis=1)
    matrix = confusion_matrix(targets, predicted, num_classes=len(classes))
    accuracy = float((predicted == targets).mean())
    table = per_class_metrics(matrix, classes)
    return {
        "accuracy": accuracy,
        "error_rate": 1.0 - accuracy,
        "top5_accuracy": top_k_accuracy(log_probabilities, targets, k=TOP_K),
        "loss": float(per_image_losses(log_probabilities, targets).mean()),
        "macro_f1": macro_f1(matrix),
        "per_class": {
            name: {"precision": float(row.precision), "recall": float(row.recall), "f1": float(row.f1),
                   "support": int(row.support)}
            for name, row in table.iterrows()
        },
    }


def most_confused(matrix: np.ndarray, classes: Sequence[str], *, min_count: int = 1) -> pd.DataFrame:
    """fastai's most_confused: off-diagonal (actual, predicted, count) with count >= min_count, most first."""
    actual, predicted = np.nonzero(matrix >= max(min_count, 1))
    off_diagonal = actual != predicted
    frame = pd.DataFrame({
        "actual": [classes[position] for position in actual[off_diagonal]],
        "predicted": [classes[position] for position in predicted[off_diagonal]],
        "count": matrix[actual[off_diagonal], predicted[off_diagonal]].astype(np.int64),
    })
    frame = frame.sort_values(["count", "actual", "predicted"], ascending=[False, True, True], kind="stable")
    return frame.reset_index(drop=True)


def top_losses(losses: np.ndarray, *, k: int) -> np.ndarray:
    """Positions of the k highest losses, highest first; ties keep the earlier image first."""
    order = np.argsort(-np.asarray(losses, dtype=np.float64), kind="stable")
    return order[:k]


def top_losses_table(log_probabilities: np.ndarray, targets: np.ndarray, *, paths: Sequence[str],
                     classes: Sequence[str], k: int) -> pd.DataFrame:
    """fastai's plot_top_losses as rows: path, actual, predicted, loss, p(actual), p(predicted)."""
    losses = per_image_losses(log_probabilities, targets)
    chosen = top_losses(losses, k=k)
    predicted = log_probabilities.argmax(axis=1)
    probabilities = np.exp(log_probabilities)
    return pd.DataFrame({
        "path": [paths[position] for position in chosen],
        "actual": [classes[targets[position]] for position in chosen],
        "predicted": [classes[predicted[position]] for position in chosen],
        "loss": losses[chosen],
        "probability_actual": probabilities[chosen, targets[chosen]],
        "probability_predicted": probabilities[chosen, predicted[chosen]],
    })
