"""What every stage repeats, done once: its declaration, its MLflow run, and (for stages that compute)
the runtime, the seed and the data set, so that a stage's `run` holds only what is its own.

A stage module declares `STAGE = Stage("train-head", params=(...), compute=every_rank)` and decorates its
body `@STAGE.runs` — `body(context, inputs, outputs) -> summary` becomes the stage's
`run(params, inputs, outputs)`, which the CLI and the tests call. This module imports no torch:
`petpipe fetch` and `petpipe index-labels` stay fast; a computing stage brings its own `compute`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from petpipe.params import Params
from petpipe.pipeline import Dep
from petpipe.track import mlflow_runs
from petpipe.utils import timing

if TYPE_CHECKING:
    from petpipe.train.compute import Compute


@dataclass(frozen=True)
class Context:
    """What a stage's body gets besides its paths: the params, its MLflow run and, for stages that
    compute, the runtime, seed and data loading (petpipe/train/compute.py)."""

    stage: str
    params: Params
    log: mlflow_runs.StageRun
    compute: Compute | None = None


Body = Callable[[Context, Any, Any], str]


@dataclass(frozen=True)
class Stage:
    """A stage as dvc.yaml knows it: its name and the params sections or keys its outputs depend on
    (dvc.yaml's `params`, and what its MLflow run records). `compute`: how it starts computing
    (petpipe.train.compute.every_rank or one_process), or None for a stage that only reads and writes files.
    `deps`: what it reads that no --option passes (dvc.yaml's extra deps, fetch's data.source)."""

    name: str
    params: tuple[str, ...]
    compute: Callable[[Params, str], Compute] | None = None
    deps: tuple[Dep, ...] = ()

    def runs(self, body: Body) -> Callable[[Params, Any, Any], str]:
        """The stage's `run(params, inputs, outputs)` around `body`."""

        @functools.wraps(body)
        def run(params: Params, inputs: Any, outputs: Any, *, command: bool = False) -> str:
            return self._execute(body, params, inputs, outputs, command=command)

        return run

    def _execute(self, body: Body, params: Params, inputs: Any, outputs: Any, *, command: bool) -> str:
        with timing.stage(self.name, command=command) as seconds:
            compute = None
            if self.compute is not None:
                with timing.phase("runtime"):
                    compute = self.compute(params, self.name)
            if compute is not None and compute.idle:  # a one-process stage on a rank other than 0 under torchrun
                return ""
            main = compute is None or compute.is_main
            try:
                # Every rank computes; rank 0 alone logs.
                with (
                    mlflow_runs.stage_run(self.name, params=params.select(self.params), settings=params)
                    if main
                    else mlflow_runs.no_run(self.name) as log,
                    compute.memory_errors(self.name) if compute is not None else contextlib.nullcontext(),
                ):
                    summary = body(Context(self.name, params, log, compute), inputs, outputs)
                    if compute is not None:  # a computing stage's phases; fetch and index-labels only print theirs
                        log.log_metrics(seconds.metrics())
            finally:
                if compute is not None:
                    compute.close()
        if main:  # where the stage's time went, beside its progress bars (stdout keeps the summary)
            print(seconds.line(), file=sys.stderr, flush=True)
        return summary if main else ""
