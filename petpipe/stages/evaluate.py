"""evaluate: interpret the model on the validation split (fastai's ClassificationInterpretation) and, beside it, on
the test split that nothing tuned on (test_ metrics and plots).

    petpipe evaluate --images stages/fetch/images --index stages/index-labels/index.csv \\
        --finetune-model stages/finetune/model.pt --head-model stages/train-head/model.pt \\
        --metrics stages/evaluate/metrics.json --confusion stages/evaluate/confusion.csv \\
        --confusion-plot stages/evaluate/confusion.png \\
        --confusion-normalized-plot stages/evaluate/confusion_normalized.png \\
        --top-losses stages/evaluate/top_losses.png --top-losses-table stages/evaluate/top_losses.csv \\
        --most-confused stages/evaluate/most_confused.csv --report stages/evaluate/report.md \\
        --test-confusion stages/evaluate/test_confusion.csv --test-confusion-plot stages/evaluate/test_confusion.png \\
        --test-top-losses stages/evaluate/test_top_losses.png \\
        --test-top-losses-table stages/evaluate/test_top_losses.csv
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from petpipe.data.dataset import Dataset, ImageSet
from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.interpret import interpretation, metric_table, plots
from petpipe.model.backbones import Classifier
from petpipe.model.checkpoint import load_checkpoint
from petpipe.params import EvaluateParams, Params
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.train.compute import one_process
from petpipe.train.fit_loop import batch_indices, predict
from petpipe.train.hardware import autocast, to_device
from petpipe.utils import timing
from petpipe.utils.file_formats import save_figure, write_csv, write_json, write_text

STAGE = Stage(
    "evaluate",
    params=("train.device", "train.batch_size", "train.seed", "train.augment", "evaluate"),
    compute=one_process,
)
# fastai's tta: n=4 augmented views, blended with the plain view by beta=0.25.
TTA_VIEWS = 4
TTA_BETA = 0.25
TEST = "test_"  # the prefix of the test split's numbers in metrics.json
REPORT_CONFUSED = 10


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    index: Path = path_option("index-labels' index.csv.", at=stage_path("index-labels", "index.csv"))
    finetune_model: Path = path_option("finetune's model.pt.", at=stage_path("finetune", "model.pt"))
    head_model: Path | None = path_option(
        "train-head's model.pt: read when evaluate.checkpoint is train-head.",
        optional=True,
        at=stage_path("train-head", "model.pt"),
        note="read only with evaluate.checkpoint train-head; DVC cannot make a dependency conditional",
    )


@dataclass(frozen=True)
class Outputs:
    metrics: Path = path_option(
        "metrics.json to write.",
        file="metrics.json",
        kind="metrics",
        note="scalars only (accuracy, error_rate, top5_accuracy, loss, macro_f1, balanced_accuracy, ...; the test "
        "split's beside them as test_accuracy, ...): per-class numbers are in per_class.csv",
    )
    confusion: Path = path_option(
        "confusion.csv to write.",
        file="confusion.csv",
        kind="plots",
        plot={"template": "confusion", "x": "predicted", "y": "actual"},
    )
    confusion_plot: Path = path_option("confusion.png to write.", file="confusion.png", kind="plots")
    top_losses: Path = path_option("top_losses.png to write.", file="top_losses.png", kind="plots")
    top_losses_table: Path = path_option("top_losses.csv to write.", file="top_losses.csv")
    most_confused: Path = path_option("most_confused.csv to write.", file="most_confused.csv")
    report: Path = path_option("report.md to write.", file="report.md")
    confusion_normalized_plot: Path | None = path_option(
        "confusion_normalized.png to write (rows sum to 1); not drawn when omitted.",
        optional=True,
        file="confusion_normalized.png",
        kind="plots",
    )
    per_class: Path | None = path_option(
        "per_class.csv to write (precision, recall, F1, support per class); not written when omitted.",
        optional=True,
        file="per_class.csv",
        kind="plots",
        plot={"template": "bar_horizontal_sorted", "x": "f1", "y": "class", "title": "F1 per class"},
        note='precision, recall, F1, support per class; the F1 bar chart is the top-level "F1 per class"',
    )
    # The test split's own tables and plots; with no test split, the tables hold their header row and the
    # plots say so (DVC expects every declared output).
    test_confusion: Path | None = path_option(
        "test_confusion.csv to write (actual, predicted of every test image); not written when omitted.",
        optional=True,
        file="test_confusion.csv",
        kind="plots",
        plot={"template": "confusion", "x": "predicted", "y": "actual", "title": "test confusion matrix"},
        note="the test split's own (a sentence saying there is none without one)",
    )
    test_confusion_plot: Path | None = path_option(
        "test_confusion.png to write; not drawn when omitted.", optional=True, file="test_confusion.png", kind="plots"
    )
    test_top_losses: Path | None = path_option(
        "test_top_losses.png to write; not drawn when omitted.", optional=True, file="test_top_losses.png", kind="plots"
    )
    test_top_losses_table: Path | None = path_option(
        "test_top_losses.csv to write; not written when omitted.", optional=True, file="test_top_losses.csv"
    )


@dataclass(frozen=True)
class Interpretation:
    """fastai's ClassificationInterpretation of the validation split, as tables."""

    matrix: np.ndarray  # (C, C) counts, actual x predicted
    confusion: pd.DataFrame  # actual, predicted of every image (confusion.csv)
    most_confused: pd.DataFrame
    top_losses: pd.DataFrame  # top_losses.csv
    top_positions: np.ndarray  # where those images are in the validation split


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    params, runtime = context.params, context.runtime
    which = params.evaluate.checkpoint
    checkpoint_path = _checkpoint_path(which, inputs)
    checkpoint = load_checkpoint(checkpoint_path)
    data = context.dataset(inputs, checkpoint.spec, training=False, with_test=True)
    _refuse_no_validation(data, inputs)
    model = to_device(checkpoint.model(), runtime.device).eval()
    views = Views.of(checkpoint.spec, params.train.augment)
    log_probabilities, metrics = score(model, data.valid, classes=data.classes, views=views, params=params)
    found = interpret_predictions(
        log_probabilities, data.valid, data.rows("valid"), classes=data.classes, settings=params.evaluate
    )
    tested = _score_test(model, data, views=views, params=params, metrics=metrics)
    # Draw every figure before writing anything, so a plotting failure leaves no new outputs.
    figures = _figures(found, tested, data, views=views, outputs=outputs)
    context.log.log_params({"checkpoint_path": str(checkpoint_path)})
    write_csv(outputs.confusion, found.confusion)
    write_csv(outputs.most_confused, found.most_confused)
    write_csv(outputs.top_losses_table, found.top_losses)
    write_test_tables(tested, outputs)
    if outputs.per_class is not None:  # not in metrics.json: 4 x 37 columns in `dvc exp show`
        actual, predicted = data.valid.targets.cpu().numpy(), log_probabilities.argmax(axis=1)
        write_csv(outputs.per_class, interpretation.per_class_metrics(actual, predicted, data.classes).reset_index())
    for figure_path, figure in figures.items():
        save_figure(figure_path, figure)
    write_text(
        outputs.report,
        render_report(
            metrics,
            found.most_confused,
            outputs=outputs,
            checkpoint_path=checkpoint_path,
            test_confused=tested.most_confused if tested else None,
        ),
    )
    write_json(outputs.metrics, metrics)
    champion = _log(context, metrics, outputs=outputs, checkpoint_path=checkpoint_path, index=inputs.index)
    summary = _summary(which, metrics, tta=params.evaluate.tta, tested=tested is not None)
    return summary + f" -> {outputs.metrics}" + (f"\n{champion}" if champion else "")


