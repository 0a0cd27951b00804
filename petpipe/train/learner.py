"""fastai's Learner for a training stage: fit (resuming after a kill, logging each epoch), then save the outputs.

train-head and finetune build their model, freeze what stays fixed, and then, as fastai's `fine_tune`:
`learner = Learner(context, model, spec, data, ...)`, `learner.fit(phase)`, `learner.save(outputs)`, inside the
stage's run (petpipe/runner.py: its MLflow run, runtime and seed). Under torchrun every rank trains and
rank 0 alone writes files and logs to MLflow.
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


class Learner:
    """One training stage's model and its spec, its data, the views the network sees, the loss and the runtime
    it trains with (its levers chosen once, here: `runtime` is the one in use), as fastai's Learner.

    used: the params the result depends on (the resume key, the checkpoint's params, MLflow's params).
    index: index-labels' index.csv, the model's dataset in MLflow; depends_on: the other files the result
    depends on besides the images (the resume key). size_ratio: training crops' side as a fraction of
    spec.img_size (finetune.size_ratio).
    """

    def __init__(
        self,
        context: Context,
        model: Classifier,
        spec: ModelSpec,
        data: Dataset,
        *,
        used: dict[str, Any],
        index: Path,
        depends_on: tuple[Path, ...] = (),
        size_ratio: float = 1.0,
    ):
        self.context, self.model, self.spec, self.data = context, model, spec, data
        self.used, self.index, self.depends_on, self.size_ratio = used, index, depends_on, size_ratio
        self.views = Views.of(spec, self.settings.augment, size_ratio=size_ratio)
        self.criterion = Criterion.of(self.settings, data)  # fastai's loss_func (train.class_weights)
        to_device(model, context.runtime.device)
        self.runtime: Runtime = choose_levers(context.runtime, model, data.train, self.views, self.settings)
        self.history: list[dict[str, float]] = []  # per epoch, as fastai's Recorder; fit fills it
        self.memory: MemoryEstimate | None = None  # the estimate fit made before its first batch (CPU)
        self._progress: Progress | None = None  # where the fit stands, for the line an early stop prints

    @property
    def stage(self) -> str:
        return self.context.stage

    @property
    def params(self) -> Params:
        return self.context.params

    @property
    def settings(self) -> TrainParams:
        """params.train: what every training stage shares."""
        return self.params.train

    @property
    def metrics(self) -> dict[str, Any]:
        """The fit's result, as in metrics.json."""
        return final_metrics(self.history, stage=self.stage)

    def checkpoint(self, history: list[dict[str, float]], resume: dict[str, Any] | None = None) -> Checkpoint:
        return Checkpoint.of(self.model, self.spec, stage=self.stage, params=self.used, history=history, resume=resume)

    def fit(self, phase: Phase) -> None:
        """Train for the phase (fastai's fit_one_cycle), resuming an interrupted run of the same stage, params
        and inputs, logging each epoch and keeping it in the resume file. A full disk, a GPU out of memory or
        Ctrl-C ends it in one line that says what was kept (see `_stopping`)."""
        resume_file = ResumeFile(self.stage, params=self.used, inputs=[self.index, *self.depends_on])
        resumed = resume_file.load()
        if resumed is not None:
            self.model.load_state_dict(resumed.state_dict)
        self._progress = Progress(resume_file, phase.epochs, kept=resumed.resume["epoch"] if resumed else 0)
        killed_before = resumed is not None and resume_file.stopped_silently()
        self.memory = _memory_check(self, phase, killed_before=killed_before)
        with _stopping(self, self._progress):
            self.history = self._fit_epochs(phase, resumed)

    def _fit_epochs(self, phase: Phase, resumed: Checkpoint | None) -> list[dict[str, float]]:
        main = self.context.is_main
        self.context.log.log_params({**self.used, "levers": dataclasses.asdict(self.runtime.levers)})
        table = EpochTable(self.stage, phase.epochs)
        if main:
            if self.criterion.weight is not None:
                table.show(f"{self.stage}: loss {self.criterion.describe()}")
            table.show(table.header())
        hooks = FitHooks(
            on_epoch_end=self._saving_each_epoch(table) if main else None,
            progress=progress_bar(self.stage) if main else None,
        )
        return fit(self, phase, resume=FitState(**resumed.resume) if resumed else None, hooks=hooks)

    def _saving_each_epoch(self, table: EpochTable) -> Callable[[FitState], None]:
        progress = self._progress

        def on_epoch_end(state: FitState) -> None:
            progress.resume_file.save(self.checkpoint(state.history, state.to_dict()))
            progress.kept = state.epoch
            row = state.history[-1]
            table.show(table.line(row))
            self.context.log.log_metrics(
                {key: value for key, value in row.items() if key != "epoch"}, step=int(row["epoch"])
            )

        return on_epoch_end

    def save(self, outputs: TrainedOutputs, *, title: str, register_as: str | None = None) -> None:
        """Write the fit's four outputs (rank 0) and log them, the checkpoint as an MLflow model (registered as
        `register_as`, if given); then the resume file goes. `title`: the training-curve plot's."""
        assert self._progress is not None and self.history, "fit before save"
        progress = self._progress
        with _stopping(self, progress):
            if self.context.is_main:
                try:
                    with timing.phase("write"):
                        write_training_outputs(outputs, self.checkpoint(self.history), self.metrics, title=title)
                except WriteFailed as error:
                    raise error.keeping(
                        f"all {len(self.history)} epochs are kept in {display(progress.resume_file.path)}, so "
                        f"the rerun only writes the outputs"
                    ) from None
                with timing.phase("tracking"):
                    self.context.log.log_artifacts([outputs.metrics, outputs.history, outputs.plot])
                    self._log_model(outputs.model, register_as)
                progress.resume_file.clear()
            barrier()

    def _log_model(self, checkpoint: Path, registered_name: str | None) -> None:
        """The checkpoint just written, as an MLflow model that takes photos; a validation photo as its example."""
        data, spec = self.data, self.spec
        rows = data.rows("valid") if len(data.valid) else data.rows("train")
        self.context.log.log_model(
            checkpoint,
            example=data.folder / rows["path"].iloc[0],
            index=self.index,
            registered_name=registered_name,
            metadata={"classes": list(spec.classes), **spec.preprocessing.to_dict()},
        )

    def summary(self, extra: str = "") -> str:
        """The stage's summary line: its result, `extra`, whether the losses are weighted by class
        (train.class_weights), and what its memory cost (estimated and measured)."""
        metrics, method = self.metrics, self.settings.class_weights
        weighted = f"; losses weighted by class ({method})" if method != "none" else ""
        return (
            f"{self.stage}: {metrics['epochs']} epochs, accuracy {metrics['accuracy']:.4f}, "
            f"valid loss {metrics['valid_loss']:.4f}{extra}{weighted}; {memory.describe(self.memory)}"
        )


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
