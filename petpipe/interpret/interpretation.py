"""Interpretation of a classifier's predictions: metrics, confusion matrix, most_confused, top losses.

Pure functions on arrays, as fastai's ClassificationInterpretation: they take
log-probabilities (N, C) and true class ids (N,) and return numbers and frames.
scikit-learn computes the confusion matrix, per-class precision/recall/F1,
macro F1 and top-k accuracy (with argmax's tie rule); most_confused and the
top losses are petpipe's (fastai's).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics

from petpipe.interpret.metric_table import TOP_K


def per_image_losses(log_probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy of each image, -log p(actual): (N, C), (N,) -> (N,)."""
    return -log_probabilities[np.arange(len(targets)), targets]


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Counts (C, C): row = actual class, column = predicted class (scikit-learn's, every class a row)."""
    return metrics.confusion_matrix(actual, predicted, labels=np.arange(num_classes)).astype(np.int64)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall on the diagonal); rows of a class with no image stay 0."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)


def per_class_metrics(actual: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, indexed by class name, in class order.

    A class never predicted has precision 0.0 and a class with no image recall
    0.0 (scikit-learn's zero_division=0): never NaN, which JSON cannot hold.
    """
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        actual, predicted, labels=np.arange(len(classes)), zero_division=0
    )
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support},
        index=pd.Index(list(classes), name="class"),
    )


def macro_f1(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean F1 over the classes that occur, as actual or as predicted (scikit-learn's default labels).

    A class absent from the validation split and never predicted says nothing
    about the model, so it does not drag the mean to zero.
    """
    return float(metrics.f1_score(actual, predicted, average="macro", zero_division=0))


def balanced_accuracy(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes that occur in `actual` (scikit-learn's balanced_accuracy_score): each
    class counts once however many photos it has, so a small class the model ignores shows."""
    with warnings.catch_warnings():  # a predicted class absent from actual: scikit-learn warns, the mean skips it
        warnings.simplefilter("ignore", UserWarning)
        return float(metrics.balanced_accuracy_score(actual, predicted))


def top_k_accuracy(log_probabilities: np.ndarray, targets: np.ndarray, *, k: int = TOP_K) -> float:
    """Fraction of images whose actual class is among the k most probable (k capped at the class count).

    scikit-learn's top_k_accuracy_score, with ties going to the lower class id as argmax breaks them (so
    top-1 equals accuracy): scikit-learn breaks ties towards the higher id, so it is given the classes in
    reverse order (tests/test_evaluate.py pins a tie where the two rules give 0.25 and 0.5).
    """
    classes = log_probabilities.shape[1]
    k = min(k, classes)
    if k == classes:  # every class is among the k (scikit-learn warns that this score means nothing)
        return 1.0
    targets = np.asarray(targets)
    if classes == 2:  # k == 1: scikit-learn reads two columns as a binary problem; top-1 is accuracy
        return float((log_probabilities.argmax(axis=1) == targets).mean())
    # scikit-learn refuses infinite scores; log(0) = -inf becomes the lowest finite number: same order.
    scores = np.maximum(log_probabilities, np.finfo(np.float64).min)
    return float(metrics.top_k_accuracy_score(classes - 1 - targets, scores[:, ::-1], k=k, labels=np.arange(classes)))


def classification_metrics(
    log_probabilities: np.ndarray, targets: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """The headline numbers of metrics.json (scalars only, so they compare across experiments in `dvc exp
    show`), from log-probabilities (N, C); the per-class table is per_class_metrics (per_class.csv)."""
    if len(targets) == 0:
        raise ValueError("no images to evaluate")
    predicted = log_probabilities.argmax(axis=1)
    accuracy = float((predicted == targets).mean())
    return {
        "accuracy": accuracy,
        "error_rate": 1.0 - accuracy,
        "top5_accuracy": top_k_accuracy(log_probabilities, targets, k=TOP_K),
        "loss": float(per_image_losses(log_probabilities, targets).mean()),
        "macro_f1": macro_f1(targets, predicted),
        "balanced_accuracy": balanced_accuracy(targets, predicted),
    }


def most_confused(matrix: np.ndarray, classes: Sequence[str], *, min_count: int = 1) -> pd.DataFrame:
    """fastai's most_confused: off-diagonal (actual, predicted, count) with count >= min_count, most first."""
    actual, predicted = np.nonzero(matrix >= max(min_count, 1))
    off_diagonal = actual != predicted
    frame = pd.DataFrame(
        {
            "actual": [classes[position] for position in actual[off_diagonal]],
            "predicted": [classes[position] for position in predicted[off_diagonal]],
            "count": matrix[actual[off_diagonal], predicted[off_diagonal]].astype(np.int64),
        }
    )
    frame = frame.sort_values(["count", "actual", "predicted"], ascending=[False, True, True], kind="stable")
    return frame.reset_index(drop=True)


def top_losses(losses: np.ndarray, *, k: int) -> np.ndarray:
    """Positions of the k highest losses, highest first; ties keep the earlier image first."""
    order = np.argsort(-np.asarray(losses, dtype=np.float64), kind="stable")
    return order[:k]


TOP_LOSSES_COLUMNS = ["path", "actual", "predicted", "loss", "probability_actual", "probability_predicted"]


def top_losses_table(
    log_probabilities: np.ndarray, targets: np.ndarray, *, paths: Sequence[str], classes: Sequence[str], k: int
) -> pd.DataFrame:
    """fastai's plot_top_losses as rows: path, actual, predicted, loss, p(actual), p(predicted)."""
    losses = per_image_losses(log_probabilities, targets)
    chosen = top_losses(losses, k=k)
    predicted = log_probabilities.argmax(axis=1)
    probabilities = np.exp(log_probabilities)
    return pd.DataFrame(
        {
            "path": [paths[position] for position in chosen],
            "actual": [classes[targets[position]] for position in chosen],
            "predicted": [classes[predicted[position]] for position in chosen],
            "loss": losses[chosen],
            "probability_actual": probabilities[chosen, targets[chosen]],
            "probability_predicted": probabilities[chosen, predicted[chosen]],
        }
    )
