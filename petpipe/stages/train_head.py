"""Stage train-head: a new head on the frozen pretrained body, trained with the one-cycle policy.

    petpipe train-head --images stages/fetch/images --index stages/index-labels/index.csv \
        --model stages/train-head/model.pt --metrics stages/train-head/metrics.json \
        --history stages/train-head/history.csv --plot stages/train-head/training.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe.models import build_model, freeze_body
from petpipe.params import Params
from petpipe.stages.common import (TrainedOutputs, describe_metrics, head_fixes_bn_stats, load_dataset,
                                   seed_everything, stage_seed, train_and_save)
from petpipe.distributed import device_for, init_world, shutdown
from petpipe.training import choose_device, configure_threads

STAGE = "train-head"


@dataclass(frozen=True)
class Inputs:
    images: Path
    index: Path


Outputs = TrainedOutputs


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    world = init_world(params.train.device)
    configure_threads(world)
    device = device_for(world, choose_device(params.train.device))
    seed_everything(stage_seed(params.train.seed, STAGE))
    data = load_dataset(inputs.index, inputs.images, presize=params.model.presize, device=device,
                        workers=params.train.decode_workers, world=world)
    model, preprocessing = build_model(params.model.arch, params.model.weights, num_classes=len(data.classes),
                                       head_hidden=params.model.head_hidden, head_dropout=params.model.head_dropout)
    cache_features = params.train_head.cache_features
    freeze_body(model, train_bn=params.model.train_bn and not cache_features)
    # The body is frozen, so one learning rate serves every group (fastai's fit_one_cycle(epochs, lr)).
    group_lrs = {group: params.train_head.lr for group in model.layer_groups()}
    metrics = train_and_save(
        STAGE, model, data=data, params=params, inputs=[inputs.index], preprocessing=preprocessing,
        used={"model": params.model.model_dump(), "train": params.train.model_dump(),
              "train_head": params.train_head.model_dump()},
        arch=params.model.arch, weights=params.model.weights, img_size=params.model.img_size,
        presize=params.model.presize, head_hidden=params.model.head_hidden, head_dropout=params.model.head_dropout,
        epochs=params.train_head.epochs, group_lrs=group_lrs, schedule=params.train_head.schedule,
        freeze_bn_stats=head_fixes_bn_stats(cache_features=cache_features, train_bn=params.model.train_bn),
        outputs=outputs, title=f"train-head: {params.model.arch}, body frozen", world=world,
        cache_features=cache_features,
    )
    shutdown()
    if not world.is_main:
        return ""
    return describe_metrics(STAGE, metrics)
