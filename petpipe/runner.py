"""What every stage repeats, done once: its declaration, its MLflow run, and (for stages that compute)
the runtime, the seed and the data set, so that a stage's `run` holds only what is its own.

A stage module declares `STAGE = Stage("train-head", params=(...), compute=every_rank)` and decorates its
body `@STAGE.runs` — `body(context, inputs, outputs) -> summary` becomes the stage's
`run(params, inputs, outputs)`, which the CLI and the tests call. This module imports no torch:
`petpipe fetch` and `petpipe index-labels` stay fast; a computing stage brings its own start
(petpipe/train/compute.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from petpipe.params import Params
from petpipe.pipeline import Dep
from petpipe.track import mlflow_runs
from petpipe.utils import timing

if TYPE_CHECKING:
    from petpipe.data.dataset import Dataset
    from petpipe.model.spec import ModelSpec
    from petpipe.train.hardware import Runtime


@dataclass(frozen=True)
class Context:
    """What a stage's body gets besides its paths: the params and its MLflow run and, for stages that compute
    (petpipe/train/compute.py starts them), this process's runtime (ranks, device), its seed and the one way
    it loads the indexed images."""

    stage: str
    params: Params
    log: mlflow_runs.StageRun
    runtime: Runtime | None = None  # None: a stage that only reads and writes files
    seed: int = 0  # every global RNG was seeded with it (petpipe/train/seeds.py says why per stage)
    # petpipe.train.compute.load_images, given by the start: this module imports no torch, and fetch and
    # index-labels, which load no images, do not depend on the code that does (dvc.yaml's code deps).
    loader: Callable[..., Dataset] | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes files and logs."""
        return self.runtime is None or self.runtime.world.is_main

    def dataset(
        self, inputs: Any, spec: ModelSpec | None = None, *, training: bool = True, with_test: bool = False
    ) -> Dataset:
        """inputs.index's images from inputs.images, decoded once into the pixel cache, at the size and in
        the class order of `spec` (a checkpoint's), or of params.model and the index's sorted labels.

        training: the stage trains, so the training split keeps each photo's long side when
        train.augment.presize_crop is random. with_test: the test split too (evaluate alone).
        """
        assert self.loader is not None, f"{self.stage} declares no compute, so it loads no images"
        assert not (training and with_test), "a stage that trains never reads the test split"
        with timing.phase("decode"):  # or the pixel cache's reading, once decoded
            return self.loader(
                inputs.index,
                inputs.images,
                spec=spec,
                model=self.params.model,
                runtime=self.runtime,
                workers=self.params.train.decode_workers,
                wide_train=training and self.params.train.augment.presize_crop == "random",
                with_test=with_test,
            )


Body = Callable[[Context, Any, Any], str]
# How a computing stage starts: its context with the runtime and seed, or None on a process that sits the
# stage out; on leaving, the process group is shut down.
Start = Callable[[Params, str], AbstractContextManager[Context | None]]


@dataclass(frozen=True)
class Stage:
    """A stage as dvc.yaml knows it: its name and the params sections or keys its outputs depend on
    (dvc.yaml's `params`, and what its MLflow run records). `compute`: how it starts computing
    (petpipe.train.compute.every_rank or one_process), or None for a stage that only reads and writes files.
    `deps`: what it reads that no --option passes (dvc.yaml's extra deps, fetch's data.source)."""

    name: str
    params: tuple[str, ...]
    compute: Start | None = None
    deps: tuple[Dep, ...] = ()

    def runs(self, body: Body) -> Callable[[Params, Any, Any], str]:
        """The stage's `run(params, inputs, outputs)` around `body`."""

        @functools.wraps(body)
        def run(params: Params, inputs: Any, outputs: Any, *, command: bool = False) -> str:
            return self._execute(body, params, inputs, outputs, command=command)

        return run

    def _started(self, params: Params) -> AbstractContextManager[Context | None]:
        if self.compute is None:
            return contextlib.nullcontext(Context(self.name, params, mlflow_runs.no_run(self.name)))
        return self.compute(params, self.name)

    def _execute(self, body: Body, params: Params, inputs: Any, outputs: Any, *, command: bool) -> str:
        with timing.stage(self.name, command=command) as seconds:
            with self._started(params) as context:
                if context is None:  # a one-process stage on a rank other than 0 under torchrun
                    return ""
                # Every rank computes; rank 0 alone logs.
                with (
                    mlflow_runs.stage_run(self.name, params=params.select(self.params), settings=params)
                    if context.is_main
                    else mlflow_runs.no_run(self.name) as log
                ):
                    summary = body(dataclasses.replace(context, log=log), inputs, outputs)
                    if self.compute is not None:  # a computing stage's phases; fetch and index-labels only print theirs
                        log.log_metrics(seconds.metrics())
        if context.is_main:  # where the stage's time went, beside its progress bars (stdout keeps the summary)
            print(seconds.line(), file=sys.stderr, flush=True)
        return summary if context.is_main else ""
