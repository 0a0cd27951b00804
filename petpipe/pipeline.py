"""What the pipeline declares, importing nothing: its stages in run order and the path fields of their
Inputs and Outputs. A leaf, so that tracking, the learner, the CLI and the stages can all read it."""

from __future__ import annotations

import dataclasses
from typing import Any

# The stages in run order (the tutorial's six, with audit and export added): dvc.yaml's, the CLI's and MLflow's order.
ORDER = ("fetch", "index-labels", "train-head", "audit", "lr-find", "finetune", "export", "evaluate")


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
