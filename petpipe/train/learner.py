"""A training stage's fit with everything around it: resume after a kill, per-epoch logging, the outputs.

train-head and finetune each describe their fit (a `Phase`) and what to record
(a `Record`), then call `fit_and_save` inside the stage's run (petpipe/runner.py: its
MLflow run, runtime and seed). Under torchrun every rank trains and rank 0 alone
writes files and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from petpipe.data.dataset import Dataset
from petpipe.data.views import Views
from petpipe.errors import Interrupted
from petpipe.interpret import plots
from petpipe.model.backbones import Classifier
from petpipe.model.checkpoint import Checkpoint, save_checkpoint
from petpipe.model.spec import ModelSpec
from petpipe.params import Params, TrainParams
from petpipe.pipeline import path_option
from petpipe.runner import Context
from petpipe.train import memory
from petpipe.train.distributed import barrier
from petpipe.train.fit_loop import Criterion, FitHooks, FitState, Phase, fit
from petpipe.train.hardware import Runtime, to_device
from petpipe.train.levers import choose_levers
from petpipe.train.memory import MemoryEstimate
from petpipe.train.resume import ResumeFile
from petpipe.utils import timing
from petpipe.utils.atomic import WriteFailed, display
from petpipe.utils.file_formats import save_figure, write_csv, write_json
from petpipe.utils.progress import EpochTable, progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedOutputs:
    """The four outputs of train-head and finetune."""

    model: Path = path_option("model.pt checkpoint to write.", file="model.pt")
    metrics: Path = path_option("metrics.json to write.", file="metrics.json", kind="metrics")
    history: Path = path_option(
        "history.csv to write.",
        file="history.csv",
        kind="plots",
        plot={"x": "epoch", "y": "accuracy", "title": "valid accuracy per epoch"},
    )
    plot: Path = path_option("Training-curve PNG to write.", file="training.png", kind="plots")


@dataclass(frozen=True)
class Learner:
    """fastai's Learner for one stage: the stage's context (params, MLflow run, runtime), the model and
    its spec, the data."""

    context: Context
    model: Classifier
    spec: ModelSpec
    data: Dataset
    size_ratio: float = 1.0  # training crops' side as a fraction of spec.img_size (finetune.size_ratio)

    @property
    def stage(self) -> str:
        return self.context.stage

    @property
    def params(self) -> Params:
        return self.context.params

    @property
    def runtime(self) -> Runtime:
        return self.context.compute.runtime

    @property
    def settings(self) -> TrainParams:
        """params.train: what every training stage shares."""
        return self.params.train

    @property
    def criterion(self) -> Criterion:
        """The loss (fastai's loss_func): cross-entropy, weighted per class as train.class_weights says."""
        return Criterion.of(self.settings, self.data)

    @property
    def views(self) -> Views:
        return Views.of(self.spec, self.settings.augment, size_ratio=self.size_ratio)

    def checkpoint(
        self, used: dict[str, Any], history: list[dict[str, float]], resume: dict[str, Any] | None = None
    ) -> Checkpoint:
        return Checkpoint.of(self.model, self.spec, stage=self.stage, params=used, history=history, resume=resume)


@dataclass(frozen=True)
class Record:
    """What a training stage records of its fit."""

    used: dict[str, Any]  # the params the result depends on (resume key, checkpoint, MLflow params)
    index: Path  # index-labels' index.csv: the model's dataset in MLflow
    inputs: list[Path]  # files the result depends on besides the images (resume key)
    outputs: TrainedOutputs
    title: str  # of the training-curve plot
    register_as: str | None = None  # MLflow registered model name for the logged model


@dataclass(frozen=True)
class Fitted:
    """What a training stage's fit returns: its metrics (as in metrics.json) and what its memory cost."""

    metrics: dict[str, Any]
    memory: MemoryEstimate | None  # the estimate made before the first batch (CPU), None on a GPU


@dataclass
class Progress:
    """Where a fit stands, for the one line that says what was kept when it stops early."""

    resume_file: ResumeFile
    epochs: int
    kept: int = 0  # the last completed epoch in the resume file

    def kept_words(self) -> str:
        if self.kept == 0:
            return "no epoch was completed, so none is kept"
        return (
            f"the last completed epoch ({self.kept}) is kept in {display(self.resume_file.path)}, "
            f"and dvc repro resumes from it"
        )


def fit_and_save(learner: Learner, phase: Phase, record: Record) -> Fitted:
    """Fit (resuming an interrupted run of the same stage, params and inputs), log, write the outputs.

    Returns the stage's metrics and its memory estimate. A full disk, a GPU out of memory or Ctrl-C
    ends it in one line that says what was kept (see `_stopping`).
    """
    resume_file = ResumeFile(learner.stage, params=record.used, inputs=record.inputs)
    resumed = resume_file.load()
    if resumed is not None:
        learner.model.load_state_dict(resumed.state_dict)
    progress = Progress(resume_file, phase.epochs, kept=resumed.resume["epoch"] if resumed else 0)
    guess = _memory_check(learner, phase, killed_before=resumed is not None and resume_file.stopped_silently())
    with _stopping(learner, progress):
        metrics = _fit_and_write(learner, phase, record, progress, resumed)
    return Fitted(metrics, guess)


def _fit_and_write(
    learner: Learner, phase: Phase, record: Record, progress: Progress, resumed: Checkpoint | None
) -> dict[str, Any]:
    main = learner.runtime.world.is_main
    to_device(learner.model, learner.runtime.device)
    runtime = choose_levers(learner.runtime, learner.model, learner.data.train, learner.views, learner.settings)
    log = learner.context.log
    log.log_params({**record.used, "levers": dataclasses.asdict(runtime.levers)})
    table = EpochTable(learner.stage, phase.epochs)
    criterion = learner.criterion
    if main:
        if criterion.weight is not None:
            table.show(f"{learner.stage}: loss {criterion.describe()}")
        table.show(table.header())
    hooks = FitHooks(
        on_epoch_end=_saving_each_epoch(learner, record, progress, table) if main else None,
        progress=progress_bar(learner.stage) if main else None,
    )
    history = fit(
        learner.model,
        learner.data,
        views=learner.views,
        phase=phase,
        settings=learner.settings,
        runtime=runtime,
        criterion=criterion,
        resume=FitState(**resumed.resume) if resumed else None,
        hooks=hooks,
    )
    metrics = final_metrics(history, stage=learner.stage)
    if main:
        try:
            with timing.phase("write"):
                write_training_outputs(
                    record.outputs, learner.checkpoint(record.used, history), metrics, title=record.title
                )
        except WriteFailed as error:
            raise error.keeping(
                f"all {len(history)} epochs are kept in {display(progress.resume_file.path)}, so "
                f"the rerun only writes the outputs"
            ) from None
        with timing.phase("tracking"):
            log.log_artifacts([record.outputs.metrics, record.outputs.history, record.outputs.plot])
            _log_model(learner, record)
    if main:
        progress.resume_file.clear()
    barrier()
    return metrics


@contextlib.contextmanager
def _stopping(learner: Learner, progress: Progress) -> Iterator[None]:
    """A full disk, a GPU out of memory and Ctrl-C, each as one line naming what was kept; every stop petpipe
    sees is noted in the resume file's record, so that a rerun can tell a kill by a signal from it."""
    try:
        yield
    except BaseException as error:
        # Let go of the failed epoch's frames now: its progress bar closes (and erases itself) before the
        # one line is printed, not after it, whenever the exception would have been collected.
        traceback.clear_frames(error.__traceback__)
        why = (
            "disk"
            if isinstance(error, WriteFailed)
            else "out of memory"
            if isinstance(error, torch.OutOfMemoryError)
            else "interrupted"
            if isinstance(error, KeyboardInterrupt)
            else "error"
        )
        if learner.runtime.world.is_main:  # rank 0 alone writes resume files
            progress.resume_file.note_stop(why)
        said = _what_was_kept(learner, progress, error)
        if said is None:
            raise
        raise said from None


def _what_was_kept(learner: Learner, progress: Progress, error: BaseException) -> BaseException | None:
    stage = learner.stage
    if isinstance(error, WriteFailed):
        kept_in_resume = error.path in (progress.resume_file.path, progress.resume_file.record)
        return error.keeping(progress.kept_words()) if kept_in_resume else None
    if isinstance(error, torch.OutOfMemoryError):
        return memory.out_of_memory(
            stage,
            learner.runtime.device,
            batch_size=learner.settings.batch_size,
            img_size=learner.spec.img_size,
            kept=progress.kept_words(),
        )
    if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
        in_flight = min(progress.kept + 1, progress.epochs)
        return Interrupted(f"{stage}: interrupted in epoch {in_flight} of {progress.epochs}; {progress.kept_words()}")
    return None


def _memory_check(learner: Learner, phase: Phase, *, killed_before: bool) -> MemoryEstimate | None:
    """On a CPU: refuse a batch that cannot fit before it is allocated; after a run that was killed by a
    signal, say what its settings need. Returns the estimate."""
    if learner.runtime.device.type != "cpu":
        return None
    data, size = learner.data, round(learner.spec.img_size * learner.size_ratio)
    guess = memory.estimate(
        learner.model,
        img_size=size,
        batch_size=learner.settings.batch_size,
        images=len(data.train),
        pixel_bytes=data.train.pixels.nbytes + data.valid.pixels.nbytes,
        features=phase.feature_views > 0,
    )
    log.debug("memory estimate: %s", guess)
    if killed_before:
        log.warning(
            "warning: %s: the run that saved this resume file was killed by a signal (the kernel's OOM "
            "killer sends SIGKILL, so does kill -9); %s",
            learner.stage,
            memory.fits_words(guess, img_size=learner.spec.img_size),
        )
    memory.check_fits(learner.stage, guess, img_size=learner.spec.img_size)
    return guess


def _saving_each_epoch(
    learner: Learner, record: Record, progress: Progress, table: EpochTable
) -> Callable[[FitState], None]:
    def on_epoch_end(state: FitState) -> None:
        progress.resume_file.save(learner.checkpoint(record.used, state.history, state.to_dict()))
        progress.kept = state.epoch
        row = state.history[-1]
        table.show(table.line(row))
        learner.context.log.log_metrics(
            {key: value for key, value in row.items() if key != "epoch"}, step=int(row["epoch"])
        )

    return on_epoch_end


def _log_model(learner: Learner, record: Record) -> None:
    """The checkpoint just written, as an MLflow model that takes photos; a validation photo as its example."""
    data, spec = learner.data, learner.spec
    rows = data.rows("valid") if len(data.valid) else data.rows("train")
    learner.context.log.log_model(
        record.outputs.model,
        example=data.folder / rows["path"].iloc[0],
        index=record.index,
        registered_name=record.register_as,
        metadata={"classes": list(spec.classes), **spec.preprocessing.to_dict()},
    )


def final_metrics(history: list[dict[str, float]], *, stage: str) -> dict[str, Any]:
    last = history[-1]
    return {
        "stage": stage,
        "epochs": int(last["epoch"]),
        "train_loss": last["train_loss"],
        "valid_loss": last.get("valid_loss"),
        "accuracy": last.get("accuracy"),
        "error_rate": last.get("error_rate"),
    }  # no timings: the same seed must give the same metrics.json (history.csv has the seconds)


def write_training_outputs(
    outputs: TrainedOutputs, checkpoint: Checkpoint, metrics: dict[str, Any], *, title: str
) -> None:
    """Write the stage's four outputs, each atomically; the checkpoint last, as the sign of completion."""
    history = pd.DataFrame(checkpoint.history)
    write_csv(outputs.history, history)
    save_figure(outputs.plot, plots.plot_training_history(history, title=title))
    write_json(outputs.metrics, metrics)
    save_checkpoint(outputs.model, checkpoint)


def describe_metrics(learner: Learner, fitted: Fitted, extra: str = "") -> str:
    """The stage's summary line: its result, `extra`, whether the losses are weighted by class
    (train.class_weights), and what its memory cost (estimated and measured)."""
    metrics, method = fitted.metrics, learner.settings.class_weights
    weighted = f"; losses weighted by class ({method})" if method != "none" else ""
    return (
        f"{learner.stage}: {metrics['epochs']} epochs, accuracy {metrics['accuracy']:.4f}, "
        f"valid loss {metrics['valid_loss']:.4f}{extra}{weighted}; {memory.describe(fitted.memory)}"
    )
