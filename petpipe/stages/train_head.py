"""train-head: train a new head on the frozen pretrained body with the one-cycle policy.

    petpipe train-head --images stages/fetch/images --index stages/index-labels/index.csv \\
        --model stages/train-head/model.pt --metrics stages/train-head/metrics.json \\
        --history stages/train-head/history.csv --plot stages/train-head/training.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe.model.backbones import build_model, check_architecture, freeze_body, head_fixes_bn_stats
from petpipe.model.spec import ModelSpec
from petpipe.params import output_keys
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.train.compute import every_rank
from petpipe.train.fit_loop import Phase
from petpipe.train.learner import Learner, TrainedOutputs

STAGE = Stage("train-head", params=("model", *output_keys("train"), "train_head"), compute=every_rank)


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    index: Path = path_option("index-labels' index.csv.", at=stage_path("index-labels", "index.csv"))


Outputs = TrainedOutputs


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    params = context.params
    check_architecture(params.model.arch)  # before minutes of decoding, with the names it may have meant
    data = context.dataset(inputs)
    spec = ModelSpec.from_params(params.model, data.classes)
    model = build_model(spec, pretrained=True)
    cached = params.train_head.cache_features
    freeze_body(model, train_bn=params.model.train_bn and not cached)
    # The body is frozen, so one learning rate serves every group (fastai's fit_one_cycle(epochs, lr)).
    phase = Phase(
        epochs=params.train_head.epochs,
        group_lrs=dict.fromkeys(model.layer_groups(), params.train_head.lr),
        schedule=params.train_head.schedule,
        seed=context.seed,
        feature_views=params.train_head.feature_views if cached else 0,
        freeze_bn_stats=head_fixes_bn_stats(cache_features=cached, train_bn=params.model.train_bn),
    )
    learner = Learner(context, model, spec, data, used=params.select(STAGE.params), index=inputs.index)
    learner.fit(phase)
    learner.save(outputs, title=f"train-head: {spec.arch}, body frozen")
    return learner.summary()
