"""Security: nothing petpipe reads can run code, escape a folder, or ship a pickle.

- params.yaml is read with yaml.safe_load and validated: YAML tags and Python-looking strings are
  never evaluated;
- every torch.load passes weights_only=True (checked on the source), so a checkpoint carrying a
  pickled object is refused, not run;
- crafted zip archives (path traversal, absolute paths, symlinks out, device files) are refused
  (tests/test_fetch.py does the same for tar, hard links included);
- an exported bundle is ONNX + JSON, loadable with pickle switched off;
- the documentation binds an MLflow server to 127.0.0.1 unless the reader decides otherwise.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import PROJECT_ROOT, SAMPLE_IMAGES, model_spec

from petpipe.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from petpipe.cli import main
from petpipe.errors import PetpipeError
from petpipe.fetch import fetch_source
from petpipe.params import ParamsError, load_params

PACKAGE = PROJECT_ROOT / "petpipe"
A_PHOTO = min(SAMPLE_IMAGES.glob("pug_*.jpg"))


# ---------------------------------------------------------------- params are data, never code


def params_text_with(section: str, key: str, value_yaml: str) -> str:
    """The project's params.yaml with one value replaced by raw YAML text."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw[section][key] = "__PLACEHOLDER__"
    return yaml.safe_dump(raw, sort_keys=False).replace("__PLACEHOLDER__", value_yaml)


@pytest.mark.parametrize("value_yaml", [
    '!!python/object/apply:os.system ["touch {pwned}"]',
    "!!python/object/apply:subprocess.check_output [[touch, {pwned}]]",
    '!!python/object/new:os.system ["touch {pwned}"]',
    "!!python/name:os.system",
    '!!python/module:os',
])
def test_yaml_tags_that_would_run_code_are_refused_and_nothing_runs(tmp_path, value_yaml):
    pwned = tmp_path / "pwned"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(params_text_with("data", "source", value_yaml.format(pwned=pwned)))

    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(params_file)
    result = CliRunner().invoke(main, ["fetch", "--params", str(params_file), "--out", str(tmp_path / "images")])

    assert result.exit_code == 1 and "not valid YAML" in result.output and "Traceback" not in result.output
    assert not pwned.exists() and not (tmp_path / "images").exists()


@pytest.mark.parametrize("section, key, code", [
    ("finetune", "lr", "__import__('os').system('touch {pwned}') or 1e-4"),
    ("train_head", "epochs", "eval('4')"),
    ("split", "valid_pct", "1/5"),
    ("model", "img_size", "lambda: 224"),
    ("train", "device", "exec('import os; os.system(\"touch {pwned}\")')"),
])
def test_python_looking_strings_are_refused_as_values_and_never_evaluated(tmp_path, section, key, code):
    pwned = tmp_path / "pwned"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(params_text_with(section, key, json.dumps(code.format(pwned=pwned))))

    with pytest.raises(ParamsError, match=rf"params\.yaml: {section}\.{key}\b"):
        load_params(params_file)
    assert not pwned.exists()


def test_a_code_string_as_data_source_is_only_ever_a_path(tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PETPIPE_TRACKING", "off")
    params_file = tmp_path / "params.yaml"
    code = f"__import__('os').system('touch {pwned}')"
    params_file.write_text(params_text_with("data", "source", json.dumps(code)))
    assert load_params(params_file).data.source == code  # a string like any other

    result = CliRunner().invoke(main, ["fetch", "--params", str(params_file), "--out", "images"])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    assert not pwned.exists()


def calls_in_package() -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                found.append((path, node))
    return found


def dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return "?"


def test_no_code_in_petpipe_evaluates_strings_or_unpickles():
    forbidden = {"eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads",
                 "pickle.Unpickler", "marshal.loads", "dill.load", "cloudpickle.load", "joblib.load",
                 "torch.jit.load", "torch.package.PackageImporter"}
    offending = [f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {dotted_name(node.func)}"
                 for path, node in calls_in_package() if dotted_name(node.func) in forbidden]
    assert offending == []
    # numpy arrays are loaded without pickle (allow_pickle defaults to False; nobody turns it on).
    allowing = [f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}" for path, node in calls_in_package()
                if dotted_name(node.func).endswith(".load") and any(
                    keyword.arg == "allow_pickle" for keyword in node.keywords)]
    assert allowing == []


