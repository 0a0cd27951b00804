"""How a computing stage starts: the runtime (torchrun's ranks, threads, device), its seed, and its data.

The stage declares which start it needs in its `Stage` (petpipe/runner.py): `every_rank` for training
stages that torchrun runs on every process, `one_process` for lr-find and evaluate, which rank 0 alone runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from petpipe.data.dataset import Dataset, load_dataset
from petpipe.model.preprocessing import presized_side
from petpipe.model.spec import ModelSpec
from petpipe.params import Params
from petpipe.train.distributed import launched_as_secondary_rank, shutdown
from petpipe.train.hardware import Runtime
from petpipe.train.memory import out_of_memory
from petpipe.train.seeds import seed_everything, stage_seed
from petpipe.utils import timing


@dataclass(frozen=True)
class Compute:
    """A computing stage's runtime and seed, and the one way it loads the indexed images."""

    params: Params
    runtime: Runtime | None  # None: this process sits the stage out (idle)
    seed: int

    @property
    def idle(self) -> bool:
        return self.runtime is None

    @property
    def is_main(self) -> bool:
        return self.runtime is not None and self.runtime.world.is_main

    def dataset(
        self, inputs: Any, spec: ModelSpec | None = None, *, training: bool = True, with_test: bool = False
    ) -> Dataset:
        """inputs.index's images from inputs.images, decoded once into the pixel cache, at the size and in
        the class order of `spec` (a checkpoint's), or of params.model and the index's sorted labels.

        training: the stage trains, so the training split keeps each photo's long side when
        train.augment.presize_crop is random. with_test: the test split too (evaluate alone).
        """
        assert not (training and with_test), "a stage that trains never reads the test split"
        presize = (
            spec.presize
            if spec is not None
            else presized_side(self.params.model.img_size, self.params.model.presize_ratio)
        )
        with timing.phase("decode"):  # or the pixel cache's reading, once decoded
            return load_dataset(
                inputs.index,
                inputs.images,
                presize=presize,
                runtime=self.runtime,
                workers=self.params.train.decode_workers,
                classes=spec.classes if spec is not None else None,
                wide_train=training and self.params.train.augment.presize_crop == "random",
                with_test=with_test,
            )

    @contextlib.contextmanager
    def memory_errors(self, stage: str) -> Iterator[None]:
        """A GPU out of memory in any computing stage becomes the tutorial's advice, in one line (training
        stages say first, in petpipe/train/learner.py, which epoch they kept)."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise out_of_memory(
                stage,
                self.runtime.device,
                batch_size=self.params.train.batch_size,
                img_size=self.params.model.img_size,
                kept="outputs written before this are complete",
            ) from None

    def close(self) -> None:
        shutdown()


def every_rank(params: Params, stage: str) -> Compute:
    """A training stage: under torchrun every rank joins the process group and trains."""
    return _started(params, stage, Runtime.start(params.train, distributed=True))


def one_process(params: Params, stage: str) -> Compute:
    """lr-find, evaluate: one process; under torchrun the other ranks return at once."""
    if launched_as_secondary_rank():
        return Compute(params, None, 0)
    return _started(params, stage, Runtime.start(params.train, distributed=False))


def _started(params: Params, stage: str, runtime: Runtime) -> Compute:
    # One seed per stage from train.seed (seeds.stage_seed says why), every global RNG seeded from it.
    seed = stage_seed(params.train.seed, stage)
    seed_everything(seed)
    return Compute(params, runtime, seed)