def _score_test(
    model: Classifier, data: Dataset, *, views: Views, params: Params, metrics: dict[str, Any]
) -> Interpretation | None:
    """The test split, scored after valid with the same model (nothing here looks at it to decide): its
    numbers join `metrics` as test_*, and its interpretation is returned. None without a test split."""
    if data.test is None:
        return None
    log_probabilities, test_metrics = score(model, data.test, classes=data.classes, views=views, params=params)
    metrics.update({TEST + name: value for name, value in test_metrics.items() if name != "checkpoint"})
    return interpret_predictions(
        log_probabilities, data.test, data.rows("test"), classes=data.classes, settings=params.evaluate
    )


def _figures(
    found: Interpretation, tested: Interpretation | None, data: Dataset, *, views: Views, outputs: Outputs
) -> dict[Path, Any]:
    """Every figure evaluate writes, drawn: valid's confusion matrices and top losses, and test's."""
    figures = draw(
        found,
        data.valid,
        classes=data.classes,
        views=views,
        confusion=outputs.confusion_plot,
        normalized=outputs.confusion_normalized_plot,
        top_losses=outputs.top_losses,
    )
    figures.update(draw_test(tested, data, views=views, outputs=outputs))
    return figures


def _checkpoint_path(which: str, inputs: Inputs) -> Path:
    """The checkpoint evaluate.checkpoint names: finetune's, or train-head's (which --head-model must then give)."""
    if which == "finetune":
        return inputs.finetune_model
    if inputs.head_model is None:
        raise PetpipeError("evaluate.checkpoint is train-head: pass train-head's model.pt as --head-model")
    return inputs.head_model