# ---------------------------------------------------------------- checkpoints: weights_only, always


def test_every_torch_load_in_petpipe_passes_weights_only_true():
    loads = [(path, node) for path, node in calls_in_package() if dotted_name(node.func) == "torch.load"]
    assert loads, "no torch.load found: has the checkpoint code moved?"
    unsafe = []
    for path, node in loads:
        weights_only = [keyword.value for keyword in node.keywords if keyword.arg == "weights_only"]
        if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
            unsafe.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert unsafe == [], "torch.load without weights_only=True"
    # and nothing takes torch.load under another name (an alias would escape the check above)
    aliased = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        aliased += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and dotted_name(node) == "torch.load" and id(node) not in called]
        aliased += [f"{path.name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "torch" and any(alias.name == "load" for alias in node.names)]
    assert aliased == []


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file with the checkpoint format marker that would run a shell command when unpickled."""
    torch.save({"format": FORMAT, "state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}, path)
    return path


def test_a_checkpoint_with_a_pickled_object_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = malicious_checkpoint(tmp_path / "model.pt", marker)
    assert pickle.loads(pickle.dumps(0)) == 0  # (pickle itself works: the refusal is torch's weights_only)

    with pytest.raises(PetpipeError, match="cannot be read safely"):
        load_checkpoint(checkpoint)
    result = CliRunner().invoke(main, ["predict", "--model", str(checkpoint), str(A_PHOTO)])
    assert result.exit_code == 1 and "cannot be read safely" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["export", "--model", str(checkpoint), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and "cannot be read safely" in result.output
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_a_malicious_resume_file_is_ignored_not_run(tmp_path, monkeypatch, caplog):
    from petpipe.resume import ResumeFile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "index.csv").write_text("path,label\n")
    resume = ResumeFile("train-head", params={"a": 1}, inputs=[tmp_path / "index.csv"])
    marker = tmp_path / "pwned"
    resume.path.parent.mkdir(parents=True)
    malicious_checkpoint(resume.path, marker)

    assert resume.load() is None
    assert "ignoring unreadable resume file" in caplog.text and not marker.exists()


def test_malicious_local_weights_are_refused_not_run(tmp_path):
    from petpipe.models import build_model

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    torch.save({"conv_stem.weight": RunsCodeWhenUnpickled(marker)}, weights)
    with pytest.raises(Exception, match="(?i)weights only|weights_only|unpickl"):
        build_model(model_spec("tf_efficientnet_lite0", str(weights), head_dropout=0.0))
    assert not marker.exists()


# ---------------------------------------------------------------- hostile zip archives

def zip_entry(name: str, data: bytes = b"evil", mode: int | None = None) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16
        info.create_system = 3  # unix
    return info, data


HOSTILE_ZIPS = {
    "parent traversal": ([zip_entry("images/ok.jpg"), zip_entry("../evil.txt")], "climbs out"),
    "nested traversal": ([zip_entry("images/../../evil.txt")], "climbs out"),
    "windows traversal": ([zip_entry("images\\..\\..\\evil.txt")], "climbs out"),
    "absolute path": ([zip_entry("/tmp/petpipe-evil.txt")], "absolute path"),
    "drive letter": ([zip_entry("C:/evil.txt")], "absolute path"),
    "symlink to /etc/passwd": ([zip_entry("images/passwd.jpg", b"/etc/passwd", stat.S_IFLNK | 0o777)], "links to"),
    "symlink to ../..": ([zip_entry("images/up", b"../..", stat.S_IFLNK | 0o777)], "links to"),
    "symlink made unsafe by a later one": ([zip_entry("a", b"q/..", stat.S_IFLNK | 0o777),
                                            zip_entry("q", b".", stat.S_IFLNK | 0o777)], "links to"),
    "character device": ([zip_entry("images/tty", b"", stat.S_IFCHR | 0o666)], "device"),
    "block device": ([zip_entry("images/disk", b"", stat.S_IFBLK | 0o666)], "device"),
    "fifo": ([zip_entry("images/pipe", b"", stat.S_IFIFO | 0o666)], "device, fifo"),
}


@pytest.mark.parametrize("entries, why", HOSTILE_ZIPS.values(), ids=HOSTILE_ZIPS.keys())
def test_hostile_zip_is_refused_and_writes_nothing(tmp_path, monkeypatch, entries, why):
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for info, content in entries:
            zipped.writestr(info, content)
    output = tmp_path / "work/stages/fetch/images"

    with pytest.raises(PetpipeError, match="refusing to extract") as refused:
        fetch_source(str(archive), None, output)

    assert why in str(refused.value) and "nothing was extracted" in str(refused.value)
    assert not output.exists()
    assert {path for path in tmp_path.rglob("*") if not path.is_dir()} == {archive}
    assert not Path("/tmp/petpipe-evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


# ---------------------------------------------------------------- exported bundles hold no pickle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained 3-class model exported through the CLI: the bundle's format, not its accuracy, is under test."""
    for module in ("onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    from petpipe.models import build_model

    folder = tmp_path_factory.mktemp("tiny-export")
    spec = model_spec("tf_efficientnet_lite0", "none", head_hidden=16, head_dropout=0.0, classes=("a", "b", "c"),
                      mean=(0.5,) * 3, std=(0.5,) * 3, img_size=32, presize=36)
    model = build_model(spec, pretrained=False)
    checkpoint = Checkpoint.of(model.eval(), spec, stage="finetune", params={}, history=[])
    save_checkpoint(folder / "model.pt", checkpoint)
    result = CliRunner().invoke(main, ["export", "--model", str(folder / "model.pt"), "--out", str(folder / "bundle")])
    assert result.exit_code == 0, result.output
    return folder / "bundle"


PICKLE_PROTOCOL_HEADER = re.compile(rb"^\x80[\x02-\x05]")


def test_an_exported_bundle_is_onnx_and_json_only(tiny_bundle):
    import onnx

    files = sorted(path.name for path in tiny_bundle.rglob("*"))
    assert files == ["bundle.json", "model.onnx"]
    for path in tiny_bundle.iterdir():
        content = path.read_bytes()
        assert not zipfile.is_zipfile(io.BytesIO(content)), f"{path.name} is a zip (torch.save format)"
        assert not PICKLE_PROTOCOL_HEADER.match(content), f"{path.name} starts like a pickle"
        assert b"data.pkl" not in content
    json.loads((tiny_bundle / "bundle.json").read_text())  # plain JSON
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(model)
    assert not [tensor.name for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]


def test_a_bundle_predicts_with_pickle_and_torch_load_switched_off(tiny_bundle, monkeypatch):
    from petpipe.predict import load_predictor, predict_files

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle must never be unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    predictor = load_predictor(tiny_bundle, device="cpu")
    [prediction] = predict_files(predictor, [A_PHOTO], top_k=3)
    assert prediction.error is None and {label for label, _ in prediction.labels} == {"a", "b", "c"}


# ---------------------------------------------------------------- MLflow bound to localhost in the docs


def documentation() -> list[Path]:
    return sorted([PROJECT_ROOT / "README.md", *(PROJECT_ROOT / "docs").glob("*.md")])


def mlflow_server_commands(text: str) -> list[str]:
    """Every `mlflow server` / `mlflow ui` command in fenced code blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if re.search(r"\bmlflow\s+(server|ui)\b", line)]
    return commands


def test_documented_mlflow_servers_listen_on_localhost_only():
    """MLflow's server has no authentication: a command a reader copies must not open it to the network.

    `--host` absent (MLflow's default is 127.0.0.1) or 127.0.0.1/localhost; exposing it is the
    reader's own decision (behind a proxy with authentication), made in prose, not in a copy-paste line.
    """
    exposed = []
    for path in documentation():
        for command in mlflow_server_commands(path.read_text()):
            host = re.search(r"(?:--host|-h)[=\s]+(\S+)", command.split("#", 1)[0])
            if host and host.group(1).strip("'\"") not in ("127.0.0.1", "localhost", "::1"):
                exposed.append(f"{path.relative_to(PROJECT_ROOT)}: {command}")
    assert exposed == []
