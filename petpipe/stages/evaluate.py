"""Stage evaluate: interpret the model on the validation split (fastai's ClassificationInterpretation).

    petpipe evaluate --images stages/fetch/images --index stages/index-labels/index.csv \
        --finetune-model stages/finetune/model.pt --head-model stages/train-head/model.pt \
        --metrics stages/evaluate/metrics.json --confusion stages/evaluate/confusion.csv \
        --confusion-plot stages/evaluate/confusion.png \
        --confusion-normalized-plot stages/evaluate/confusion_normalized.png \
        --top-losses stages/evaluate/top_losses.png --top-losses-table stages/evaluate/top_losses.csv \
        --most-confused stages/evaluate/most_confused.csv --report stages/evaluate/report.md
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from petpipe import interpret, plots, tracking
from petpipe.atomic import save_figure, write_csv, write_json, write_text
from petpipe.augment import augment_batch, center_crop_batch, normalize
from petpipe.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_of
from petpipe.distributed import launched_as_secondary_rank
from petpipe.errors import PetpipeError
from petpipe.models import Classifier, Preprocessing
from petpipe.params import AugmentParams, Params
from petpipe.stages.common import load_dataset, seed_everything
from petpipe.training import (ImageSet, autocast, batch_indices, choose_device, configure_threads, memory_format,
                              predict)

STAGE = "evaluate"
# fastai's tta: n=4 augmented views, blended with the plain view by beta=0.25.
TTA_VIEWS = 4
TTA_BETA = 0.25
HEADLINE = ("accuracy", "error_rate", "top5_accuracy", "loss", "macro_f1")
REPORT_CONFUSED = 10


@dataclass(frozen=True)
class Inputs:
    images: Path
    index: Path
    finetune_model: Path
    head_model: Path


@dataclass(frozen=True)
class Outputs:
    metrics: Path
    confusion: Path
    confusion_plot: Path
    top_losses: Path
    top_losses_table: Path
    most_confused: Path
    report: Path
    # The row-normalised confusion matrix; not drawn when None.
    confusion_normalized_plot: Path | None = None


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    if launched_as_secondary_rank():  # a one-process stage: rank 0 alone runs it
        return ""
    configure_threads()
    device = choose_device(params.train.device)
    which = params.evaluate.checkpoint
    checkpoint_path = inputs.finetune_model if which == "finetune" else inputs.head_model
    used = {"evaluate": params.evaluate.model_dump(), "train": params.train.model_dump(),
            "checkpoint_path": str(checkpoint_path)}
    seed_everything(params.train.seed)

    checkpoint = load_checkpoint(checkpoint_path)
    classes = list(checkpoint["classes"])
    size, presize = int(checkpoint["preprocessing"]["img_size"]), int(checkpoint["preprocessing"]["presize"])
    preprocessing = preprocessing_of(checkpoint)
    data = load_dataset(inputs.index, inputs.images, presize=presize, device=device,
                        workers=params.train.decode_workers, classes=classes)
    if len(data.valid) == 0:
        raise PetpipeError(f"{inputs.index} has no validation images to evaluate; raise split.valid_pct "
                           f"(or give split.file some valid rows) and rerun index-labels")
    valid_rows = data.index[data.index["split"] == "valid"].reset_index(drop=True)
    model = model_from_checkpoint(checkpoint).to(device).to(memory_format=memory_format(device)).eval()

    logits = predict(model, images=data.valid, batch_size=params.train.batch_size, size=size,
                     preprocessing=preprocessing)
    log_probabilities = torch.log_softmax(logits.double(), dim=1).numpy()  # (N, C)
    targets = data.valid.targets.cpu().numpy()
    metrics: dict[str, Any] = {"checkpoint": which, "images": len(targets),
                               **interpret.classification_metrics(log_probabilities, targets, classes)}
    if params.evaluate.tta:
        tta = tta_log_probabilities(model, images=data.valid, batch_size=params.train.batch_size, size=size,
                                    preprocessing=preprocessing, augment=params.train.augment,
                                    seed=params.train.seed, plain=log_probabilities)
        tta_metrics = interpret.classification_metrics(tta, targets, classes)
        metrics.update({f"tta_{name}": tta_metrics[name] for name in HEADLINE})

    predicted = log_probabilities.argmax(axis=1)
    matrix = interpret.confusion_matrix(targets, predicted, num_classes=len(classes))
    confusion = pd.DataFrame({"actual": valid_rows["label"], "predicted": [classes[i] for i in predicted]})
    confused = interpret.most_confused(matrix, classes, min_count=params.evaluate.min_count)
    losses = interpret.top_losses_table(log_probabilities, targets, paths=list(valid_rows["path"]),
                                        classes=classes, k=params.evaluate.top_losses)
    top_positions = interpret.top_losses(interpret.per_image_losses(log_probabilities, targets),
                                         k=params.evaluate.top_losses)

    # Draw every figure before writing anything, so a plotting failure leaves no new outputs.
    figures = {outputs.confusion_plot: plots.plot_confusion(matrix, classes)}
    if outputs.confusion_normalized_plot is not None:
        figures[outputs.confusion_normalized_plot] = plots.plot_confusion(matrix, classes, normalize=True)
    figures[outputs.top_losses] = plots.plot_top_losses(
        center_crop_batch(data.valid.pixels[torch.as_tensor(top_positions, device=device)].cpu(), size=size),
        predicted=list(losses["predicted"]), actual=list(losses["actual"]), losses=list(losses["loss"]),
        probabilities=list(losses["probability_actual"]))

    with tracking.stage_run(STAGE, params=used) as tracked:
        write_csv(outputs.confusion, confusion)
        write_csv(outputs.most_confused, confused)
        write_csv(outputs.top_losses_table, losses)
        for path, figure in figures.items():
            save_figure(path, figure)
        write_text(outputs.report, render_report(metrics, confused, outputs=outputs, checkpoint_path=checkpoint_path))
        write_json(outputs.metrics, metrics)
        tracked.log_metrics({name: float(value) for name, value in metrics.items()
                             if isinstance(value, float)})
        tracked.log_artifacts([path for path in _output_paths(outputs)])

    summary = (f"evaluate ({which}): {metrics['images']} images, accuracy {metrics['accuracy']:.4f}, "
               f"error rate {metrics['error_rate']:.4f}, top-5 {metrics['top5_accuracy']:.4f}, "
               f"loss {metrics['loss']:.4f}")
    if params.evaluate.tta:
        summary += f"; with TTA accuracy {metrics['tta_accuracy']:.4f}"
    return summary + f" -> {outputs.metrics}"


@torch.inference_mode()
def tta_log_probabilities(model: Classifier, *, images: ImageSet, batch_size: int, size: int,
                          preprocessing: Preprocessing, augment: AugmentParams, seed: int,
                          plain: np.ndarray, views: int = TTA_VIEWS, beta: float = TTA_BETA) -> np.ndarray:
    """fastai's tta: mean probabilities of `views` augmented passes, blended with the plain view.

    p = (1 - beta) * mean(augmented) + beta * plain; returns log p (N, C).
    The augmentation is the training one, drawn from a generator seeded by `seed`.
    """
    model.eval()
    device = images.pixels.device
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(plain.shape, dtype=torch.float64)
    for _ in range(views):
        for rows in batch_indices(len(images), batch_size, shuffle=False, drop_last=False):
            batch = augment_batch(images.pixels[rows.to(device)], size=size, augment=augment, generator=generator)
            batch = normalize(batch, mean=preprocessing.mean, std=preprocessing.std)
            with autocast(device):
                logits = model(batch.contiguous(memory_format=memory_format(device)))
            total[rows] += torch.softmax(logits.double(), dim=1).cpu()
    blended = (1 - beta) * (total / views) + beta * torch.from_numpy(np.exp(plain))
    return torch.log(blended.clamp_min(torch.finfo(torch.float64).tiny)).numpy()


def _output_paths(outputs: Outputs) -> list[Path]:
    return [Path(path) for path in vars(outputs).values() if path is not None]


def _link(path: Path, report: Path) -> str:
    """A link from report.md to an output, relative when they share a folder tree."""
    return Path(os.path.relpath(Path(path).resolve(), Path(report).resolve().parent)).as_posix()


def render_report(metrics: dict[str, Any], confused: pd.DataFrame, *, outputs: Outputs,
                  checkpoint_path: Path) -> str:
    """report.md: one page with the headline numbers, the most confused pairs and every plot."""
    tta = "tta_accuracy" in metrics
    lines = [
        f"# Evaluation: {metrics['checkpoint']} model on {metrics['images']} validation images",
        "",
        f"Checkpoint: `{checkpoint_path}`.",
        "",
        "| metric | plain |" + (" with TTA |" if tta else ""),
        "|---|---:|" + ("---:|" if tta else ""),
    ]
    labels = {"accuracy": "accuracy", "error_rate": "error rate", "top5_accuracy": "top-5 accuracy",
              "loss": "loss (cross-entropy)", "macro_f1": "macro F1"}
    for name in HEADLINE:
        row = f"| {labels[name]} | {metrics[name]:.4f} |"
        lines.append(row + (f" {metrics['tta_' + name]:.4f} |" if tta else ""))
    if tta:
        lines += ["", f"TTA: fastai's `tta` ({TTA_VIEWS} augmented views blended with the plain view, "
                      f"beta {TTA_BETA}); the plain numbers are the ones to compare across runs."]
    lines += ["", f"## Most confused pairs (top {REPORT_CONFUSED})", ""]
    if confused.empty:
        lines.append("No confusion at or above evaluate.min_count.")
    else:
        lines += ["| actual | predicted | count |", "|---|---|---:|"]
        lines += [f"| {row.actual} | {row.predicted} | {row.count} |"
                  for row in confused.head(REPORT_CONFUSED).itertuples()]
    lines += ["", "## Plots and tables", ""]
    entries = [(outputs.confusion_plot, "confusion matrix (counts)"),
               (outputs.confusion_normalized_plot, "confusion matrix (rows normalised)"),
               (outputs.top_losses, "top losses (prediction/actual/loss/probability of actual)")]
    for path, title in entries:
        if path is not None:
            lines += [f"### {title[0].upper() + title[1:]}", "", f"![{title}]({_link(path, outputs.report)})", ""]
    tables = [(outputs.metrics, "metrics.json: every number, per-class precision/recall/F1/support"),
              (outputs.confusion, "confusion.csv: actual and predicted class of every image (dvc plots)"),
              (outputs.most_confused, "most_confused.csv: every confused pair"),
              (outputs.top_losses_table, "top_losses.csv: the images above, as a table")]
    lines += [f"- [{Path(path).name}]({_link(path, outputs.report)}): {text.split(': ', 1)[1]}"
              for path, text in tables]
    return "\n".join(lines) + "\n"