def _refuse_no_validation(data: Dataset, inputs: Inputs) -> None:
    if len(data.valid) == 0:
        raise PetpipeError(
            f"{inputs.index} has no validation images to evaluate; raise split.valid_pct "
            f"(or give split.file some valid rows) and rerun index-labels"
        )


def _log(
    context: Context, metrics: dict[str, Any], *, outputs: Outputs, checkpoint_path: Path, index: Path
) -> str | None:
    """metrics.json's numbers and the outputs to MLflow; the same numbers on the MLflow model that holds these
    weights (valid and test, each with its dataset) and the champion alias (tracking.promote), elected on
    valid's numbers alone. Returns the line saying what the alias did, if anything."""
    numbers = {name: float(value) for name, value in metrics.items() if isinstance(value, float)}
    context.log.log_metrics(numbers)
    context.log.log_artifacts(_output_paths(outputs))
    return context.log.log_evaluation(checkpoint_path, numbers, index=index)


def _summary(which: str, metrics: dict[str, Any], *, tta: bool, tested: bool) -> str:
    """evaluate's summary line, but where metrics.json went."""
    summary = (
        f"evaluate ({which}): {metrics['images']} valid images, accuracy {metrics['accuracy']:.4f}, "
        f"balanced {metrics['balanced_accuracy']:.4f}, error rate {metrics['error_rate']:.4f}, "
        f"top-5 {metrics['top5_accuracy']:.4f}, loss {metrics['loss']:.4f}"
    )
    if tta:
        summary += f"; with TTA accuracy {metrics['tta_accuracy']:.4f}"
    if tested:
        summary += (
            f"; test ({metrics[TEST + 'images']} images, never tuned on): accuracy "
            f"{metrics[TEST + 'accuracy']:.4f}, balanced {metrics[TEST + 'balanced_accuracy']:.4f}, "
            f"loss {metrics[TEST + 'loss']:.4f}"
        )
    return summary


@timing.timed("predict")
def score(
    model: Classifier, images: ImageSet, *, classes: list[str], views: Views, params: Params
) -> tuple[np.ndarray, dict[str, Any]]:
    """One split's log-probabilities (N, C) and metrics.json's numbers for it (with TTA's beside, if asked)."""
    logits = predict(model, images, batch_size=params.train.batch_size, views=views)
    log_probabilities = torch.log_softmax(logits.double(), dim=1).numpy()  # (N, C)
    targets = images.targets.cpu().numpy()
    metrics: dict[str, Any] = {
        "checkpoint": params.evaluate.checkpoint,
        "images": len(targets),
        **interpretation.classification_metrics(log_probabilities, targets, classes),
    }
    if params.evaluate.tta:
        tta = tta_log_probabilities(
            model,
            images,
            views=views,
            batch_size=params.train.batch_size,
            seed=params.train.seed,
            plain=log_probabilities,
        )
        tta_metrics = interpretation.classification_metrics(tta, targets, classes)
        metrics.update({metric_table.TTA + name: tta_metrics[name] for name in metric_table.NAMES})
    return log_probabilities, metrics


def interpret_predictions(
    log_probabilities: np.ndarray, images: ImageSet, rows: pd.DataFrame, *, classes: list[str], settings: EvaluateParams
) -> Interpretation:
    """fastai's ClassificationInterpretation of one split: `rows` are index.csv's rows of `images`."""
    targets = images.targets.cpu().numpy()
    predicted = log_probabilities.argmax(axis=1)
    matrix = interpretation.confusion_matrix(targets, predicted, num_classes=len(classes))
    return Interpretation(
        matrix=matrix,
        confusion=pd.DataFrame({"actual": rows["label"], "predicted": [classes[i] for i in predicted]}),
        most_confused=interpretation.most_confused(matrix, classes, min_count=settings.min_count),
        top_losses=interpretation.top_losses_table(
            log_probabilities, targets, paths=list(rows["path"]), classes=classes, k=settings.top_losses
        ),
        top_positions=interpretation.top_losses(
            interpretation.per_image_losses(log_probabilities, targets), k=settings.top_losses
        ),
    )


