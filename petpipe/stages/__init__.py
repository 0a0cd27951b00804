"""The pipeline's stages, one module each, declared once.

A stage module holds `STAGE` (its name in dvc.yaml), `PARAMS` (the params.yaml
sections or keys its outputs depend on: dvc.yaml's `params`), `Inputs` and
`Outputs` (frozen dataclasses of paths whose fields are made with `path`) and
`run(params, inputs, outputs)`. The CLI builds each stage's options from those
dataclasses, and tests/test_stages.py checks dvc.yaml against them. To add a
stage: write its module, add its name to ORDER, its section to params.py and
params.yaml, and its entry to dvc.yaml.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

# The stages in run order: dvc.yaml's, the CLI's and MLflow's order.
ORDER = ("fetch", "index-labels", "train-head", "lr-find", "finetune", "evaluate")


def _module_name(stage: str) -> str:
    return f"{__name__}.{stage.replace('-', '_')}"


def load(stage: str) -> ModuleType:
    """The module of a stage named as in dvc.yaml (`train-head` -> petpipe.stages.train_head)."""
    return importlib.import_module(_module_name(stage))


def docstring(stage: str) -> str:
    """The stage module's docstring, read without importing the module (a training stage imports torch)."""
    origin = importlib.util.find_spec(_module_name(stage)).origin
    return ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""


def path_option(help: str, *, option: str | None = None, optional: bool = False) -> Any:
    """A path field of a stage's Inputs or Outputs: its --option (from the field's name unless given) and help.

    optional: the stage may be run without it (its default is None).
    """
    metadata = {"help": help, "option": option}
    if optional:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(metadata=metadata)


def option_name(field: dataclasses.Field) -> str:
    """`--confusion-plot` for the field `confusion_plot`, unless the field names its own option."""
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")
