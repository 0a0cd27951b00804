"""lr-find: sweep the learning rate on the unfrozen head-trained model; suggest one for finetune.

    petpipe lr-find --images stages/fetch/images --index stages/index-labels/index.csv \\
        --checkpoint stages/train-head/model.pt --result stages/lr-find/lr_find.json \\
        --curve stages/lr-find/lr_find.csv --plot stages/lr-find/lr_find.png

Only the outputs are written: the sweep trains an in-memory copy of the model,
never the checkpoint on disk (no temp file saved and reloaded, unlike fastai).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.interpret import plots
from petpipe.model.backbones import finetune_fixes_bn_stats, freeze_early, set_train_mode, unfreeze
from petpipe.model.checkpoint import load_checkpoint
from petpipe.params import LrFindParams, output_keys
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.train.compute import one_process
from petpipe.train.fit_loop import Criterion
from petpipe.train.hardware import to_device
from petpipe.train.levers import choose_levers
from petpipe.train.lr_range import StopRule, lr_sweep, suggest
from petpipe.utils.file_formats import save_figure, write_csv, write_json
from petpipe.utils.progress import progress_bar

# finetune.bn_stats and frozen_stride: the sweep trains what, and as, the finetune it is for will.
STAGE = Stage(
    "lr-find",
    params=(*output_keys("train"), "lr_find", "finetune.bn_stats", "finetune.frozen_stride"),
    compute=one_process,
)


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    index: Path = path_option("index-labels' index.csv.", at=stage_path("index-labels", "index.csv"))
    checkpoint: Path = path_option("train-head's model.pt.", at=stage_path("train-head", "model.pt"))


@dataclass(frozen=True)
class Outputs:
    result: Path = path_option(
        "lr_find.json to write.",
        file="lr_find.json",
        note="the curve, the suggestions, the verdict: what finetune reads",
    )
    curve: Path = path_option(
        "lr_find.csv to write.",
        file="lr_find.csv",
        kind="plots",
        plot={"template": "lr_find_log_x", "x": "lr", "y": "smoothed_loss", "x_label": "learning rate (log scale)"},
        note=".dvc/plots/lr_find_log_x.json: DVC's linear template with a logarithmic x axis",
    )
    plot: Path = path_option("lr_find.png to write.", file="lr_find.png", kind="plots")
    metrics: Path | None = path_option(
        "metrics.json to write: the suggestions, the chosen lr and whether the curve is trusted, as scalars "
        "(dvc metrics show, dvc exp show); not written when omitted.",
        optional=True,
        file="metrics.json",
        kind="metrics",
        note="the four suggestions, the edge, chosen_lr, trusted (1/0), iterations: one column each in dvc exp show",
    )


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    params, runtime = context.params, context.runtime
    head = load_checkpoint(inputs.checkpoint)
    data = context.dataset(inputs, head.spec)
    model = to_device(head.model(), runtime.device)
    unfreeze(model)
    freeze_early(model, params.finetune.frozen_stride)
    views = Views.of(head.spec, params.train.augment, size_ratio=params.lr_find.size_ratio)
    levers = choose_levers(runtime, model, data.train, views, params.train).levers
    to_device(model, runtime.device, levers.memory_format)
    set_train_mode(model, freeze_bn_stats=finetune_fixes_bn_stats(params.finetune.bn_stats, head.params))
    context.log.log_params({"levers": dataclasses.asdict(levers)})
    criterion = Criterion.of(params.train, data)  # the loss finetune will train on
    curve = lr_sweep(
        model,
        data.train,
        views=dataclasses.replace(views, memory_format=levers.memory_format),
        params=params,
        precision=levers.precision,
        generator=torch.Generator().manual_seed(context.seed),
        criterion=criterion,
        progress=progress_bar(STAGE.name),
    )
    result = {**choose(curve, params.lr_find), "class_weights": criterion.method}
    write_csv(outputs.curve, pd.DataFrame(curve))
    save_figure(
        outputs.plot,
        plots.plot_lr_find(
            curve["lr"],
            curve["smoothed_loss"],
            result["suggestions"],
            chosen=params.lr_find.suggestion,
            raw_losses=curve["loss"],
            threshold=result["divergence"]["threshold"],
            noise_window=result["noise"]["window"],
            trusted=result["trusted"],
        ),
    )
    write_json(outputs.result, result)
    numbers = scalar_metrics(result)  # the same names in metrics.json (DVC) and in the MLflow run
    if outputs.metrics is not None:
        write_json(outputs.metrics, numbers)
    context.log.log_metrics(numbers)
    for step, (lr, loss) in enumerate(zip(curve["lr"], curve["smoothed_loss"])):
        context.log.log_metrics({"lr_find_lr": lr, "lr_find_smoothed_loss": loss}, step=step)
    context.log.log_artifacts(
        [path for path in (outputs.result, outputs.curve, outputs.plot, outputs.metrics) if path is not None]
    )
    return summary(result)


def choose(curve: dict[str, list[float]], settings: LrFindParams) -> dict[str, Any]:
    """lr_find.json: fastai's four suggestions and the edge on the curve, whether the curve can be trusted (it
    rose past the divergence threshold: a curve of batch noise cannot), the lr chosen for finetune, the curve."""
    if len(curve["lr"]) < 5:
        raise PetpipeError(
            f"lr-find: the loss was not finite after {len(curve['lr'])} batches; lower "
            f"lr_find.start_lr, or check the data and the checkpoint"
        )
    rule = StopRule.of(settings)
    suggestions = {
        **suggest(curve["lr"], curve["smoothed_loss"], num_it=settings.num_it),
        "edge": rule.edge(curve["lr"], curve["loss"], curve["smoothed_loss"]),
    }
    if not all(math.isfinite(value) and value > 0 for value in suggestions.values()):
        raise PetpipeError(f"lr-find: suggestions are not usable ({suggestions}); check the data and lr_find params")
    trusted = rule.diverged(curve["loss"], curve["smoothed_loss"])  # the sweep stops at its first divergence
    threshold = rule.threshold(curve["loss"], curve["smoothed_loss"])
    noise = rule.noise(curve["loss"])
    window = curve["loss"][: rule.noise_window]
    chosen = (
        {"rule": settings.suggestion, "lr": suggestions[settings.suggestion]}
        if trusted
        else {"rule": "fallback_lr", "lr": settings.fallback_lr}
    )
    return {
        "chosen": chosen,
        "suggestions": suggestions,
        "trusted": trusted,
        "verdict": verdict(trusted, curve, settings),
        "iterations": len(curve["lr"]),
        "lr_reached": curve["lr"][-1],
        "stopped_early": len(curve["lr"]) < settings.num_it,
        "noise": {
            "window": rule.noise_window,
            "mean": float(sum(window) / len(window)) if window else None,
            "std": noise,
        },
        "divergence": {
            "threshold": threshold if math.isfinite(threshold) else None,
            "smoothed_loss": curve["smoothed_loss"][-1],
        },
        "curve": curve,
    }


def scalar_metrics(result: dict[str, Any]) -> dict[str, float | int]:
    """lr-find's metrics.json: lr_find.json's numbers that compare across experiments, one column each in
    `dvc exp show` (the curve and the verdict stay in lr_find.json); trusted is 1 or 0."""
    return {
        **{f"suggested_lr_{name}": float(value) for name, value in result["suggestions"].items()},
        "chosen_lr": float(result["chosen"]["lr"]),
        "trusted": int(result["trusted"]),
        "iterations": int(result["iterations"]),
        "lr_reached": float(result["lr_reached"]),
    }


def verdict(trusted: bool, curve: dict[str, list[float]], settings: LrFindParams) -> str:
    """One sentence: what the curve shows and what finetune.lr auto gets from it."""
    if trusted:
        return (
            f"the loss rose past the divergence threshold at lr {curve['lr'][-1]:.2e}: "
            f"finetune.lr auto uses the {settings.suggestion} suggestion"
        )
    return (
        f"no rise above the batch noise up to lr {curve['lr'][-1]:.2e}: the suggestions describe noise; "
        f"finetune.lr auto uses lr_find.fallback_lr {settings.fallback_lr:.2e}"
    )


def summary(result: dict[str, Any]) -> str:
    """The stage's one line."""
    described = ", ".join(f"{name} {value:.2e}" for name, value in result["suggestions"].items())
    noise = result["noise"]
    level = (
        f"; start loss {noise['mean']:.3f} +- {noise['std']:.3f}"
        if noise["mean"] is not None and noise["std"] is not None
        else ""
    )
    trust = "" if result["trusted"] else " (UNTRUSTED)"
    weighted = (
        f" (loss weighted by class: {result['class_weights']})" if result.get("class_weights", "none") != "none" else ""
    )
    return (
        f"lr-find: {result['iterations']} iterations to lr {result['lr_reached']:.2e}{weighted}{level}; "
        f"{described}{trust}; chosen {result['chosen']['rule']} = {result['chosen']['lr']:.2e}; "
        f"{result['verdict']}"
    )
