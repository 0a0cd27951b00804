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


# Modules whose changes cannot change any stage's outputs: they log, show progress or declare.
NOT_OUTPUT_CODE = frozenset({"petpipe/__init__.py", "petpipe/stages/__init__.py", "petpipe/tracking.py",
                             "petpipe/progress.py", "petpipe/errors.py", "petpipe/paths.py"})


def code_dependencies(stage: str) -> list[str]:
    """The petpipe source files a stage's outputs depend on (dvc.yaml's code deps): its module and every
    petpipe module imported at module level from there on, transitively, but NOT_OUTPUT_CODE."""
    package = Path(__file__).resolve().parents[1]
    seen: set[str] = set()
    pending = [_module_name(stage)]
    while pending:
        name = pending.pop()
        path = _source_file(package, name)
        if path is None or path in seen:
            continue
        seen.add(path)
        pending.extend(_imported_modules(package.parent / path))
    return sorted(seen - NOT_OUTPUT_CODE)


def _source_file(package: Path, module: str) -> str | None:
    """petpipe.stages.fetch -> "petpipe/stages/fetch.py" (relative to the project root), if it exists."""
    relative = Path(*module.split("."))
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if (package.parent / candidate).is_file():
            return candidate.as_posix()
    return None


def _imported_modules(path: Path) -> list[str]:
    """The petpipe modules a file imports at module level (`if TYPE_CHECKING:` blocks aside)."""
    modules = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names if alias.name.startswith("petpipe")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("petpipe"):
            # `from petpipe import plots` names a module; `from petpipe.data import load_index` a name in one.
            modules += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return modules
