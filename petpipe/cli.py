"""The `petpipe` command line: one thin click command per pipeline stage, plus tools.

Each stage command parses paths (exactly those dvc.yaml declares), loads
params.yaml once, calls its stage's `run(params, inputs, outputs)` and reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from petpipe import stages
from petpipe.errors import Interrupted, PetpipeError
from petpipe.params import ParamsError, load_params
from petpipe.pipeline import option_name
from petpipe.utils.atomic import WriteFailed

PathOption = click.Path(path_type=Path)
ExistingPath = click.Path(path_type=Path, exists=True)
MODEL_HELP = (
    "A model.pt checkpoint, a bundle folder written by `petpipe export`, or a registered model: "
    "models:/<name>@<alias> (e.g. models:/petpipe-classifier@champion) or models:/<name>/<version>."
)


def _run_stage(stage: ModuleType, params_path: Path, paths: dict[str, Any]) -> None:
    """Load params.yaml, call the stage's run with its Inputs and Outputs, print its summary."""
    inputs = {field.name: paths[field.name] for field in dataclasses.fields(stage.Inputs)}
    outputs = {field.name: paths[field.name] for field in dataclasses.fields(stage.Outputs)}
    name = stage.STAGE.name
    with _user_errors(name):
        params = load_params(params_path)
        summary = stage.run(params, stage.Inputs(**inputs), stage.Outputs(**outputs), command=True)
    if summary:
        click.echo(summary)


INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a process Ctrl-C ended


@contextlib.contextmanager
def _user_errors(stage: str | None = None) -> Iterator[None]:
    """Mistakes a user can fix, a full disk and Ctrl-C become one line (click's `Error: ...`), not a traceback;
    `stage` names the stage in a write that failed and in an interruption."""
    try:
        yield
    except WriteFailed as error:
        raise click.ClickException(f"{stage}: {error}" if stage else str(error)) from None
    except (ParamsError, PetpipeError) as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # a read error, a refused write outside petpipe.utils.atomic: which file, not a traceback
        where = f"{error.filename}: " if error.filename else ""  # some errors name no file (shutil's)
        raise click.ClickException(
            f"{where}{error.strerror or error}; outputs written before this "
            f"are complete, the one being written was not replaced"
        ) from None
    except KeyboardInterrupt as error:  # click would print a bare `Aborted!`
        line = (
            str(error)
            if isinstance(error, Interrupted)
            else (
                f"{stage or 'petpipe'}: interrupted; outputs written before this are complete, the one being written "
                f"was not replaced"
            )
        )
        click.echo(f"{line}", err=True)
        raise click.exceptions.Exit(INTERRUPTED) from None


params_option = click.option(
    "--params",
    "params_path",
    type=PathOption,
    default=Path("params.yaml"),
    show_default=True,
    help="The params file (dvc.yaml passes the project's).",
)


ENVIRONMENT = """\b
Environment:
  PETPIPE_CACHE_DIR    where decoded pixels are cached (default .petpipe/cache at the project root: DVC_ROOT)
  PETPIPE_CACHE_GB     bound of that folder in GB, least recently used first (default 20)
  PETPIPE_DOWNLOAD_DIR where fetch keeps downloads (default .petpipe/downloads at the project root)
  PETPIPE_MAX_ENTRY_MB largest file fetch extracts from an archive, in MB (default 200)
  PETPIPE_MAX_RATIO    most an archive may inflate, uncompressed / compressed (default 100)
  PETPIPE_TRACKING     off: log nothing to MLflow
  MLFLOW_TRACKING_URI  where runs go (default sqlite:///mlflow.db in the project)
"""


