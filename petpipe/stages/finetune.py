"""Stage finetune: unfreeze and train everything with discriminative learning rates (one-cycle).

    petpipe finetune --images stages/fetch/images --index stages/index-labels/index.csv \
        --checkpoint stages/train-head/model.pt --lr-find stages/lr-find/lr_find.json \
        --model stages/finetune/model.pt --metrics stages/finetune/metrics.json \
        --history stages/finetune/history.csv --plot stages/finetune/training.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from petpipe.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_of
from petpipe.errors import PetpipeError
from petpipe.models import unfreeze
from petpipe.params import Params
from petpipe.stages.common import (TrainedOutputs, describe_metrics, head_fixes_bn_stats, load_dataset,
                                   seed_everything, stage_seed, train_and_save)
from petpipe.distributed import device_for, init_world, shutdown
from petpipe.training import choose_device, configure_threads, discriminative_lrs

STAGE = "finetune"


@dataclass(frozen=True)
class Inputs:
    images: Path
    index: Path
    checkpoint: Path
    lr_find: Path


Outputs = TrainedOutputs


def peak_lr(setting: float | str, lr_find_result: Path) -> float:
    """finetune.lr as a number: itself, or lr-find's chosen suggestion when it is auto."""
    if setting != "auto":
        return float(setting)
    try:
        return float(json.loads(lr_find_result.read_text())["chosen"]["lr"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PetpipeError(f"finetune.lr = auto needs lr-find's result {lr_find_result} ({error}); "
                           f"run `dvc repro lr-find` or set finetune.lr to a number") from None


def freeze_bn_stats(setting: str, checkpoint: dict) -> bool:
    """finetune.bn_stats: auto keeps the body's BatchNorm statistics fixed when the head learnt on them
    (train_head.cache_features, or model.train_bn false), so that the head's inputs do not shift under it."""
    if setting != "auto":
        return setting == "frozen"
    head = checkpoint["params"]
    return head_fixes_bn_stats(cache_features=bool(head.get("train_head", {}).get("cache_features")),
                               train_bn=bool(head.get("model", {}).get("train_bn", True)))


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    world = init_world(params.train.device)
    configure_threads(world)
    device = device_for(world, choose_device(params.train.device))
    seed_everything(stage_seed(params.train.seed, STAGE))
    checkpoint = load_checkpoint(inputs.checkpoint)
    lr = peak_lr(params.finetune.lr, inputs.lr_find)
    preprocessing = preprocessing_of(checkpoint)
    size, presize = checkpoint["preprocessing"]["img_size"], checkpoint["preprocessing"]["presize"]
    data = load_dataset(inputs.index, inputs.images, presize=presize, device=device,
                        workers=params.train.decode_workers, classes=checkpoint["classes"], world=world)
    model = model_from_checkpoint(checkpoint)
    unfreeze(model)
    # The tutorial's slice(1e-6, 1e-4): lr / lr_ratio for the early body up to lr for the head.
    groups = list(model.layer_groups())
    group_lrs = dict(zip(groups, discriminative_lrs(lr, params.finetune.lr_ratio, len(groups))))
    metrics = train_and_save(
        STAGE, model, data=data, params=params, inputs=[inputs.index, inputs.checkpoint],
        used={"train": params.train.model_dump(), "finetune": {**params.finetune.model_dump(), "peak_lr": lr},
              "group_lrs": group_lrs},
        preprocessing=preprocessing, arch=checkpoint["arch"], weights=checkpoint["weights"], img_size=size,
        presize=presize, head_hidden=checkpoint["head"]["hidden"], head_dropout=checkpoint["head"]["dropout"],
        epochs=params.finetune.epochs, group_lrs=group_lrs, schedule=params.finetune.schedule,
        freeze_bn_stats=freeze_bn_stats(params.finetune.bn_stats, checkpoint),
        outputs=outputs, title=f"finetune: {checkpoint['arch']}, unfrozen, lr {lr / params.finetune.lr_ratio:.1e}"
                               f" to {lr:.1e}", world=world,
    )
    shutdown()
    if not world.is_main:
        return ""
    return describe_metrics(STAGE, metrics) + f", from train-head accuracy {checkpoint['history'][-1]['accuracy']:.4f}"
