"""Mistakes that used to pass in silence: a one-class "dataset", a key written twice in params.yaml, and
an OS error that names no file. (Archives that inflate, downloads that are web pages and special files
in a source folder are in tests/test_security.py and tests/test_fetch.py.)"""

from __future__ import annotations

import re
import shutil

import click
import pytest
from click.testing import CliRunner

from helpers import PROJECT_ROOT, SMALL, copy_subset, outputs_in, params_with, write_params
from petpipe import cli
from petpipe.cli import main
from petpipe.errors import PetpipeError
from petpipe.params import ParamsError, load_params
from petpipe.stages.index_labels import Inputs, run
from petpipe.track import mlflow_runs

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

# ---------------------------------------------------------------- one class


def test_one_breed_is_refused_naming_the_class_and_what_to_do(sample_images, tmp_path):
    copy_subset(sample_images, tmp_path / "images", breeds=1, per_breed=6)
    outputs = outputs_in(tmp_path / "out")
    with pytest.raises(PetpipeError) as refused:
        run(params_with(SMALL), Inputs(images=tmp_path / "images"), outputs)
    message = str(refused.value)
    assert message.startswith(
        f"only one class found (Abyssinian) in {tmp_path / 'images'}: a classifier needs at least two; labels.pattern "
    )
    assert "gives every file name this label" in message and "add images of other classes" in message
    assert not (tmp_path / "out").exists()


def test_one_folder_with_folder_labels_is_refused_through_the_cli(sample_images, tmp_path):
    """Photos of many breeds, all in one folder, labelled by folder: one class, whatever the file names."""
    images = tmp_path / "images"
    copy_subset(sample_images, images / "pets", breeds=3, per_breed=2)
    params = tmp_path / "params.yaml"
    write_params(params, {**SMALL, "labels.method": "folder"})
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "index-labels",
            "--params",
            str(params),
            "--images",
            str(images),
            "--index",
            str(out / "index.csv"),
            "--classes",
            str(out / "classes.json"),
            "--report",
            str(out / "report.json"),
            "--class-counts",
            str(out / "c.png"),
        ],
    )
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith(
        f"Error: only one class found (pets) in {images}: a classifier needs at least two; every image is in this "
        "one folder"
    )
    assert not out.exists()


def test_two_breeds_are_enough(sample_images, tmp_path):
    copy_subset(sample_images, tmp_path / "images", breeds=2, per_breed=3)
    assert "of 2 classes" in run(params_with(SMALL), Inputs(images=tmp_path / "images"), outputs_in(tmp_path / "o"))


# ---------------------------------------------------------------- a key written twice


def leaf_lines(text: str) -> list[tuple[int, str]]:
    """(line number, dotted key) of every `key: value` line of a YAML file of nested mappings."""
    found, parents = [], []  # parents: (indent, key) of the mappings the line is in
    for number, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"^( *)([A-Za-z_]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).split("#")[0].strip()
        parents = [(level, name) for level, name in parents if level < indent]
        if rest:
            found.append((number, ".".join([name for _, name in parents] + [key])))
        else:
            parents.append((indent, key))
    return found


DEFAULT_PARAMS = (PROJECT_ROOT / "params.yaml").read_text()
LEAVES = leaf_lines(DEFAULT_PARAMS)


def test_the_generated_cases_cover_every_key_of_params_yaml():
    assert len(LEAVES) >= 50 and {"data.source", "train.augment.max_warp", "tracking.log_models"} <= {
        key for _, key in LEAVES
    }


@pytest.mark.parametrize("line, key", LEAVES, ids=[key for _, key in LEAVES])
def test_a_key_written_twice_is_refused_naming_the_file_line_and_key(tmp_path, line, key):
    """Each key of the default params.yaml, written again on the next line (a typo, or a merge)."""
    lines = DEFAULT_PARAMS.splitlines(keepends=True)
    lines.insert(line, lines[line - 1])  # the same line again, right after the first
    path = tmp_path / "params.yaml"
    path.write_text("".join(lines))
    with pytest.raises(ParamsError) as refused:
        load_params(path)
    assert str(refused.value) == (
        f"{path}:{line + 1}: key '{key}' is written twice (first on line {line}); YAML "
        "would silently keep the last value. Keep one."
    )


def test_a_section_written_twice_is_refused_and_tracking_refuses_it_too(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(DEFAULT_PARAMS + "\nfinetune:\n  epochs: 9\n")
    second = len(DEFAULT_PARAMS.splitlines()) + 2
    first = next(number for number, line in enumerate(DEFAULT_PARAMS.splitlines(), 1) if line == "finetune:")
    expected = f"{path}:{second}: key 'finetune' is written twice (first on line {first})"
    with pytest.raises(ParamsError, match=re.escape(expected)):
        load_params(path)
    with pytest.raises(ParamsError, match=re.escape(expected)):
        mlflow_runs.load_project(tmp_path, tmp_path)  # the workspace's params.yaml, when a stage passes none


def test_the_cli_says_it_in_one_line_before_any_work(tmp_path):
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(DEFAULT_PARAMS.replace("  epochs: 4\n", "  epochs: 4\n  epochs: 40\n", 1))
    result = CliRunner().invoke(
        main, ["fetch", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "images")]
    )
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "key 'train_head.epochs' is written twice" in result.output and not (tmp_path / "images").exists()


def test_keys_repeated_through_a_yaml_merge_are_overrides_not_mistakes(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(DEFAULT_PARAMS.replace("finetune:\n  epochs: 2\n", "finetune:\n  <<: {epochs: 3}\n  epochs: 2\n"))
    assert load_params(path).finetune.epochs == 2


# ---------------------------------------------------------------- OS errors


def test_an_os_error_without_a_file_name_prints_no_empty_name():
    with pytest.raises(click.ClickException) as raised, cli._user_errors():
        raise OSError(28, "No space left on device")
    assert raised.value.message.startswith("No space left on device; outputs written before this are complete")


def test_an_os_error_with_a_file_name_names_it():
    with pytest.raises(click.ClickException) as raised, cli._user_errors():
        raise OSError(28, "No space left on device", "stages/finetune/model.pt")
    assert raised.value.message.startswith("stages/finetune/model.pt: No space left on device; outputs")


def test_tracking_reads_params_yaml_as_load_params_does(tmp_path):
    """One reader for both, so a file not found is the same one line."""
    with pytest.raises(ParamsError, match="file not found"):
        mlflow_runs.load_project(tmp_path / "elsewhere", tmp_path)