class _Pipeline(click.Group):
    """The tools below, and one command per stage built from its module on first use (so that
    `petpipe fetch` never imports torch)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *stages.ORDER})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _stage_command(name) if name in stages.ORDER else super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list, with each stage's summary read from its docstring without importing it."""
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [
            (
                name,
                _stage_help(name)[1] if name in stages.ORDER else self.get_command(ctx, name).get_short_help_str(limit),
            )
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Pipeline, context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def main(verbose: bool) -> None:
    """petpipe: the fastai Oxford-IIIT Pet tutorial as a reproducible DVC pipeline.

    Run the whole pipeline with `dvc repro`; each stage below is one DVC stage.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def _stage_help(name: str) -> tuple[str, str]:
    """The stage module's docstring as click help (its example command kept verbatim), and a short help."""
    first, *rest = stages.docstring(name).split("\n\n")
    summary = first.split(": ", 1)[-1]
    summary = summary[0].upper() + summary[1:]
    paragraphs = [("\b\n" + paragraph) if paragraph.startswith("    ") else paragraph for paragraph in rest]
    return "\n\n".join([summary, *paragraphs]), summary.split(";")[0].rstrip(".")


def _path_options(stage: ModuleType) -> list[click.Option]:
    """One --option per field of the stage's Inputs (must exist) and Outputs (to write)."""
    options = []
    for dataclass_, kind in ((stage.Inputs, ExistingPath), (stage.Outputs, PathOption)):
        for field in dataclasses.fields(dataclass_):
            # An optional path defaults to None (not written); a required one has no default at all.
            defaults = {"default": None} if field.default is None else {"required": True}
            options.append(
                click.Option([option_name(field), field.name], type=kind, help=field.metadata["help"], **defaults)
            )
    return options


def _stage_command(name: str) -> click.Command:
    stage = stages.load(name)
    help_text, short_help = _stage_help(name)

    def callback(params_path: Path, **paths: Any) -> None:
        _run_stage(stage, params_path, paths)

    params = [*params_option(lambda: None).__click_params__, *_path_options(stage)]
    return click.Command(name, callback=callback, params=params, help=help_text, short_help=short_help)


# ---------------------------------------------------------------- tools outside the pipeline


@main.command("predict")
@click.argument("paths", nargs=-1, required=True, type=PathOption)
@click.option("--model", default="stages/finetune/model.pt", show_default=True, help=MODEL_HELP)
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Labels per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of tab-separated lines.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def predict_command(
    paths: tuple[Path, ...], model: str, top_k: int, as_json: bool, batch_size: int, device: str
) -> None:
    """Top-k labels with probabilities for each image; folders are searched for images.

    An unreadable file gets an `error: PATH: REASON` line on stderr, the rest are
    still predicted, and the exit status is 1.
    """
    from petpipe.inference.predict import collect_images, format_prediction, load_predictor, model_file, predict_files

    try:
        predictor = load_predictor(model_file(model), device=device)
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


@main.command("dvc-yaml")
@click.option(
    "--out", type=PathOption, default=Path("dvc.yaml"), show_default=True, help="The dvc.yaml to write (or check)."
)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when --out differs from what the stages declare.")
def dvc_yaml_command(out: Path, check: bool) -> None:
    """Write dvc.yaml from the stages' declarations: each stage's Inputs, Outputs and STAGE in
    petpipe/stages/<stage>.py, and the modules that can change its outputs."""
    from petpipe import dvc_yaml
    from petpipe.utils.file_formats import write_text

    text = dvc_yaml.render()
    current = out.read_text(encoding="utf-8") if out.is_file() else None
    if check:
        if current != text:
            raise click.ClickException(f"{out} differs from the stages' declarations: run `petpipe dvc-yaml`")
        click.echo(f"{out} is what the stages declare")
        return
    with _user_errors():
        write_text(out, text)
    click.echo(f"{out}: {'unchanged' if current == text else 'written'} ({len(stages.ORDER)} stages)")


@main.command("show-batch")
@params_option
@click.option(
    "--images", type=ExistingPath, default=Path("stages/fetch/images"), show_default=True, help="fetch's images folder."
)
@click.option(
    "--index",
    type=ExistingPath,
    default=Path("stages/index-labels/index.csv"),
    show_default=True,
    help="index-labels' index.csv.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "valid", "test"]),
    default="train",
    show_default=True,
    help="train: augmented as in training; valid, test: center crops.",
)
@click.option("--n", "count", type=click.IntRange(min=1), default=9, show_default=True, help="Images to show.")
@click.option("--out", type=PathOption, default=Path("show_batch.png"), show_default=True, help="PNG to write.")
def show_batch_command(params_path: Path, images: Path, index: Path, split: str, count: int, out: Path) -> None:
    """Draw a batch as the model sees it (fastai's show_batch), with params.yaml's sizes and augmentation."""
    from petpipe.data.image_index import load_index
    from petpipe.data.views import Views
    from petpipe.interpret.draw_batch import show_batch_figure
    from petpipe.utils.file_formats import save_figure

    with _user_errors():
        params = load_params(params_path)
        views = Views.for_display(params.model, params.train.augment)
        figure = show_batch_figure(
            load_index(index), images, split=split, count=count, views=views, seed=params.train.seed
        )
        save_figure(out, figure)
    click.echo(f"show-batch: {split} images -> {out}")


@main.command("serve")
@params_option
@click.option("--model", default="stages/finetune/model.pt", show_default=True, help=MODEL_HELP)
@click.option(
    "--index",
    type=PathOption,
    default=Path("stages/index-labels/index.csv"),
    show_default=True,
    help="index-labels' index.csv: the images and labels the Clean page shows.",
)
@click.option(
    "--images", type=PathOption, default=Path("stages/fetch/images"), show_default=True, help="fetch's images folder."
)
@click.option(
    "--evaluate",
    type=PathOption,
    default=Path("stages/evaluate"),
    show_default=True,
    help="evaluate's folder: the Results page's metrics, confusion matrix and top losses. The Clean page's "
    "Suspects and Duplicates are read from the audit stage's folder beside it (stages/audit).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens the page (and label cleaning) to the network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Largest photo the Try it page accepts, in MB.",
)
def serve_command(
    params_path: Path, model: str, index: Path, images: Path, evaluate: Path, host: str, port: int, max_upload_mb: float
) -> None:
    """A web page to try the model on photos, read the evaluation and clean labels (fastai's cleaner).

    Clean's decisions go to the labels.corrections CSV of --params; commit it
    and run `dvc repro`: index-labels applies them and what they change retrains.
    """
    from petpipe.inference.predict import model_file
    from petpipe.serve import ServeSettings, create_app, listen, run_server

    with _user_errors():
        params = load_params(params_path)
        # labels.corrections is relative to the project folder, where params.yaml and dvc.yaml are.
        settings = ServeSettings(
            model=model_file(model),
            index=index,
            images=images,
            evaluate=evaluate,
            audit=evaluate.parent / "audit",  # the stages' folders are siblings
            corrections=params_path.parent / params.labels.corrections,
            max_upload_bytes=int(max_upload_mb * 2**20),
        )
        app = create_app(settings, host=host)
        sock = listen(host, port)
    address = sock.getsockname()
    url_host = f"[{address[0]}]" if ":" in address[0] else address[0]
    click.echo(
        f"petpipe serve: http://{url_host}:{address[1]}/ (Ctrl-C to stop); Clean saves to {settings.corrections}"
    )
    run_server(app, sock)


if __name__ == "__main__":
    main()
