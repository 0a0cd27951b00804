"""How a computing stage starts: the runtime (torchrun's ranks, threads, device) and its seed, in the stage's
`Context` (petpipe/runner.py), and what it turns a GPU out of memory into.

The stage declares which start it needs in its `Stage`: `every_rank` for training stages that torchrun runs
on every process, `one_process` for lr-find and evaluate, which rank 0 alone runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from petpipe.data.dataset import Dataset, load_dataset
from petpipe.model.preprocessing import presized_side
from petpipe.model.spec import ModelSpec
from petpipe.params import ModelParams, Params
from petpipe.runner import Context
from petpipe.track import mlflow_runs
from petpipe.train.distributed import launched_as_secondary_rank, shutdown
from petpipe.train.hardware import Runtime
from petpipe.train.memory import out_of_memory
from petpipe.train.seeds import seed_everything, stage_seed
from petpipe.utils import timing


@contextlib.contextmanager
def every_rank(params: Params, stage: str) -> Iterator[Context]:
    """A training stage: under torchrun every rank joins the process group and trains."""
    with timing.phase("runtime"):
        started = _started(params, stage, Runtime.start(params.train, distributed=True))
    with _computing(started) as context:
        yield context


@contextlib.contextmanager
def one_process(params: Params, stage: str) -> Iterator[Context | None]:
    """lr-find, evaluate: one process; under torchrun the other ranks get None and return at once."""
    if launched_as_secondary_rank():
        yield None
        return
    with timing.phase("runtime"):
        started = _started(params, stage, Runtime.start(params.train, distributed=False))
    with _computing(started) as context:
        yield context


def _started(params: Params, stage: str, runtime: Runtime) -> Context:
    # One seed per stage from train.seed (seeds.stage_seed says why), every global RNG seeded from it. The
    # runner gives the context its MLflow run.
    seed = stage_seed(params.train.seed, stage)
    seed_everything(seed)
    return Context(stage, params, mlflow_runs.no_run(stage), runtime, seed, loader=load_images)


@contextlib.contextmanager
def _computing(context: Context) -> Iterator[Context]:
    """A GPU out of memory in any computing stage becomes the tutorial's advice, in one line (training stages
    say first, in petpipe/train/learner.py, which epoch they kept); the process group ends with the stage."""
    try:
        yield context
    except torch.OutOfMemoryError:
        raise out_of_memory(
            context.stage,
            context.runtime.device,
            batch_size=context.params.train.batch_size,
            img_size=context.params.model.img_size,
            kept="outputs written before this are complete",
        ) from None
    finally:
        shutdown()


def load_images(index: Any, images: Any, *, spec: ModelSpec | None, model: ModelParams, **options: Any) -> Dataset:
    """Context.dataset's loader: the images at the presize and in the class order of `spec` (a checkpoint's),
    or of params.model and the index's sorted labels."""
    presize = spec.presize if spec is not None else presized_side(model.img_size, model.presize_ratio)
    classes = spec.classes if spec is not None else None
    return load_dataset(index, images, presize=presize, classes=classes, **options)