@timing.timed("plots")
def draw(
    found: Interpretation,
    images: ImageSet,
    *,
    classes: list[str],
    views: Views,
    confusion: Path | None,
    normalized: Path | None,
    top_losses: Path | None,
) -> dict[Path, Any]:
    """The figures of one split's interpretation, by output path (None: not drawn)."""
    figures = {}
    if confusion is not None:
        figures[confusion] = plots.plot_confusion(found.matrix, classes)
    if normalized is not None:
        figures[normalized] = plots.plot_confusion(found.matrix, classes, normalize=True)
    if top_losses is not None:
        positions = torch.as_tensor(found.top_positions, device=images.pixels.device)
        losses = found.top_losses
        figures[top_losses] = plots.plot_top_losses(
            views.cropped(images.pixels[positions].cpu()),
            predicted=list(losses["predicted"]),
            actual=list(losses["actual"]),
            losses=list(losses["loss"]),
            probabilities=list(losses["probability_actual"]),
        )
    return figures


def draw_test(tested: Interpretation | None, data: Dataset, *, views: Views, outputs: Outputs) -> dict[Path, Any]:
    """The test split's confusion matrix and top losses; without a test split, figures that say so."""
    if tested is not None:
        assert data.test is not None
        return draw(
            tested,
            data.test,
            classes=data.classes,
            views=views,
            confusion=outputs.test_confusion_plot,
            normalized=None,
            top_losses=outputs.test_top_losses,
        )
    return {
        path: plots.plot_message(NO_TEST_SPLIT)
        for path in (outputs.test_confusion_plot, outputs.test_top_losses)
        if path is not None
    }


NO_TEST_SPLIT = "No test split: set split.test_pct above 0, or add a test/ folder beside train/ and valid/"


def write_test_tables(tested: Interpretation | None, outputs: Outputs) -> None:
    """test_confusion.csv and test_top_losses.csv; their header row alone without a test split."""
    tables = (
        (outputs.test_confusion, tested.confusion if tested else pd.DataFrame(columns=["actual", "predicted"])),
        (
            outputs.test_top_losses_table,
            tested.top_losses if tested else pd.DataFrame(columns=interpretation.TOP_LOSSES_COLUMNS),
        ),
    )
    for path, table in tables:
        if path is not None:
            write_csv(path, table)


@torch.inference_mode()
def tta_log_probabilities(
    model: Classifier,
    images: ImageSet,
    *,
    views: Views,
    batch_size: int,
    seed: int,
    plain: np.ndarray,
    count: int = TTA_VIEWS,
    beta: float = TTA_BETA,
) -> np.ndarray:
    """fastai's tta: mean probabilities of `count` augmented passes, blended with the plain view.

    p = (1 - beta) * mean(augmented) + beta * plain; returns log p (N, C).
    The augmentation is the training one, drawn from a generator seeded by `seed`.
    """
    model.eval()
    device = images.pixels.device
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(plain.shape, dtype=torch.float64)
    for _ in range(count):
        for rows in batch_indices(len(images), batch_size, shuffle=False, drop_last=False):
            batch = views.train(images.pixels[rows.to(device)], generator)
            with autocast(device):
                logits = model(batch)
            total[rows] += torch.softmax(logits.double(), dim=1).cpu()
    blended = (1 - beta) * (total / count) + beta * torch.from_numpy(np.exp(plain))
    return torch.log(blended.clamp_min(torch.finfo(torch.float64).tiny)).numpy()


def _output_paths(outputs: Outputs) -> list[Path]:
    return [Path(path) for path in vars(outputs).values() if path is not None]


def _link(path: Path, report: Path) -> str:
    """A link from report.md to an output, relative when they share a folder tree."""
    return Path(os.path.relpath(Path(path).resolve(), Path(report).resolve().parent)).as_posix()


