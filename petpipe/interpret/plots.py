"""Figures the stages write: each function takes plain data and returns a matplotlib Figure.

Figures are drawn on an Agg canvas without pyplot, so plotting works headless and
never touches a user's interactive backend; save them with `petpipe.utils.file_formats.save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:  # images arrive as tensors; drawing them needs no torch of its own
    import torch
    from matplotlib.axes import Axes

TRAIN_COLOR = "#4C72B0"
VALID_COLOR = "#DD8452"
TEST_COLOR = "#55A868"
SPLIT_COLORS = {"train": TRAIN_COLOR, "valid": VALID_COLOR, "test": TEST_COLOR}


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_message(text: str) -> Figure:
    """A small figure holding one sentence: a declared plot with nothing to show says why."""
    figure = _new_figure(6.0, 1.2)
    figure.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True)
    return figure


def plot_show_batch(
    images: torch.Tensor, labels: Sequence[str], *, columns: int | None = None, title: str | None = None
) -> Figure:
    """A labelled grid of images, as fastai's show_batch; images are float (B, 3, H, W) in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
    count = images.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    figure = _new_figure(2.6 * columns, 2.8 * rows + (0.4 if title else 0))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for position, axis in enumerate(axes):
        axis.axis("off")
        if position < count:
            axis.imshow(pixels[position])
            axis.set_title(labels[position], fontsize=10)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_class_counts(counts: pd.DataFrame | Mapping[str, Mapping[str, int]]) -> Figure:
    """Horizontal stacked bars of train, valid (and test, when any) images per class, first class at the top.

    counts: a frame indexed by class with columns train, valid and test, or
    {class: {"train": n, "valid": n, "test": n}} as in index-labels' report.json.
    """
    frame = counts if isinstance(counts, pd.DataFrame) else pd.DataFrame.from_dict(counts, orient="index")
    frame = frame.reindex(columns=["train", "valid", "test"], fill_value=0).fillna(0).astype(int)
    splits = ["train", "valid"] + (["test"] if frame["test"].sum() else [])
    names = [str(name) for name in frame.index]
    positions = np.arange(len(names))
    figure = _new_figure(8.0, 1.2 + 0.28 * max(len(names), 1))
    axis = figure.subplots()
    left = np.zeros(len(names), dtype=int)
    for split in splits:
        values = frame[split].to_numpy()
        axis.barh(positions, values, left=left, color=SPLIT_COLORS[split], label=f"{split} ({values.sum()})")
        left = left + values
    for position, row in enumerate(frame[splits].itertuples(index=False)):
        axis.text(left[position], position, " " + " / ".join(str(n) for n in row), va="center", fontsize=7)
    axis.set_yticks(positions, names, fontsize=8)
    axis.set_ylim(len(names) - 0.5, -0.5)  # first class at the top, like a table
    axis.set_xlim(0, max(int(left.max(initial=0)) * 1.15, 1))
    axis.set_xlabel(f"images ({' / '.join(splits)})")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f"Images per class: {len(names)} classes", loc="left")
    # Above the bars, beside the title: inside the axes it would hide the last classes.
    axis.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(splits), frameon=False, fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    axis.set_axisbelow(True)
    figure.tight_layout()
    return figure


def plot_training_history(history: pd.DataFrame, *, title: str) -> Figure:
    """Losses and accuracy per epoch (history.csv), side by side."""
    figure = _new_figure(10.0, 3.6)
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    epochs = history["epoch"].to_numpy()
    loss_axis.plot(epochs, history["train_loss"], marker="o", color=TRAIN_COLOR, label="train loss")
    if "valid_loss" in history:
        loss_axis.plot(epochs, history["valid_loss"], marker="o", color=VALID_COLOR, label="valid loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("cross-entropy")
    loss_axis.legend(frameon=False)
    if "accuracy" in history:
        accuracy_axis.plot(epochs, history["accuracy"], marker="o", color=VALID_COLOR)
        accuracy_axis.set_ylim(0, 1)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("valid accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _mark_suggestions(
    axis: Axes,
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestions: Mapping[str, float],
    *,
    chosen: str,
    trusted: bool,
) -> None:
    """Each suggestion as a marker on the smoothed curve; the chosen one larger, and named so when trusted."""
    markers = {"valley": "o", "slide": "s", "minimum": "v", "steep": "^", "edge": "D"}
    for name, lr in suggestions.items():
        loss = float(np.interp(np.log10(lr), np.log10(lrs), losses))
        label = f"{name}: {lr:.2e}" + (" (chosen)" if name == chosen and trusted else "")
        size = 9 if name == chosen else 6
        axis.plot([lr], [loss], marker=markers.get(name, "o"), markersize=size, linestyle="none", label=label)


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    suggestions: Mapping[str, float],
    *,
    chosen: str,
    raw_losses: Sequence[float] | None = None,
    threshold: float | None = None,
    noise_window: int = 0,
    trusted: bool = True,
) -> Figure:
    """fastai's lr_find plot: smoothed loss against a log learning rate, suggestions marked; with
    `raw_losses`, each batch's loss behind it (the noise), the window that measured that noise shaded and
    the divergence threshold dashed. The y axis stops short of the divergence's last batches, so that the
    flat stretch and the start of the rise stay readable."""
    figure = _new_figure(7.0, 4.2)
    axis = figure.subplots()
    if raw_losses is not None:
        axis.plot(lrs, raw_losses, color=TRAIN_COLOR, alpha=0.25, linewidth=0.8, label="loss of each batch")
    axis.plot(lrs, losses, color=TRAIN_COLOR, label="smoothed loss")
    if noise_window > 1 and len(lrs) >= noise_window:
        axis.axvspan(lrs[0], lrs[noise_window - 1], color="0.85", alpha=0.5, linewidth=0, label="noise window")
    if threshold is not None and math.isfinite(threshold):
        axis.axhline(threshold, color="0.4", linestyle="--", linewidth=0.9, label=f"divergence {threshold:.3g}")
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("loss")
    finite = [value for value in losses if math.isfinite(value)]
    if finite:
        top = max([*finite, threshold if threshold is not None and math.isfinite(threshold) else 0.0])
        axis.set_ylim(min(0.0, min(finite)), 1.15 * top)  # raw batches may spike far above: not the story
    _mark_suggestions(axis, lrs, losses, suggestions, chosen=chosen, trusted=trusted)
    axis.legend(frameon=False, fontsize=8)
    axis.grid(alpha=0.3, which="both")
    title = "Learning rate finder (whole model unfrozen)"
    if not trusted:
        title += ": no rise above the noise, suggestions untrusted"
    axis.set_title(title, loc="left", fontsize=10)
    figure.tight_layout()
    return figure


