"""Stage train-head: a new head on the frozen pretrained body, trained with the one-cycle policy.

    petpipe train-head --images stages/fetch/images --index stages/index-labels/index.csv \
        --model stages/train-head/model.pt --metrics stages/train-head/metrics.json \
        --history stages/train-head/history.csv --plot stages/train-head/training.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from petpipe.checkpoint import make_checkpoint
from petpipe.models import build_model, freeze_body
from petpipe.params import Params
from petpipe.stages.common import (ResumeFile, final_metrics, load_dataset, progress_bar, seed_everything,
                                   write_training_outputs)
from petpipe.training import choose_device, configure_threads, fit

STAGE = "train-head"


@dataclass(frozen=True)
class Inputs:
    images: Path
    index: Path


@dataclass(frozen=True)
class Outputs:
    model: Path
    metrics: Path
    history: Path
    plot: Path


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    configure_threads()
    device = choose_device(params.train.device)
    used = {"model": params.model.model_dump(), "train": params.train.model_dump(),
            "train_head": params.train_head.model_dump()}
    resume_file = ResumeFile(STAGE, params=used, inputs=[inputs.index])

    seed_everything(params.train.seed)
    data = load_dataset(inputs.index, inputs.images, presize=params.model.presize, device=device,
                        workers=params.train.decode_workers)
    model, preprocessing = build_model(params.model.arch, params.model.weights, num_classes=len(data.classes),
                                       head_hidden=params.model.head_hidden, head_dropout=params.model.head_dropout)
    freeze_body(model, train_bn=params.model.train_bn)
    resume = resume_file.load()
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
    model.to(device).to(memory_format=torch.channels_last)

    def checkpoint(history, resume_state=None):
        return make_checkpoint(
            model, stage=STAGE, arch=params.model.arch, weights=params.model.weights, classes=data.classes,
            preprocessing=preprocessing, img_size=params.model.img_size, presize=params.model.presize,
            head_hidden=params.model.head_hidden, head_dropout=params.model.head_dropout, params=used,
            history=history, resume=resume_state)

    # The body is frozen, so one learning rate serves every group (fastai's fit_one_cycle(epochs, lr)).
    lr = params.train_head.lr
    history = fit(
        model, train=data.train, valid=data.valid, epochs=params.train_head.epochs,
        group_lrs={group: lr for group in model.layer_groups()}, schedule=params.train_head.schedule,
        weight_decay=params.train.weight_decay, batch_size=params.train.batch_size, size=params.model.img_size,
        augment=params.train.augment, preprocessing=preprocessing, seed=params.train.seed, frozen=True,
        train_bn=params.model.train_bn, resume=resume["resume"] if resume else None,
        on_epoch_end=lambda state: resume_file.save(checkpoint(state.history, state.to_dict())),
        progress=progress_bar(STAGE),
    )
    metrics = final_metrics(history, stage=STAGE)
    write_training_outputs(model_path=outputs.model, metrics_path=outputs.metrics, history_path=outputs.history,
                           plot_path=outputs.plot, checkpoint=checkpoint(history), metrics=metrics,
                           title=f"train-head: {params.model.arch}, body frozen")
    resume_file.clear()
    return (f"train-head: {len(history)} epochs, accuracy {metrics['accuracy']:.4f}, "
            f"valid loss {metrics['valid_loss']:.4f}, {metrics['seconds']:.1f} s")
