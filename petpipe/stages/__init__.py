"""The pipeline's stages, one module each, declared once.

A stage module holds `STAGE` (a `petpipe.runner.Stage`: its name in dvc.yaml, the
params.yaml sections or keys its outputs depend on, how it computes), `Inputs`
and `Outputs` (frozen dataclasses of paths whose fields are made with
`petpipe.pipeline.path_option`) and `run(params, inputs, outputs)`, its body
wrapped by `@STAGE.runs`. The CLI builds each stage's options from those
dataclasses, and `petpipe dvc-yaml` writes dvc.yaml from them (tests/test_stages.py
fails when the committed file differs). To add a stage: write its module, add its
name to ORDER (petpipe/pipeline.py) and its section to params.py and params.yaml,
then run `petpipe dvc-yaml`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from petpipe.pipeline import ORDER

__all__ = ["ORDER", "code_dependencies", "docstring", "load"]


def _module_name(stage: str) -> str:
    return f"{__name__}.{stage.replace('-', '_')}"


def load(stage: str) -> ModuleType:
    """The module of a stage named as in dvc.yaml (`train-head` -> petpipe.stages.train_head)."""
    return importlib.import_module(_module_name(stage))


def docstring(stage: str) -> str:
    """The stage module's docstring, read without importing the module (a training stage imports torch)."""
    origin = importlib.util.find_spec(_module_name(stage)).origin
    return ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""


# Modules whose changes cannot change any stage's outputs, so no stage depends on them and their imports are not
# followed: they declare (the stages, their paths, dvc.yaml itself), read and check params.yaml (DVC hashes the
# values themselves), write atomically (how bytes are shaped is petpipe/utils/file_formats.py, a dependency),
# check device names, log to MLflow, show progress or time phases.
PLUMBING = frozenset(
    {
        "petpipe/__init__.py",
        "petpipe/errors.py",
        "petpipe/pipeline.py",
        "petpipe/dvc_yaml.py",
        "petpipe/params.py",
        "petpipe/stages/__init__.py",
        "petpipe/track/identity.py",
        "petpipe/track/mlflow_runs.py",
        "petpipe/track/registry.py",
        "petpipe/utils/atomic.py",
        "petpipe/utils/devices.py",
        "petpipe/utils/paths.py",
        "petpipe/utils/progress.py",
        "petpipe/utils/timing.py",
        "petpipe/utils/yamlfile.py",
    }
)


def code_dependencies(stage: str) -> list[str]:
    """The petpipe source files a stage's outputs depend on (dvc.yaml's code deps): its module and every
    petpipe module it imports from there on, at module level or inside a function, transitively, but
    PLUMBING (whose imports are not followed: what they import serves them alone)."""
    package = Path(__file__).resolve().parents[1]
    seen: set[str] = set()
    pending = [_module_name(stage)]
    while pending:
        name = pending.pop()
        path = _source_file(package, name)
        if path is None or path in seen:
            continue
        seen.add(path)
        if path not in PLUMBING:
            pending.extend(imported_modules(package.parent / path))
    return sorted(path for path in seen - PLUMBING if not _only_a_docstring(package.parent / path))


def _only_a_docstring(path: Path) -> bool:
    """A package's __init__.py that says what lives there and runs nothing (petpipe/data/__init__.py)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def _source_file(package: Path, module: str) -> str | None:
    """petpipe.stages.fetch -> "petpipe/stages/fetch.py" (relative to the project root), if it exists."""
    relative = Path(*module.split("."))
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if (package.parent / candidate).is_file():
            return candidate.as_posix()
    return None


def imported_modules(path: Path) -> list[str]:
    """The petpipe modules a file imports, anywhere in it but in `if TYPE_CHECKING:` blocks (annotations only)."""
    modules = []
    pending: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names if alias.name.startswith("petpipe")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("petpipe"):
            # `from petpipe.interpret import plots` names a module; `from petpipe.data.image_index import load_index`
            # a name in one.
            modules += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        pending.extend(ast.iter_child_nodes(node))
    return modules
