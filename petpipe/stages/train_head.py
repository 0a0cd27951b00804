"""train-head: train a new head on the frozen pretrained body with the one-cycle policy.

    petpipe train-head --images stages/fetch/images --index stages/index-labels/index.csv \\
        --model stages/train-head/model.pt --metrics stages/train-head/metrics.json \\
        --history stages/train-head/history.csv --plot stages/train-head/training.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe.dataset import load_dataset
from petpipe.distributed import shutdown
from petpipe.hardware import Runtime
from petpipe.learner import Learner, Record, TrainedOutputs, describe_metrics, fit_and_save
from petpipe.models import build_model, freeze_body
from petpipe.params import Params
from petpipe.seeds import seed_everything, stage_seed
from petpipe.spec import ModelSpec
from petpipe.stages import path_option
from petpipe.training import Phase

STAGE = "train-head"
PARAMS = ("model", "train", "train_head")


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.")
    index: Path = path_option("index-labels' index.csv.")


Outputs = TrainedOutputs


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    runtime = Runtime.start(params.train, distributed=True)
    seed = stage_seed(params.train.seed, STAGE)
    seed_everything(seed)
    data = load_dataset(inputs.index, inputs.images, presize=params.model.presize, runtime=runtime,
                        workers=params.train.decode_workers,
                        wide_train=params.train.augment.presize_crop == "random")
    spec = ModelSpec.from_params(params.model, data.classes)
    model = build_model(spec, pretrained=True)
    cached = params.train_head.cache_features
    freeze_body(model, train_bn=params.model.train_bn and not cached)
    # The body is frozen, so one learning rate serves every group (fastai's fit_one_cycle(epochs, lr)).
    phase = Phase(epochs=params.train_head.epochs, group_lrs=dict.fromkeys(model.layer_groups(), params.train_head.lr),
                  schedule=params.train_head.schedule, seed=seed,
                  feature_views=params.train_head.feature_views if cached else 0,
                  freeze_bn_stats=fixes_bn_stats(cache_features=cached, train_bn=params.model.train_bn))
    record = Record(used=params.select(PARAMS), inputs=[inputs.index], outputs=outputs,
                    title=f"train-head: {spec.arch}, body frozen")
    metrics = fit_and_save(Learner(STAGE, model, spec, data, params, runtime), phase, record)
    shutdown()
    return describe_metrics(STAGE, metrics) if runtime.world.is_main else ""


def fixes_bn_stats(*, cache_features: bool, train_bn: bool) -> bool:
    """Whether train-head keeps the body's BatchNorm statistics fixed: with cached features (the body ran
    once, in eval mode) or without train_bn. finetune.bn_stats auto then keeps them fixed too."""
    return cache_features or not train_bn
