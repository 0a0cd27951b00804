"""The `petpipe` command line: one thin click command per pipeline stage, plus tools.

Each stage command parses paths (exactly those dvc.yaml declares), loads
params.yaml once, calls its stage's `run(params, inputs, outputs)` and reports.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import click

from petpipe.errors import PetpipeError
from petpipe.params import ParamsError, load_params

PathOption = click.Path(path_type=Path)
ExistingPath = click.Path(path_type=Path, exists=True)


def _run_stage(module_name: str, params_path: Path, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    stage = importlib.import_module(f"petpipe.stages.{module_name}")
    try:
        params = load_params(params_path)
        summary = stage.run(params, stage.Inputs(**inputs), stage.Outputs(**outputs))
    except (ParamsError, PetpipeError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # a full disk, a read-only folder: say which file, not a traceback
        raise click.ClickException(f"{error.filename or ''}: {error.strerror or error}; outputs written before this "
                                   f"are complete, the one being written was not replaced") from None
    if summary:
        click.echo(summary)


params_option = click.option(
    "--params", "params_path", type=PathOption, default=Path("params.yaml"), show_default=True,
    help="The params file (dvc.yaml passes the project's).",
)


ENVIRONMENT = """\b
Environment:
  PETPIPE_CACHE_DIR    where decoded pixels are cached (default .petpipe/cache)
  PETPIPE_CACHE_GB     bound of that folder in GB, least recently used first (default 20)
  PETPIPE_TRACKING     off: log nothing to MLflow
  MLFLOW_TRACKING_URI  where runs go (default sqlite:///mlflow.db in the project)
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def main(verbose: bool) -> None:
    """petpipe: the fastai Oxford-IIIT Pet tutorial as a reproducible DVC pipeline.

    Run the whole pipeline with `dvc repro`; each stage below is one DVC stage.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


@main.command()
@params_option
@click.option("--out", "images", type=PathOption, required=True, help="Folder to fill with the raw images.")
def fetch(params_path: Path, images: Path) -> None:
    """Download or copy the photos named by data.source into --out."""
    _run_stage("fetch", params_path, {}, {"images": images})


@main.command("index-labels")
@params_option
@click.option("--images", type=ExistingPath, required=True, help="fetch's images folder.")
@click.option("--index", type=PathOption, required=True, help="index.csv to write.")
@click.option("--classes", type=PathOption, required=True, help="classes.json to write.")
@click.option("--report", type=PathOption, required=True, help="report.json to write.")
@click.option("--show-batch", type=PathOption, required=True, help="show_batch.png to write.")
@click.option("--class-counts", type=PathOption, required=True, help="class_counts.png to write.")
def index_labels(params_path: Path, images: Path, **outputs: Path) -> None:
    """Label every image, split train/valid, report unusable files, draw a batch."""
    _run_stage("index_labels", params_path, {"images": images}, outputs)


def _training_options(command: Any) -> Any:
    for option in reversed([
        click.option("--images", type=ExistingPath, required=True, help="fetch's images folder."),
        click.option("--index", type=ExistingPath, required=True, help="index-labels' index.csv."),
    ]):
        command = option(command)
    return command


def _trained_outputs(command: Any) -> Any:
    for option in reversed([
        click.option("--model", type=PathOption, required=True, help="model.pt checkpoint to write."),
        click.option("--metrics", type=PathOption, required=True, help="metrics.json to write."),
        click.option("--history", type=PathOption, required=True, help="history.csv to write."),
        click.option("--plot", type=PathOption, required=True, help="Training-curve PNG to write."),
    ]):
        command = option(command)
    return command


@main.command("train-head")
@params_option
@_training_options
@_trained_outputs
def train_head(params_path: Path, images: Path, index: Path, **outputs: Path) -> None:
    """Train a new head on the frozen pretrained body (one-cycle)."""
    _run_stage("train_head", params_path, {"images": images, "index": index}, outputs)


@main.command("lr-find")
@params_option
@_training_options
@click.option("--checkpoint", type=ExistingPath, required=True, help="train-head's model.pt.")
@click.option("--result", type=PathOption, required=True, help="lr_find.json to write.")
@click.option("--curve", type=PathOption, required=True, help="lr_find.csv to write.")
@click.option("--plot", type=PathOption, required=True, help="lr_find.png to write.")
def lr_find(params_path: Path, images: Path, index: Path, checkpoint: Path, **outputs: Path) -> None:
    """Sweep the learning rate on the unfrozen model; suggest one for finetune."""
    _run_stage("lr_find", params_path, {"images": images, "index": index, "checkpoint": checkpoint}, outputs)


@main.command()
@params_option
@_training_options
@click.option("--checkpoint", type=ExistingPath, required=True, help="train-head's model.pt.")
@click.option("--lr-find", "lr_find_result", type=ExistingPath, required=True, help="lr-find's lr_find.json.")
@_trained_outputs
def finetune(params_path: Path, images: Path, index: Path, checkpoint: Path, lr_find_result: Path,
             **outputs: Path) -> None:
    """Unfreeze and train everything with discriminative learning rates (one-cycle)."""
    inputs = {"images": images, "index": index, "checkpoint": checkpoint, "lr_find": lr_find_result}
    _run_stage("finetune", params_path, inputs, outputs)


@main.command()
@params_option
@_training_options
@click.option("--finetune-model", type=ExistingPath, required=True, help="finetune's model.pt.")
@click.option("--head-model", type=ExistingPath, required=True, help="train-head's model.pt.")
@click.option("--metrics", type=PathOption, required=True, help="metrics.json to write.")
@click.option("--confusion", type=PathOption, required=True, help="confusion.csv to write.")
@click.option("--confusion-plot", type=PathOption, required=True, help="confusion.png to write.")
@click.option("--confusion-normalized-plot", type=PathOption, default=None,
              help="confusion_normalized.png to write (rows sum to 1); not drawn when omitted.")
@click.option("--top-losses", type=PathOption, required=True, help="top_losses.png to write.")
@click.option("--top-losses-table", type=PathOption, required=True, help="top_losses.csv to write.")
@click.option("--most-confused", type=PathOption, required=True, help="most_confused.csv to write.")
@click.option("--report", type=PathOption, required=True, help="report.md to write.")
def evaluate(params_path: Path, images: Path, index: Path, finetune_model: Path, head_model: Path,
             **outputs: Path) -> None:
    """Interpret the model on the validation split: metrics, confusion, top losses."""
    inputs = {"images": images, "index": index, "finetune_model": finetune_model, "head_model": head_model}
    _run_stage("evaluate", params_path, inputs, outputs)


# ---------------------------------------------------------------- tools outside the pipeline


@main.command("predict")
@click.argument("paths", nargs=-1, required=True, type=PathOption)
@click.option("--model", type=PathOption, default=Path("stages/finetune/model.pt"), show_default=True,
              help="A model.pt checkpoint, or a bundle folder written by `petpipe export`.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Labels per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of tab-separated lines.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def predict_command(paths: tuple[Path, ...], model: Path, top_k: int, as_json: bool, batch_size: int,
                    device: str) -> None:
    """Top-k labels with probabilities for each image; folders are searched for images.

    An unreadable file gets an `error: PATH: REASON` line on stderr, the rest are
    still predicted, and the exit status is 1.
    """
    from petpipe.predict import collect_images, format_prediction, load_predictor, predict_files

    try:
        predictor = load_predictor(model, device=device)
        files = collect_images(paths)
        if not files:
            raise PetpipeError(f"no image files found in {', '.join(map(str, paths))}")
        results = []
        for prediction in predict_files(predictor, files, top_k=top_k, batch_size=batch_size):
            if prediction.error:
                click.echo(f"error: {prediction.path}: {prediction.error}", err=True)
            elif not as_json:
                click.echo(format_prediction(prediction))
            results.append(prediction)
    except PetpipeError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps([prediction.to_dict() for prediction in results], indent=2))
    if any(prediction.error for prediction in results):
        raise SystemExit(1)


@main.command("export")
@click.option("--model", type=PathOption, default=Path("stages/finetune/model.pt"), show_default=True,
              help="The model.pt checkpoint to export.")
@click.option("--out", type=PathOption, required=True,
              help="Bundle folder to write: model.onnx and bundle.json (replaced whole if it exists).")
def export_command(model: Path, out: Path) -> None:
    """Export a checkpoint as a pickle-free ONNX bundle that `petpipe predict --model` accepts."""
    from petpipe.predict import export_bundle

    try:
        manifest = export_bundle(model, out)
    except PetpipeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"exported {manifest['arch']} ({len(manifest['classes'])} classes) from {model} -> {out}")


@main.command("show-batch")
@params_option
@click.option("--images", type=ExistingPath, default=Path("stages/fetch/images"), show_default=True,
              help="fetch's images folder.")
@click.option("--index", type=ExistingPath, default=Path("stages/index-labels/index.csv"), show_default=True,
              help="index-labels' index.csv.")
@click.option("--split", type=click.Choice(["train", "valid"]), default="train", show_default=True,
              help="train: augmented as in training; valid: center crops.")
@click.option("--n", "count", type=click.IntRange(min=1), default=9, show_default=True, help="Images to show.")
@click.option("--out", type=PathOption, default=Path("show_batch.png"), show_default=True, help="PNG to write.")
def show_batch_command(params_path: Path, images: Path, index: Path, split: str, count: int, out: Path) -> None:
    """Draw a batch as the model sees it (fastai's show_batch), with params.yaml's sizes and augmentation."""
    from petpipe.atomic import save_figure
    from petpipe.data import load_index
    from petpipe.show_batch import show_batch_figure

    try:
        params = load_params(params_path)
        figure = show_batch_figure(load_index(index), images, split=split, count=count,
                                   presize=params.model.presize, size=params.model.img_size,
                                   augment=params.train.augment, seed=params.train.seed)
    except (ParamsError, PetpipeError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # a full disk, a read-only folder: say which file, not a traceback
        raise click.ClickException(f"{error.filename or ''}: {error.strerror or error}; outputs written before this "
                                   f"are complete, the one being written was not replaced") from None
    save_figure(out, figure)
    click.echo(f"show-batch: {split} images -> {out}")


if __name__ == "__main__":
    main()
