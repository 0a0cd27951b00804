"""The package's layers: no import cycles, configuration that loads without torch, stages that do not import
each other, and heavy checks where the heavy libraries are loaded anyway."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_without_torch
from petpipe.errors import PetpipeError
from petpipe.stages import imported_modules

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

PACKAGE = Path(__file__).resolve().parents[1] / "petpipe"
SAMPLE_IMAGES = PACKAGE.parents[1] / "shared" / "data" / "pets-sample" / "images"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """petpipe module -> the petpipe modules it imports anywhere (module level or in a function), read from
    the source (`if TYPE_CHECKING:` blocks aside): `from petpipe.serve import pages` counts as
    petpipe.serve.pages, `from petpipe.serve.app import create_app` as petpipe.serve.app."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        named = {module for module in imported_modules(path) if module in modules}
        # A package named only as the place of a submodule it imports from is not itself imported for it.
        parents = {module.rsplit(".", 1)[0] for module in named if "." in module}
        named -= {parent for parent in parents if _only_submodules_from(path, parent, modules)}
        graph[name] = named - {name, "petpipe"}
    return graph


def _only_submodules_from(path: Path, package: str, modules: dict[str, Path]) -> bool:
    """True when every `from <package> import ...` in the file names submodules, and none is `import <package>`."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == package:
            if any(f"{package}.{alias.name}" not in modules for alias in node.names):
                return False
        elif isinstance(node, ast.Import) and any(alias.name == package for alias in node.names):
            return False
    return True


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for neighbour in sorted(graph.get(node, ())):
            if state.get(neighbour) == "open":
                return stack[stack.index(neighbour) :] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_imports_and_cycles():
    assert "petpipe.inference.predict" in import_graph()["petpipe.cli"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_anywhere_in_petpipe():
    assert find_cycle(import_graph()) is None


def test_stages_do_not_import_each_other_and_nothing_below_imports_them():
    graph = import_graph()
    stage_modules = {name for name in graph if name.startswith("petpipe.stages.")}
    for name in stage_modules:
        assert not graph[name] & stage_modules, f"{name} imports another stage: {graph[name] & stage_modules}"
    for name, imported in graph.items():
        if name.startswith("petpipe.stages") or name in {
            "petpipe.cli",
            "petpipe.dvc_yaml",
        }:  # the top: they read stages
            continue
        below = {module for module in imported if module.startswith("petpipe.stages")}
        assert not below, f"{name} sits below the stages but imports {below}"


@pytest.mark.parametrize("leaf", ["petpipe.params", "petpipe.pipeline", "petpipe.utils.yamlfile", "petpipe.errors"])
def test_configuration_modules_are_leaves(leaf):
    """Configuration is a leaf: what it imports of petpipe imports nothing heavy (checked in a subprocess)."""
    code = (
        f"import sys, {leaf}; print(sorted(m for m in ('torch', 'torchvision', 'timm', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"importing {leaf} loads {result.stdout.strip()}"


def test_predicting_with_a_bundle_imports_neither_torch_nor_pandas_nor_mlflow():
    """petpipe.inference.predict and petpipe.inference.bundle (what `petpipe predict --model bundle/` runs) load
    with numpy and Pillow, onnxruntime coming when a bundle is opened; the CLI adds its own click and pydantic."""
    code = (
        "import sys, petpipe.inference.predict, petpipe.inference.bundle, petpipe.cli; "
        "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'mlflow', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"importing the bundle's predictor loads {result.stdout.strip()}"


def test_import_petpipe_is_cheap_and_its_api_loads_torch_only_for_a_checkpoint():
    """`import petpipe` loads nothing heavy; its Python API (petpipe/api.py, loaded on first use) brings pandas
    for its tables but neither torch nor MLflow: a bundle predicts without torch, and a `models:/` URI or a
    checkpoint imports what it needs when it is loaded."""
    heavy = "sorted(m for m in ('torch', 'torchvision', 'timm', 'mlflow', 'pandas', 'sklearn') if m in sys.modules)"
    code = f"import sys, petpipe; print({heavy}); petpipe.load_model, petpipe.results; print({heavy})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    bare, with_api = result.stdout.splitlines()
    assert bare == "[]", f"import petpipe loads {bare}"
    assert with_api == "['pandas']", with_api
    # The module of show_batch's figure cannot shadow the function: petpipe.show_batch stays the API's.
    code = (
        "import petpipe, petpipe.interpret.draw_batch, petpipe.api; print(petpipe.show_batch is petpipe.api.show_batch)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "True"
    )


def test_fetch_and_index_labels_never_import_torch(tmp_path):
    """params.yaml loads, fetch copies and index-labels labels, splits and reports without torch: both commands
    exactly as dvc.yaml runs them, and index-labels depends on no model or training code (show_batch.png, drawn
    through the training augmentation, is train-head's)."""
    project = tmp_path / "project"
    (project / "labels").mkdir(parents=True)
    raw = (PACKAGE.parent / "params.yaml").read_text()
    raw = raw.replace("source: data/oxford-iiit-pet.url", f"source: {SAMPLE_IMAGES}").replace(
        "checksum: md5:5c4f3ee8e5d25df40f4fd59a7f44e54c", "checksum: null"
    )
    (project / "params.yaml").write_text(raw)
    (project / "labels" / "corrections.csv").write_text("path,action,label\n")
    declared = yaml.safe_load((PACKAGE.parent / "dvc.yaml").read_text())["stages"]
    corrections = yaml.safe_load(raw)["labels"]["corrections"]
    for stage, expected in (("fetch", "fetched 370 images"), ("index-labels", "indexed 370 images of 37 classes")):
        words = shlex.split(declared[stage]["cmd"].replace("${labels.corrections}", corrections))
        assert words[:2] == ["petpipe", stage]
        ran = run_without_torch(words[1:], project)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert expected in ran.stdout
    index = project / "stages" / "index-labels" / "index.csv"
    assert len(index.read_text().splitlines()) == 371
    code = [dep for dep in declared["index-labels"]["deps"] if dep.startswith("petpipe/")]
    assert not [dep for dep in code if dep.startswith(("petpipe/model/", "petpipe/train/", "petpipe/data/views"))]
    # A stage that does need torch fails under the same guard: the guard is real.
    drawn = run_without_torch(["train-head", "--help"], project)
    assert drawn.returncode != 0 and "torch imported" in drawn.stderr


def test_an_unknown_architecture_is_refused_where_the_model_is_built_with_close_names():
    from petpipe.model.backbones import check_architecture

    with pytest.raises(
        PetpipeError,
        match=r"model.arch = 'resnet35' is not a torchvision or timm model; "
        r"close names: .*resnet34",
    ):
        check_architecture("resnet35")
    check_architecture("tf_efficientnet_lite0")  # timm's
    check_architecture("resnet34")  # torchvision's


def test_train_head_refuses_an_unknown_architecture_before_decoding_any_photo(tmp_path, monkeypatch):
    import yaml

    from petpipe.params import parse_params, with_overrides
    from petpipe.stages import train_head
    from petpipe.train import compute

    raw = yaml.safe_load((PACKAGE.parent / "params.yaml").read_text())
    params = parse_params(with_overrides(raw, {"model.arch": "resnet35"}))
    monkeypatch.setattr(compute, "load_dataset", lambda *args, **kwargs: pytest.fail("decoded photos first"))
    with pytest.raises(PetpipeError, match="close names: .*resnet34"):
        train_head.run(
            params,
            train_head.Inputs(images=tmp_path, index=tmp_path / "index.csv"),
            train_head.Outputs(
                model=tmp_path / "m.pt",
                metrics=tmp_path / "m.json",
                history=tmp_path / "h.csv",
                plot=tmp_path / "p.png",
            ),
        )


# ---------------------------------------------------------------- limits that hold the line

MAX_FUNCTION_LINES, MAX_PARAMETERS, MAX_README_LINES = 50, 8, 300
# Over the limits today (issue #29 folded the last ones into the Learner); the lists may only shrink: a function
# that comes under its limit must leave them, and nothing new may join them.
TOO_LONG: set[str] = set()
TOO_MANY_PARAMETERS: set[str] = set()


def _functions() -> dict[str, tuple[int, int]]:
    """Every function in petpipe/ (module:name) -> (lines from def to its last line, parameters but self/cls)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = node.args
                named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
                count = len(named) + bool(arguments.vararg) + bool(arguments.kwarg)
                count -= bool(named) and named[0].arg in ("self", "cls")
                found[f"{path.relative_to(PACKAGE).as_posix()}:{node.name}"] = (
                    node.end_lineno - node.lineno + 1,
                    count,
                )
    return found


def test_no_function_grows_past_50_lines_or_8_parameters():
    functions = _functions()
    long = {name for name, (lines, _) in functions.items() if lines > MAX_FUNCTION_LINES}
    many = {name for name, (_, count) in functions.items() if count > MAX_PARAMETERS}
    assert long <= TOO_LONG, f"over {MAX_FUNCTION_LINES} lines: {sorted(long - TOO_LONG)}; split them"
    assert many <= TOO_MANY_PARAMETERS, f"over {MAX_PARAMETERS} parameters: {sorted(many - TOO_MANY_PARAMETERS)}"
    assert long == TOO_LONG, f"now within {MAX_FUNCTION_LINES} lines: remove {sorted(TOO_LONG - long)} from TOO_LONG"
    assert many == TOO_MANY_PARAMETERS, f"now within the limit: remove {sorted(TOO_MANY_PARAMETERS - many)}"


def test_the_readme_front_page_stays_within_300_lines():
    lines = (PACKAGE.parent / "README.md").read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_no_two_modules_share_a_name_and_every_package_says_what_lives_there():
    """The folders show the architecture (README: Where to change what): a module's name is unique in petpipe,
    `__init__` aside, and each package opens with a docstring."""
    names = [path.stem for path in PACKAGE.rglob("*.py") if path.stem != "__init__"]
    assert sorted({name for name in names if names.count(name) > 1}) == []
    for init in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
