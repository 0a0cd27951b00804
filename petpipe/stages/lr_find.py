"""Stage lr-find: sweep the learning rate on the unfrozen head-trained model; suggest one for finetune.

    petpipe lr-find --images stages/fetch/images --index stages/index-labels/index.csv \
        --checkpoint stages/train-head/model.pt --result stages/lr-find/lr_find.json \
        --curve stages/lr-find/lr_find.csv --plot stages/lr-find/lr_find.png

Only the outputs are written: the sweep trains an in-memory copy of the model,
never the checkpoint on disk (no temp file saved and reloaded, unlike fastai).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from petpipe import plots, tracking
from petpipe.atomic import save_figure, write_csv, write_json
from petpipe.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_of
from petpipe.errors import PetpipeError
from petpipe.lr_finder import lr_sweep, suggest
from petpipe.models import unfreeze
from petpipe.distributed import launched_as_secondary_rank
from petpipe.params import Params
from petpipe.stages.common import load_dataset, seed_everything, stage_seed
from petpipe.training import choose_device, configure_threads, to_device

STAGE = "lr-find"


@dataclass(frozen=True)
class Inputs:
    images: Path
    index: Path
    checkpoint: Path


@dataclass(frozen=True)
class Outputs:
    result: Path
    curve: Path
    plot: Path


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    if launched_as_secondary_rank():  # a one-process stage: rank 0 alone runs it
        return ""
    configure_threads()
    device = choose_device(params.train.device)
    settings = params.lr_find
    used = {"train": params.train.model_dump(), "lr_find": settings.model_dump()}
    seed_everything(stage_seed(params.train.seed, STAGE))
    checkpoint = load_checkpoint(inputs.checkpoint)
    preprocessing = preprocessing_of(checkpoint)
    size, presize = checkpoint["preprocessing"]["img_size"], checkpoint["preprocessing"]["presize"]
    data = load_dataset(inputs.index, inputs.images, presize=presize, device=device,
                        workers=params.train.decode_workers, classes=checkpoint["classes"])
    model = to_device(model_from_checkpoint(checkpoint), device)
    unfreeze(model)

    with tracking.stage_run(STAGE, params=used) as run_log:
        curve = lr_sweep(model, images=data.train, start_lr=settings.start_lr, end_lr=settings.end_lr,
                         num_it=settings.num_it, stop_div=settings.stop_div, weight_decay=params.train.weight_decay,
                         batch_size=params.train.batch_size, size=size, augment=params.train.augment,
                         preprocessing=preprocessing, generator=torch.Generator().manual_seed(stage_seed(params.train.seed, STAGE)),
                         precision=params.train.precision)
        if len(curve["lr"]) < 5:
            raise PetpipeError(f"lr-find: the loss diverged after {len(curve['lr'])} batches; lower lr_find.start_lr "
                               f"or raise lr_find.stop_div")
        suggestions = suggest(curve["lr"], curve["smoothed_loss"], num_it=settings.num_it)
        if not all(math.isfinite(value) and value > 0 for value in suggestions.values()):
            raise PetpipeError(f"lr-find: suggestions are not usable ({suggestions}); check the data and lr_find params")
        chosen = suggestions[settings.suggestion]
        result = {
            "chosen": {"rule": settings.suggestion, "lr": chosen},
            "suggestions": suggestions,
            "iterations": len(curve["lr"]),
            "stopped_early": len(curve["lr"]) < settings.num_it,
            "curve": curve,
        }
        write_csv(outputs.curve, pd.DataFrame(curve))
        save_figure(outputs.plot, plots.plot_lr_find(curve["lr"], curve["smoothed_loss"], suggestions,
                                                     chosen=settings.suggestion))
        write_json(outputs.result, result)
        run_log.log_metrics({f"suggested_lr_{name}": value for name, value in suggestions.items()})
        for step, (lr, loss) in enumerate(zip(curve["lr"], curve["smoothed_loss"])):
            run_log.log_metrics({"lr_find_lr": lr, "lr_find_smoothed_loss": loss}, step=step)
        run_log.log_artifacts([outputs.result, outputs.curve, outputs.plot])
    described = ", ".join(f"{name} {value:.2e}" for name, value in suggestions.items())
    return f"lr-find: {len(curve['lr'])} iterations; {described}; chosen {settings.suggestion} = {chosen:.2e}"
