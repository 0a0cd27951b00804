"""dvc.yaml, written from the stages' declarations (`petpipe dvc-yaml`), never by hand.

Each stage's entry comes from its module (petpipe/stages/<stage>.py): the command from its `Inputs` and `Outputs`
(each field's --option and its path in the pipeline), deps from the inputs, `STAGE.deps` and the modules that can
change its outputs (`petpipe.stages.code_dependencies`, the import graph without the plumbing), params from
`STAGE.params`, and outs, metrics and plots from each output's `kind`. tests/test_stages.py fails when the
committed dvc.yaml differs from what this writes. Torch is imported with the training stages' modules.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from typing import Any

from petpipe import stages
from petpipe.pipeline import KINDS, ORDER, option_name, stage_path

WIDTH = 120
HEADER = """\
# Written by `petpipe dvc-yaml` from each stage's declaration in petpipe/stages/<stage>.py (its Inputs, Outputs
# and STAGE): edit those and run `petpipe dvc-yaml`, not this file (tests/test_stages.py compares the two).
# fetch, index-labels, train-head, lr-find, finetune and evaluate are the fastai tutorial's steps; each cmd
# passes exactly the paths its deps and outs declare, and params.yaml holds the values.
stages:
"""
CODE_NOTE = "code: what can change its outputs (the modules it imports, transitively, but the plumbing)"
TRAIN_NOTE = "every train key but those that change no output (petpipe/params.py: OUTPUT_NEUTRAL)"
# Comparisons across stages and experiments: pipeline-level plots that no one stage owns.
PIPELINE_PLOTS = """\
# Comparisons across stages and experiments (`dvc plots show`, `dvc plots diff`; README: Compare experiments).
plots:
  - losses per epoch:
      template: linear
      x: epoch
      y:
        stages/train-head/history.csv: [train_loss, valid_loss]
        stages/finetune/history.csv: [train_loss, valid_loss]
  - lr-find curve:
      template: lr_find_log_x  # .dvc/plots/lr_find_log_x.json
      x_label: learning rate (log scale)
      x: lr
      y:
        stages/lr-find/lr_find.csv: smoothed_loss
  - confusion matrix, rows normalised:
      template: confusion_normalized
      x: predicted
      y:
        stages/evaluate/confusion.csv: actual
"""


def render() -> str:
    """The whole dvc.yaml."""
    entries = ["\n".join(stage_entry(name)) for name in ORDER]
    return HEADER + "\n\n".join(entries) + "\n\n" + PIPELINE_PLOTS


def stage_entry(name: str) -> list[str]:
    """One stage's lines, indented under `stages:`."""
    module = stages.load(name)
    inputs = [(field, field.metadata.get("at")) for field in dataclasses.fields(module.Inputs)]
    outputs = [
        (field, stage_path(name, field.metadata["file"]))
        for field in dataclasses.fields(module.Outputs)
        if field.metadata.get("file")
    ]
    inputs = [(field, path) for field, path in inputs if path]
    lines = [f"  {name}:", "    cmd: >-", f"      petpipe {name}"]
    lines += [f"      {option_name(field)} {path}" for field, path in [*inputs, *outputs]]
    lines.append("    deps:")
    for field, path in inputs:
        lines += _item(path, field.metadata.get("note"))
    for dep in module.STAGE.deps:
        lines += _item(dep.path, dep.note)
    lines += _comment(CODE_NOTE, 6) + [f"      - {path}" for path in stages.code_dependencies(name)]
    if module.STAGE.params:  # export has none: its checkpoint carries everything it needs
        lines.append("    params:")
        if any(key.startswith("train.") for key in module.STAGE.params):
            lines += _comment(TRAIN_NOTE, 6)
        lines += [f"      - {key}" for key in module.STAGE.params]
    for kind in KINDS:
        listed = [(field, path) for field, path in outputs if field.metadata["kind"] == kind]
        if listed:
            lines.append(f"    {kind}:")
            for field, path in listed:
                lines += _item(path, field.metadata.get("note"), field.metadata.get("plot"))
    return lines


def _item(path: str, note: str | None, fields: dict[str, Any] | None = None) -> list[str]:
    """A list item at six spaces, its comment above it, a plot's fields under it."""
    lines = _comment(note, 6) if note else []
    if not fields:
        return [*lines, f"      - {path}"]
    return [*lines, f"      - {path}:", *(f"          {key}: {_scalar(value)}" for key, value in fields.items())]


def _comment(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=" " * indent + "# ", subsequent_indent=" " * indent + "# ")


def _scalar(value: Any) -> str:
    """A YAML scalar: plain where YAML reads it back as the same string, else double-quoted (JSON is YAML)."""
    text = str(value)
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w .()/-]*", text) and text.strip() == text:
        return text
    return json.dumps(value)