def render_report(
    metrics: dict[str, Any],
    confused: pd.DataFrame,
    *,
    outputs: Outputs,
    checkpoint_path: Path,
    test_confused: pd.DataFrame | None = None,
) -> str:
    """report.md: one page with the headline numbers of valid and test side by side, the most confused pairs
    and every plot."""
    lines = _report_numbers(metrics, checkpoint_path)
    lines += _report_confused({"valid": confused, "test": test_confused})
    lines += _report_links(outputs, test=TEST + "accuracy" in metrics)
    return "\n".join(lines) + "\n"


def _report_numbers(metrics: dict[str, Any], checkpoint_path: Path) -> list[str]:
    """report.md's title and its table of the headline metrics: valid, test, and each with TTA if it ran."""
    tta, test = metric_table.TTA + "accuracy" in metrics, TEST + "accuracy" in metrics
    columns = [
        ("valid", ""),
        *([("valid, TTA", metric_table.TTA)] if tta else []),
        *([("test", TEST), *([("test, TTA", TEST + metric_table.TTA)] if tta else [])] if test else []),
    ]
    lines = [
        f"# Evaluation: {metrics['checkpoint']} model on {metrics['images']} validation images"
        + (f" and {metrics[TEST + 'images']} test images" if test else ""),
        "",
        f"Checkpoint: `{checkpoint_path}`.",
        "",
        "| metric | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for metric in metric_table.HEADLINE:
        numbers = " | ".join(f"{metrics[prefix + metric.name]:.4f}" for _, prefix in columns)
        lines.append(f"| {metric.described} | {numbers} |")
    lines += [
        "",
        "Valid is the split the epoch tables, lr-find and the `champion` election saw; "
        + (
            "test is the split nothing tuned on: its numbers are the ones to report."
            if test
            else "there is no test split (split.test_pct 0 and no test/ folder), so these numbers "
            "are somewhat optimistic."
        ),
    ]
    if tta:
        lines += [
            "",
            f"TTA: fastai's `tta` ({TTA_VIEWS} augmented views blended with the plain view, "
            f"beta {TTA_BETA}); the plain numbers are the ones to compare across runs.",
        ]
    return lines


def _report_confused(splits: dict[str, pd.DataFrame | None]) -> list[str]:
    """report.md's most confused pairs of each split that was scored."""
    lines = []
    for title, pairs in splits.items():
        if pairs is None:
            continue
        lines += ["", f"## Most confused pairs, {title} (top {REPORT_CONFUSED})", ""]
        if pairs.empty:
            lines.append("No confusion at or above evaluate.min_count.")
        else:
            lines += ["| actual | predicted | count |", "|---|---|---:|"]
            lines += [
                f"| {row.actual} | {row.predicted} | {row.count} |" for row in pairs.head(REPORT_CONFUSED).itertuples()
            ]
    return lines


def _report_links(outputs: Outputs, *, test: bool) -> list[str]:
    """report.md's plots, shown, and its tables, linked (paths relative to the report)."""
    lines = ["", "## Plots and tables", ""]
    entries = [
        (outputs.confusion_plot, "confusion matrix (counts)"),
        (outputs.confusion_normalized_plot, "confusion matrix (rows normalised)"),
        (outputs.top_losses, "top losses (prediction/actual/loss/probability of actual)"),
        *(
            [
                (outputs.test_confusion_plot, "test confusion matrix (counts)"),
                (outputs.test_top_losses, "test top losses"),
            ]
            if test
            else []
        ),
    ]
    for path, title in entries:
        if path is not None:
            lines += [f"### {title[0].upper() + title[1:]}", "", f"![{title}]({_link(path, outputs.report)})", ""]
    tables = [
        (outputs.metrics, "metrics.json: the headline numbers (`dvc metrics show`, `dvc exp show`)"),
        (outputs.per_class, "per_class.csv: precision, recall, F1 and support per class (dvc plots)"),
        (outputs.confusion, "confusion.csv: actual and predicted class of every image (dvc plots)"),
        (outputs.most_confused, "most_confused.csv: every confused pair"),
        (outputs.top_losses_table, "top_losses.csv: the images above, as a table"),
        (outputs.test_confusion, "test_confusion.csv: actual and predicted class of every test image"),
        (outputs.test_top_losses_table, "test_top_losses.csv: the test split's top losses, as a table"),
    ]
    return lines + [
        f"- [{Path(path).name}]({_link(path, outputs.report)}): {text.split(': ', 1)[1]}"
        for path, text in tables
        if path is not None
    ]