def plot_confusion(
    matrix: np.ndarray, classes: Sequence[str], *, normalize: bool = False, title: str | None = None
) -> Figure:
    """fastai's plot_confusion_matrix: actual classes down, predicted across, values in the cells.

    The figure grows with the class count so 37 breeds stay readable; with
    `normalize` each row is divided by its sum (recall on the diagonal).
    """
    counts = np.asarray(matrix)
    count = len(classes)
    totals = counts.sum(axis=1, keepdims=True)
    values = (
        np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        if normalize
        else counts.astype(np.float64)
    )
    side = max(5.0, 2.5 + 0.32 * count)
    font = 10 if count <= 10 else 8 if count <= 25 else 6.5
    figure = _new_figure(side + 1.0, side)
    axis = figure.subplots()
    image = axis.imshow(values, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(values.max(), 1.0))
    colorbar = figure.colorbar(image, ax=axis, fraction=0.04, pad=0.02, shrink=0.6)
    colorbar.ax.tick_params(labelsize=font)
    if not normalize:
        colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    positions = np.arange(count)
    axis.set_xticks(positions, [str(name) for name in classes], rotation=90, fontsize=font)
    axis.set_yticks(positions, [str(name) for name in classes], fontsize=font)
    axis.set_xlabel("predicted")
    axis.set_ylabel("actual")
    threshold = (1.0 if normalize else max(values.max(), 1.0)) / 2
    for row, column in zip(*np.nonzero(counts)):  # empty cells stay blank so the errors stand out
        value = values[row, column]
        text = f"{value:.2f}".removeprefix("0") if normalize else str(int(counts[row, column]))
        axis.text(
            column, row, text, ha="center", va="center", fontsize=font, color="white" if value > threshold else "black"
        )
    # Faint gridlines between cells help follow a row across 37 columns.
    axis.set_xticks(positions - 0.5, minor=True)
    axis.set_yticks(positions - 0.5, minor=True)
    axis.grid(which="minor", color="#dddddd", linewidth=0.4)
    axis.tick_params(which="minor", length=0)
    images = int(counts.sum())
    correct = int(np.trace(counts))
    default_title = (
        f"Confusion matrix{' (rows normalised)' if normalize else ''}: {correct}/{images} correct, {count} classes"
    )
    axis.set_title(title or default_title, loc="left")
    figure.tight_layout()
    return figure


def plot_top_losses(
    images: torch.Tensor,
    *,
    predicted: Sequence[str],
    actual: Sequence[str],
    losses: Sequence[float],
    probabilities: Sequence[float],
) -> Figure:
    """fastai's plot_top_losses: each image titled prediction/actual/loss/probability of the actual class.

    images: float (B, 3, H, W) in [0, 1], highest loss first.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    count = images.shape[0]
    if not count == len(predicted) == len(actual) == len(losses) == len(probabilities):
        raise ValueError(
            f"{count} images but {len(predicted)}/{len(actual)}/{len(losses)}/{len(probabilities)} "
            "predicted/actual/losses/probabilities"
        )
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    figure = _new_figure(3.3 * columns, 3.5 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for position, axis in enumerate(axes):
        axis.axis("off")
        if position < count:
            axis.imshow(pixels[position])
            # Top losses have tiny probabilities: 2 decimals would print 0.00 for all of them.
            probability = probabilities[position]
            shown = f"{probability:.2f}" if probability >= 0.005 else f"{probability:.1e}"
            axis.set_title(f"{predicted[position]}/\n{actual[position]}\n{losses[position]:.2f} / {shown}", fontsize=8)
    figure.suptitle("Prediction/Actual/Loss/Probability of actual")
    figure.set_layout_engine("constrained")  # unlike tight_layout, leaves room for the suptitle
    return figure
