"""What the pipeline declares, importing nothing: its stages in run order and the path fields of their
Inputs and Outputs. A leaf, so that tracking, the learner, the CLI and the stages can all read it."""

from __future__ import annotations

import dataclasses
from typing import Any

# The stages in run order (the tutorial's six, with audit and export added): dvc.yaml's, the CLI's and MLflow's order.
ORDER = ("fetch", "index-labels", "train-head", "audit", "lr-find", "finetune", "export", "evaluate")


def path_option(
    help: str,
    *,
    option: str | None = None,
    optional: bool = False,
    at: str | None = None,
    file: str | None = None,
    kind: str = "outs",
    plot: dict[str, Any] | None = None,
    note: str | None = None,
) -> Any:
    """A path field of a stage's Inputs or Outputs: its --option (from the field's name unless given), its help,
    and where dvc.yaml puts it (`petpipe dvc-yaml` writes each stage's entry from these fields).

    optional: the stage may be run without it (its default is None).
    at: an input's path in the pipeline, an earlier stage's output (`stage_path("fetch", "images")`) or a
        params.yaml path (`${labels.corrections}`); None: an input the pipeline does not pass.
    file: an output's name in its stage's folder (stages/<stage>/<file>); None: one the pipeline does not ask for.
    kind: where dvc.yaml lists an output: outs, metrics or plots (a plot's fields in `plot`).
    note: the comment dvc.yaml shows above the path.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    metadata = {"help": help, "option": option, "at": at, "file": file, "kind": kind, "plot": plot, "note": note}
    if optional:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(metadata=metadata)


# Where an output goes in dvc.yaml.
KINDS = ("outs", "metrics", "plots")


def stage_path(stage: str, file: str) -> str:
    """An output's path in the pipeline: stages/<stage>/<file> (relative to the project)."""
    return f"stages/{stage}/{file}"


@dataclasses.dataclass(frozen=True)
class Dep:
    """A dependency no --option passes (fetch's data.source, read from params.yaml), with dvc.yaml's comment."""

    path: str
    note: str | None = None


def option_name(field: dataclasses.Field) -> str:
    """`--confusion-plot` for the field `confusion_plot`, unless the field names its own option."""
    return field.metadata.get("option") or "--" + field.name.replace("_", "-")
