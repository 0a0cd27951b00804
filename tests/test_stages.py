"""Each stage is declared once, in its module: dvc.yaml and the CLI must say what the module says."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from helpers import PROJECT_ROOT, STAGES
from petpipe import dvc_yaml, stages
from petpipe.cli import main
from petpipe.pipeline import option_name

DVC_YAML = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def declared_paths(entries: list[Any]) -> set[str]:
    """dvc.yaml's outs/metrics/plots entries: a path, or {path: options}."""
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


def command_options(stage: str) -> dict[str, str]:
    """dvc.yaml's cmd of a stage as {--option: path}."""
    words = shlex.split(DVC_YAML[stage]["cmd"])
    assert words[:2] == ["petpipe", stage]
    assert len(words[2:]) % 2 == 0, words
    return dict(zip(words[2::2], words[3::2]))


def test_dvc_yaml_holds_the_packages_stages_in_its_order():
    assert list(DVC_YAML) == STAGES == list(stages.ORDER)
    assert [stages.load(name).STAGE.name for name in STAGES] == STAGES


@pytest.mark.parametrize("name", STAGES)
def test_dvc_yaml_passes_exactly_the_stages_inputs_and_outputs(name):
    stage = stages.load(name)
    inputs = {option_name(field): field for field in dataclasses.fields(stage.Inputs)}
    outputs = {option_name(field): field for field in dataclasses.fields(stage.Outputs)}
    options = command_options(name)
    assert set(options) == set(inputs) | set(outputs), "cmd options differ from the Inputs/Outputs fields"
    declared = DVC_YAML[name]
    data_deps = {dep for dep in declared.get("deps", []) if not dep.startswith("petpipe/")}
    assert {options[option] for option in inputs} == data_deps - {"${data.source}"}, "deps differ from Inputs"
    written = declared_paths(declared.get("outs", []) + declared.get("metrics", []) + declared.get("plots", []))
    assert {options[option] for option in outputs} == written, "outs/metrics/plots differ from Outputs"
    for option, path in options.items():
        expected = f"stages/{name}/"
        if option in outputs:
            assert path.startswith(expected), f"{name} writes {path} outside {expected}"


def test_the_committed_dvc_yaml_is_what_the_stages_declare():
    """dvc.yaml is written by `petpipe dvc-yaml` from the stage modules; an edit to either alone fails here."""
    assert dvc_yaml.render() == (PROJECT_ROOT / "dvc.yaml").read_text(), "run `petpipe dvc-yaml` and commit dvc.yaml"


def test_petpipe_dvc_yaml_writes_and_checks(tmp_path):
    out = tmp_path / "dvc.yaml"
    assert CliRunner().invoke(main, ["dvc-yaml", "--check", "--out", str(out)]).exit_code == 1
    written = CliRunner().invoke(main, ["dvc-yaml", "--out", str(out)])
    assert written.exit_code == 0 and f"written ({len(STAGES)} stages)" in written.output
    assert out.read_text() == dvc_yaml.render()
    checked = CliRunner().invoke(main, ["dvc-yaml", "--check", "--out", str(out)])
    assert checked.exit_code == 0 and "is what the stages declare" in checked.output
    out.write_text(out.read_text().replace("- petpipe/data/augment.py\n", "", 1))
    stale = CliRunner().invoke(main, ["dvc-yaml", "--check", "--out", str(out)])
    assert stale.exit_code == 1 and "run `petpipe dvc-yaml`" in stale.output


@pytest.mark.parametrize("name", STAGES)
def test_every_input_is_an_earlier_stages_output_or_a_params_path(name):
    """The pipeline's edges: what a stage reads was written by a stage before it (or is named in params.yaml)."""
    earlier = {
        path
        for before in STAGES[: STAGES.index(name)]
        for path in declared_paths(
            DVC_YAML[before].get("outs", []) + DVC_YAML[before].get("metrics", []) + DVC_YAML[before].get("plots", [])
        )
    }
    for dep in DVC_YAML[name].get("deps", []):
        assert dep.startswith(("petpipe/", "${")) or dep in earlier, (
            f"{name} reads {dep}, which no earlier stage writes"
        )


def test_code_dependencies_follow_imports_but_not_logging():
    assert stages.code_dependencies("fetch") == [
        "petpipe/data/archive_limits.py",
        "petpipe/data/archives.py",
        "petpipe/data/download.py",
        "petpipe/data/folders.py",
        "petpipe/data/image_downloads.py",
        "petpipe/data/sources.py",
        "petpipe/data/url_lists.py",
        "petpipe/runner.py",
        "petpipe/stages/fetch.py",
        "petpipe/utils/file_formats.py",
    ]
    train_head = stages.code_dependencies("train-head")
    assert {"petpipe/data/augment.py", "petpipe/train/fit_loop.py", "petpipe/model/backbones.py"} <= set(train_head)
    assert "petpipe/data/sources.py" not in train_head and "petpipe/track/mlflow_runs.py" not in train_head
    assert "${data.source}" in DVC_YAML["fetch"]["deps"]  # the photos themselves, for a local source
    # Configuration plumbing changes no output: DVC hashes the param values themselves.
    plumbing = {"petpipe/params.py", "petpipe/utils/yamlfile.py", "petpipe/utils/atomic.py", "petpipe/utils/devices.py"}
    assert not plumbing & {dep for name in STAGES for dep in DVC_YAML[name]["deps"]}


@pytest.mark.parametrize("name", STAGES)
def test_dvc_yaml_lists_the_params_the_stage_declares(name):
    assert DVC_YAML[name].get("params", []) == list(stages.load(name).STAGE.params)


@pytest.mark.parametrize("name", STAGES)
def test_the_cli_offers_one_option_per_declared_path(name):
    stage = stages.load(name)
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    for dataclass_ in (stage.Inputs, stage.Outputs):
        for field in dataclasses.fields(dataclass_):
            assert option_name(field) in result.output and field.metadata["help"].split()[0] in result.output
    assert "--params" in result.output
    assert f"petpipe {name}" in result.output  # the module's example command


def test_a_missing_required_path_is_refused_by_the_cli(tmp_path):
    result = CliRunner().invoke(main, ["train-head", "--images", str(tmp_path)])
    assert result.exit_code == 2 and "Missing option '--index'" in result.output
