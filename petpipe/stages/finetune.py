"""finetune: unfreeze and train everything with discriminative learning rates (one-cycle).

    petpipe finetune --images stages/fetch/images --index stages/index-labels/index.csv \\
        --checkpoint stages/train-head/model.pt --lr-find stages/lr-find/lr_find.json \\
        --model stages/finetune/model.pt --metrics stages/finetune/metrics.json \\
        --history stages/finetune/history.csv --plot stages/finetune/training.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from petpipe.errors import PetpipeError
from petpipe.model.backbones import finetune_fixes_bn_stats, freeze_early, unfreeze
from petpipe.model.checkpoint import load_checkpoint
from petpipe.params import output_keys
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.train.compute import every_rank
from petpipe.train.fit_loop import Phase
from petpipe.train.learner import Learner, TrainedOutputs
from petpipe.train.optim import discriminative_lrs

STAGE = Stage("finetune", params=(*output_keys("train"), "finetune"), compute=every_rank)


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    index: Path = path_option("index-labels' index.csv.", at=stage_path("index-labels", "index.csv"))
    checkpoint: Path = path_option("train-head's model.pt.", at=stage_path("train-head", "model.pt"))
    lr_find: Path = path_option(
        "lr-find's lr_find.json (read when finetune.lr is auto).",
        at=stage_path("lr-find", "lr_find.json"),
        note="read only with finetune.lr auto; DVC cannot make a dependency conditional (README: Reproducibility)",
    )


Outputs = TrainedOutputs


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    params = context.params
    head = load_checkpoint(inputs.checkpoint)
    lr = peak_lr(params.finetune.lr, inputs.lr_find)
    data = context.dataset(inputs, head.spec)
    model = head.model()
    unfreeze(model)
    frozen = freeze_early(model, params.finetune.frozen_stride)  # fastai's freeze_to, by depth; [] unfreezes all
    # The tutorial's slice(1e-6, 1e-4): lr / lr_ratio for the early body up to lr for the head.
    groups = list(model.layer_groups())
    phase = Phase(
        epochs=params.finetune.epochs,
        group_lrs=dict(zip(groups, discriminative_lrs(lr, params.finetune.lr_ratio, len(groups)))),
        schedule=params.finetune.schedule,
        seed=context.seed,
        freeze_bn_stats=finetune_fixes_bn_stats(params.finetune.bn_stats, head.params),
    )
    used = {
        **params.select(STAGE.params),
        "finetune": {**params.finetune.model_dump(), "peak_lr": lr},
        "group_lrs": phase.group_lrs,
    }
    learner = Learner(
        context,
        model,
        head.spec,
        data,
        used=used,
        index=inputs.index,
        depends_on=(inputs.checkpoint,),
        size_ratio=params.finetune.size_ratio,
    )
    learner.fit(phase)
    learner.save(
        outputs,
        title=f"finetune: {head.spec.arch}, {unfrozen_words(frozen)}, "
        f"lr {lr / params.finetune.lr_ratio:.1e} to {lr:.1e}",
        register_as=params.tracking.registered_model,  # the model to serve is finetune's
    )
    return learner.summary(
        extra=f", from train-head accuracy {head.history[-1]['accuracy']:.4f}, {unfrozen_words(frozen)}"
    )


def unfrozen_words(frozen: list[str]) -> str:
    """What trains, for titles and summaries: "unfrozen", or "unfrozen after model.blocks.2"."""
    return f"unfrozen after {frozen[-1]}" if frozen else "unfrozen"


def peak_lr(setting: float | str, lr_find_result: Path) -> float:
    """finetune.lr as a number: itself, or lr-find's chosen suggestion when it is auto."""
    if setting != "auto":
        return float(setting)
    try:
        return float(json.loads(lr_find_result.read_text())["chosen"]["lr"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PetpipeError(
            f"finetune.lr = auto needs lr-find's result {lr_find_result} ({error}); "
            f"run `dvc repro lr-find` or set finetune.lr to a number"
        ) from None
