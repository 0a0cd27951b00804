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
import gzip
import io
import json
import os
import pickle
import re
import stat
import struct
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import PROJECT_ROOT, SAMPLE_IMAGES, model_spec
from petpipe.cli import main
from petpipe.data.sources import fetch_source
from petpipe.errors import PetpipeError
from petpipe.model.checkpoint import FORMAT, load_checkpoint
from petpipe.params import ParamsError, load_params

PACKAGE = PROJECT_ROOT / "petpipe"
A_PHOTO = min(SAMPLE_IMAGES.glob("pug_*.jpg"))


# ---------------------------------------------------------------- params are data, never code


def params_text_with(section: str, key: str, value_yaml: str) -> str:
    """The project's params.yaml with one value replaced by raw YAML text."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw[section][key] = "__PLACEHOLDER__"
    return yaml.safe_dump(raw, sort_keys=False).replace("__PLACEHOLDER__", value_yaml)


@pytest.mark.parametrize(
    "value_yaml",
    [
        '!!python/object/apply:os.system ["touch {pwned}"]',
        "!!python/object/apply:subprocess.check_output [[touch, {pwned}]]",
        '!!python/object/new:os.system ["touch {pwned}"]',
        "!!python/name:os.system",
        "!!python/module:os",
    ],
)
def test_yaml_tags_that_would_run_code_are_refused_and_nothing_runs(tmp_path, value_yaml):
    pwned = tmp_path / "pwned"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(params_text_with("data", "source", value_yaml.format(pwned=pwned)))

    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(params_file)
    result = CliRunner().invoke(main, ["fetch", "--params", str(params_file), "--out", str(tmp_path / "images")])

    assert result.exit_code == 1 and "not valid YAML" in result.output and "Traceback" not in result.output
    assert not pwned.exists() and not (tmp_path / "images").exists()


@pytest.mark.parametrize(
    "section, key, code",
    [
        ("finetune", "lr", "__import__('os').system('touch {pwned}') or 1e-4"),
        ("train_head", "epochs", "eval('4')"),
        ("split", "valid_pct", "1/5"),
        ("model", "img_size", "lambda: 224"),
        ("train", "device", "exec('import os; os.system(\"touch {pwned}\")')"),
    ],
)
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
    forbidden = {
        "eval",
        "exec",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "pickle.load",
        "pickle.loads",
        "pickle.Unpickler",
        "marshal.loads",
        "dill.load",
        "cloudpickle.load",
        "joblib.load",
        "torch.jit.load",
        "torch.package.PackageImporter",
    }
    offending = [
        f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {dotted_name(node.func)}"
        for path, node in calls_in_package()
        if dotted_name(node.func) in forbidden
    ]
    assert offending == []
    # numpy arrays are loaded without pickle (allow_pickle defaults to False; nobody turns it on).
    allowing = [
        f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}"
        for path, node in calls_in_package()
        if dotted_name(node.func).endswith(".load") and any(keyword.arg == "allow_pickle" for keyword in node.keywords)
    ]
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
        aliased += [
            f"{path.name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and dotted_name(node) == "torch.load" and id(node) not in called
        ]
        aliased += [
            f"{path.name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(alias.name == "load" for alias in node.names)
        ]
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
    from petpipe.train.resume import ResumeFile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "index.csv").write_text("path,label\n")
    resume = ResumeFile("train-head", params={"a": 1}, inputs=[tmp_path / "index.csv"])
    marker = tmp_path / "pwned"
    resume.path.parent.mkdir(parents=True)
    malicious_checkpoint(resume.path, marker)
    from petpipe.utils.file_formats import file_digest

    resume.record.write_text(json.dumps({"bytes": resume.path.stat().st_size, "sha256": file_digest(resume.path)}))

    assert resume.load() is None
    assert "ignoring resume file" in caplog.text and "is unreadable" in caplog.text and not marker.exists()


def test_malicious_local_weights_are_refused_not_run(tmp_path):
    from petpipe.model.backbones import build_model

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
    "symlink made unsafe by a later one": (
        [zip_entry("a", b"q/..", stat.S_IFLNK | 0o777), zip_entry("q", b".", stat.S_IFLNK | 0o777)],
        "links to",
    ),
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


# `bundle` (conftest): the session's trained model exported through the CLI, once; its format is under test here.
PICKLE_PROTOCOL_HEADER = re.compile(rb"^\x80[\x02-\x05]")


def test_an_exported_bundle_is_onnx_and_json_only(bundle):
    import onnx

    files = sorted(path.name for path in bundle.rglob("*"))
    assert files == ["bundle.json", "model.onnx"]
    for path in bundle.iterdir():
        content = path.read_bytes()
        assert not zipfile.is_zipfile(io.BytesIO(content)), f"{path.name} is a zip (torch.save format)"
        assert not PICKLE_PROTOCOL_HEADER.match(content), f"{path.name} starts like a pickle"
        assert b"data.pkl" not in content
    json.loads((bundle / "bundle.json").read_text())  # plain JSON
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.checker.check_model(model)
    assert not [tensor.name for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL]


def test_a_bundle_predicts_with_pickle_and_torch_load_switched_off(bundle, monkeypatch):
    from petpipe.inference.predict import load_predictor, predict_files

    classes = json.loads((bundle / "bundle.json").read_text())["classes"]

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle must never be unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    predictor = load_predictor(bundle, device="cpu")
    [prediction] = predict_files(predictor, [A_PHOTO], top_k=3)
    labels = {label for label, _ in prediction.labels}
    assert prediction.error is None and len(labels) == 3 and labels <= set(classes)


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


# ---------------------------------------------------------------- archives that inflate without bound
#
# Each archive here is a few KB on disk and refused before it writes megabytes: the limits are
# checked on the sizes an archive declares (zip's central directory, each tar header) before each
# entry is written, and zip entries are counted while they are written.

ZEROS = bytes(4_000_000)  # 4 MB of zeros: deflate and gzip make ~4 KB of them, a ratio of ~1000


def bomb_archive(folder: Path, kind: str, entries: dict[str, bytes]) -> Path:
    """A zip or tar.gz holding `entries` (name -> content) inside a top folder."""
    if kind == "zip":
        archive = folder / "photos.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for name, content in entries.items():
                zipped.writestr(f"images/{name}", content)
        return archive
    archive = folder / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return archive


def declare_zip_size(archive: Path, name: str, size: int) -> None:
    """Rewrite the uncompressed size the central directory declares for entry `name`; the stream is unchanged.

    The layout is APPNOTE.TXT's: the end record (PK 5 6) gives the directory's offset at +16; each
    directory record (PK 1 2) holds the uncompressed size at +24 and is 46 bytes plus its name,
    extra field and comment, whose lengths are at +28, +30 and +32.
    """
    data = bytearray(archive.read_bytes())
    (record,) = struct.unpack_from("<I", data, data.rindex(b"PK\x05\x06") + 16)
    while data.startswith(b"PK\x01\x02", record):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, record + 28)
        if data[record + 46 : record + 46 + name_length].decode() == name:
            struct.pack_into("<I", data, record + 24, size)
            archive.write_bytes(bytes(data))
            return
        record += 46 + name_length + extra_length + comment_length
    raise AssertionError(f"no entry {name} in {archive}")


def only_the_archive_is_left(folder: Path, archive: Path) -> bool:
    return {path for path in folder.rglob("*") if not path.is_dir()} == {archive}


ARCHIVE_KINDS = ["zip", "tar.gz"]


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_an_entry_over_the_size_limit_is_refused_naming_the_limit_and_how_to_raise_it(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("PETPIPE_MAX_ENTRY_MB", "1")
    archive = bomb_archive(tmp_path, kind, {A_PHOTO.name: A_PHOTO.read_bytes(), "big.jpg": bytes(2_000_000)})
    output = tmp_path / "work/stages/fetch/images"

    with pytest.raises(PetpipeError) as refused:
        fetch_source(str(archive), None, output)

    message = str(refused.value)
    assert message.startswith(
        f"refusing to extract {archive}: entry 'images/big.jpg' declares 2.0 MB, more than "
        "the 1.0 MB that PETPIPE_MAX_ENTRY_MB allows for one file"
    )
    assert "PETPIPE_MAX_ENTRY_MB=2 dvc repro" in message and "Nothing was extracted" in message
    assert "\n" not in message
    assert not output.exists() and only_the_archive_is_left(tmp_path, archive)


def tar_gz_declaring(path: Path, name: str, size: int) -> Path:
    """A tar.gz of one member header that declares `size` bytes, and none of them: 100 bytes on disk."""
    info = tarfile.TarInfo(name)
    info.size = size
    path.write_bytes(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
    return path


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_a_3_gb_photo_is_refused_from_the_declared_size_before_a_byte_of_it_is_written(tmp_path, kind):
    # The new user's case: a small archive whose one .jpg declares 3 GB. Refused on the header alone.
    if kind == "zip":
        archive = bomb_archive(tmp_path, "zip", {"huge.jpg": ZEROS})
        declare_zip_size(archive, "images/huge.jpg", 3_000_000_000)
    else:
        archive = tar_gz_declaring(tmp_path / "photos.tar.gz", "images/huge.jpg", 3_000_000_000)
    assert archive.stat().st_size < 10_000

    with pytest.raises(
        PetpipeError,
        match=r"entry 'images/huge\.jpg' declares 3,000\.0 MB, more than the 200\.0 MB "
        r"that PETPIPE_MAX_ENTRY_MB allows.*PETPIPE_MAX_ENTRY_MB=3000 dvc repro",
    ):
        fetch_source(str(archive), None, tmp_path / "images")

    assert only_the_archive_is_left(tmp_path, archive)


def test_a_hard_link_to_a_skipped_hidden_member_counts_its_size(tmp_path, monkeypatch):
    # The hidden member is skipped, but tarfile writes the link as a copy of its bytes: the copy is an entry too.
    monkeypatch.setenv("PETPIPE_MAX_ENTRY_MB", "1")
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(A_PHOTO, arcname=f"images/{A_PHOTO.name}")
        hidden = tarfile.TarInfo("images/.big.jpg")
        hidden.size = 2_000_000
        tar.addfile(hidden, io.BytesIO(bytes(hidden.size)))
        link = tarfile.TarInfo("images/copy.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "images/.big.jpg"
        tar.addfile(link)

    with pytest.raises(PetpipeError, match=r"entry 'images/copy\.jpg' declares 2\.0 MB, more than the 1\.0 MB"):
        fetch_source(str(archive), None, tmp_path / "images")

    assert only_the_archive_is_left(tmp_path, archive)


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_an_entry_that_inflates_a_thousandfold_is_refused_until_the_ratio_limit_is_raised(tmp_path, monkeypatch, kind):
    archive = bomb_archive(tmp_path, kind, {"bomb.jpg": ZEROS})
    assert archive.stat().st_size < 10_000
    output = tmp_path / "images"

    with pytest.raises(PetpipeError) as refused:
        fetch_source(str(archive), None, output)

    message = str(refused.value)
    assert f"refusing to extract {archive}: entry 'images/bomb.jpg' " in message
    assert "more than PETPIPE_MAX_RATIO (100) allows for photos, which barely compress" in message
    assert re.search(r"e\.g\. `PETPIPE_MAX_RATIO=\d{3,4} dvc repro`", message) and "\n" not in message
    assert only_the_archive_is_left(tmp_path, archive)

    monkeypatch.setenv("PETPIPE_MAX_RATIO", "5000")  # the user trusts this archive
    assert fetch_source(str(archive), None, output) == 1
    assert (output / "bomb.jpg").stat().st_size == len(ZEROS)


def test_many_small_entries_that_together_inflate_too_far_are_refused(tmp_path):
    # Each entry stays under the 1 MB below which a ratio is never held against it; the archive does not:
    # 18 MB from 20 KB. Refused at the entry that takes the total past 100 times the archive's size.
    archive = bomb_archive(tmp_path, "zip", {f"part_{number:02}.jpg": bytes(900_000) for number in range(20)})

    with pytest.raises(
        PetpipeError,
        match=r"entry 'images/part_02\.jpg' brings what the archive declares to "
        r"2\.7 MB, 1\d\d times its [\d,]+ bytes, more than PETPIPE_MAX_RATIO "
        r"\(100\) allows",
    ):
        fetch_source(str(archive), None, tmp_path / "images")

    assert only_the_archive_is_left(tmp_path, archive)


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_an_archive_larger_than_the_free_disk_space_is_refused(tmp_path, monkeypatch, kind):
    from petpipe.data import archive_limits

    photos = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:10]
    archive = bomb_archive(tmp_path, kind, {photo.name: photo.read_bytes() for photo in photos})
    free = 300_000  # less than the ten photos need
    monkeypatch.setattr(archive_limits.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    output = tmp_path / "work/images"

    with pytest.raises(PetpipeError) as refused:
        fetch_source(str(archive), None, output)

    message = str(refused.value)
    assert re.match(
        rf"refusing to extract {re.escape(str(archive))}: entry 'images/[^']+\.jpg' brings what the "
        rf"archive declares to [\d,]+ bytes on disk, more than the 270,000 bytes that "
        rf"{re.escape(str(output.parent))} can take \(300,000 bytes free, 30,000 bytes kept spare\)\. "
        r"Free some space there, then fetch again\. Nothing was extracted\.$",
        message,
    ), message
    assert not output.exists() and only_the_archive_is_left(tmp_path, archive)


def test_a_zip_entry_that_inflates_past_its_declared_size_is_refused_and_leaves_nothing(tmp_path):
    archive = bomb_archive(tmp_path, "zip", {A_PHOTO.name: A_PHOTO.read_bytes(), "liar.jpg": ZEROS})
    declare_zip_size(archive, "images/liar.jpg", 1_000)  # small enough to pass every check on declared sizes

    with pytest.raises(PetpipeError) as refused:
        fetch_source(str(archive), None, tmp_path / "images")

    message = str(refused.value)
    assert (
        f"refusing to extract {archive}: entry 'images/liar.jpg' does not hold the 1,000 bytes its header "
        "declares" in message
    )
    assert "crafted to hide its size" in message and "Nothing was extracted" in message
    assert only_the_archive_is_left(tmp_path, archive)


def test_copying_an_entry_stops_before_it_writes_more_than_it_declared(tmp_path):
    # zipfile stops at the declared size itself (then fails the CRC, above); this is petpipe's own count.
    from petpipe.data.archive_limits import Budget

    budget = Budget.for_archive(tmp_path, tmp_path)
    written = io.BytesIO()
    with pytest.raises(
        PetpipeError,
        match=r"entry 'images/liar\.jpg' inflates past the 1,000 bytes its header "
        r"declares",
    ):
        budget.copy_entry("images/liar.jpg", io.BytesIO(ZEROS), written, declared=1_000)
    assert len(written.getvalue()) <= 1_000

    budget.copy_entry("images/honest.jpg", io.BytesIO(ZEROS), written, declared=len(ZEROS))
    assert len(written.getvalue()) == len(ZEROS)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("PETPIPE_MAX_ENTRY_MB", "lots"),
        ("PETPIPE_MAX_ENTRY_MB", "0"),
        ("PETPIPE_MAX_RATIO", "0.5"),
        ("PETPIPE_MAX_RATIO", "inf"),
    ],
)
def test_an_archive_limit_that_is_not_a_number_is_refused_naming_the_variable(tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    archive = bomb_archive(tmp_path, "zip", {A_PHOTO.name: A_PHOTO.read_bytes()})
    with pytest.raises(PetpipeError, match=rf"^{variable} = '{value}' is not a"):
        fetch_source(str(archive), None, tmp_path / "images")
    overview = CliRunner().invoke(main, ["--help"]).output
    assert "PETPIPE_MAX_ENTRY_MB" in overview and "PETPIPE_MAX_RATIO" in overview
