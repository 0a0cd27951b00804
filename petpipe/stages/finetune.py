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
from typing import Any

from petpipe.checkpoint import load_checkpoint
from petpipe.dataset import load_dataset
from petpipe.distributed import shutdown
from petpipe.errors import PetpipeError
from petpipe.hardware import Runtime
from petpipe.learner import Learner, Record, TrainedOutputs, describe_metrics, fit_and_save
from petpipe.models import unfreeze
from petpipe.optim import discriminative_lrs
from petpipe.params import Params
from petpipe.seeds import seed_everything, stage_seed
from petpipe.stages import path_option
from petpipe.stages.train_head import fixes_bn_stats
from petpipe.training import Phase

STAGE = "finetune"
PARAMS = ("train", "finetune")


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.")
    index: Path = path_option("index-labels' index.csv.")
    checkpoint: Path = path_option("train-head's model.pt.")
    lr_find: Path = path_option("lr-find's lr_find.json (read when finetune.lr is auto).")


Outputs = TrainedOutputs


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    runtime = Runtime.start(params.train, distributed=True)
    seed = stage_seed(params.train.seed, STAGE)
    seed_everything(seed)
    head = load_checkpoint(inputs.checkpoint)
    lr = peak_lr(params.finetune.lr, inputs.lr_find)
    data = load_dataset(inputs.index, inputs.images, presize=head.spec.presize, runtime=runtime,
                        workers=params.train.decode_workers, classes=head.spec.classes,
                        wide_train=params.train.augment.presize_crop == "random")
    model = head.model()
    unfreeze(model)
    # The tutorial's slice(1e-6, 1e-4): lr / lr_ratio for the early body up to lr for the head.
    groups = list(model.layer_groups())
    phase = Phase(epochs=params.finetune.epochs, group_lrs=dict(zip(groups, discriminative_lrs(
        lr, params.finetune.lr_ratio, len(groups)))), schedule=params.finetune.schedule, seed=seed,
        freeze_bn_stats=freeze_bn_stats(params.finetune.bn_stats, head.params))
    used = {**params.select(PARAMS), "finetune": {**params.finetune.model_dump(), "peak_lr": lr},
            "group_lrs": phase.group_lrs}
    record = Record(used=used, inputs=[inputs.index, inputs.checkpoint], outputs=outputs,
                    title=f"finetune: {head.spec.arch}, unfrozen, lr {lr / params.finetune.lr_ratio:.1e} to {lr:.1e}",
                    register_as=params.tracking.registered_model)  # the model to serve is finetune's
    metrics = fit_and_save(Learner(STAGE, model, head.spec, data, params, runtime), phase, record)
    shutdown()
    if not runtime.world.is_main:
        return ""
    return describe_metrics(STAGE, metrics) + f", from train-head accuracy {head.history[-1]['accuracy']:.4f}"


def peak_lr(setting: float | str, lr_find_result: Path) -> float:
    """finetune.lr as a number: itself, or lr-find's chosen suggestion when it is auto."""
    if setting != "auto":
        return float(setting)
    try:
        return float(json.loads(lr_find_result.read_text())["chosen"]["lr"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PetpipeError(f"finetune.lr = auto needs lr-find's result {lr_find_result} ({error}); "
                           f"run `dvc repro lr-find` or set finetune.lr to a number") from None


def freeze_bn_stats(setting: str, head_params: dict[str, Any]) -> bool:
    """finetune.bn_stats: auto keeps the body's BatchNorm statistics fixed when the head learnt on them
    (train_head.cache_features, or model.train_bn false), so that the head's inputs do not shift under it.

    head_params: the params train-head recorded in its checkpoint.
    """
    if setting != "auto":
        return setting == "frozen"
    return fixes_bn_stats(cache_features=bool(head_params.get("train_head", {}).get("cache_features")),
                          train_bn=bool(head_params.get("model", {}).get("train_bn", True)))
