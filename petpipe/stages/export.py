"""export: write finetune's model as an ONNX bundle (model.onnx and bundle.json) that predicts without torch.

petpipe export --model stages/finetune/model.pt --out stages/export/bundle
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe.inference.onnx_export import export_bundle
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage

# No params: the bundle is the checkpoint's, which carries its own spec (classes, size, mean, std).
STAGE = Stage("export", params=())


@dataclass(frozen=True)
class Inputs:
    model: Path = path_option(
        "The model.pt checkpoint to export (finetune's, in the pipeline).", at=stage_path("finetune", "model.pt")
    )


@dataclass(frozen=True)
class Outputs:
    bundle: Path = path_option(
        "Bundle folder to write: model.onnx and bundle.json, which `petpipe predict --model` and `petpipe serve "
        "--model` accept (replaced whole if it exists).",
        option="--out",
        file="bundle",
        note="model.onnx and bundle.json: what `petpipe predict` and `petpipe serve` take without torch; `dvc push` "
        "carries it",
    )


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    manifest = export_bundle(inputs.model, outputs.bundle)
    context.log.log_artifacts([outputs.bundle])
    # Into the MLflow model finetune logged with these weights (tracking.log_models), beside its checkpoint.
    context.log.attach_bundle(inputs.model, outputs.bundle)
    return f"export: {manifest['arch']} ({len(manifest['classes'])} classes) from {inputs.model} -> {outputs.bundle}"
