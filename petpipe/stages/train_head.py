"""train-head: train a new head on the frozen pretrained body with the one-cycle policy.

    petpipe train-head --images stages/fetch/images --index stages/index-labels/index.csv \\
        --model stages/train-head/model.pt --metrics stages/train-head/metrics.json \\
        --history stages/train-head/history.csv --plot stages/train-head/training.png \\
        --show-batch stages/train-head/show_batch.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from petpipe.data.image_index import load_index
from petpipe.data.views import Views
from petpipe.interpret.draw_batch import show_batch_figure
from petpipe.model.backbones import build_model, check_architecture, freeze_body, head_fixes_bn_stats
from petpipe.model.spec import ModelSpec
from petpipe.params import Params, output_keys
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.train.compute import every_rank
from petpipe.train.fit_loop import Phase
from petpipe.train.learner import Learner, TrainedOutputs
from petpipe.utils.file_formats import save_figure

STAGE = Stage("train-head", params=("model", *output_keys("train"), "train_head"), compute=every_rank)
# fastai's show_batch shows nine images by default.
SHOW_BATCH_SIZE = 9


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    index: Path = path_option("index-labels' index.csv.", at=stage_path("index-labels", "index.csv"))


@dataclass(frozen=True)
class Outputs(TrainedOutputs):
    show_batch: Path | None = path_option(
        "show_batch.png to write (fastai's show_batch: training images as train-head augments them); not drawn "
        "when omitted.",
        optional=True,
        file="show_batch.png",
        kind="plots",
    )


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
    if outputs.show_batch is not None and context.is_main:  # after training: it draws from generators of its own
        save_figure(outputs.show_batch, show_batch(inputs, params))
        context.log.log_artifacts([outputs.show_batch])
    return learner.summary()


def show_batch(inputs: Inputs, params: Params) -> Figure:
    """fastai's show_batch of the training split, augmented as train-head augments it (params.train.augment),
    before normalisation; the same images for the same train.seed."""
    views = Views.for_display(params.model, params.train.augment)
    index = load_index(inputs.index)
    return show_batch_figure(
        index, inputs.images, split="train", count=SHOW_BATCH_SIZE, views=views, seed=params.train.seed
    )
