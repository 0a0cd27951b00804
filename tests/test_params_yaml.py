"""petpipe reads params.yaml as DVC reads it (ruamel.yaml, YAML 1.2), so `dvc params diff`, `dvc exp show`
and the stages never disagree on a value (issue "Compare, promote, ship", deliverable 5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml as dvc_parse_yaml

from helpers import PROJECT_ROOT
from petpipe.params import ParamsError, load_params
from petpipe.utils.yamlfile import parse_yaml

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

# Where YAML 1.1 (PyYAML) and YAML 1.2 (ruamel, DVC) read the same text differently.
DIFFERENCES = """\
exponent: 1e-4
dotted_exponent: 1.0e-3
yes_word: yes
on_word: on
No_word: NO
octal_1_2: 0o17
leading_zero: 010
underscores: 1_000
sexagesimal: 1:20
hex: 0x1F
infinity: .inf
nothing: ~
"""


def leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for position, value in enumerate(node):
            yield from leaves(value, f"{prefix}[{position}]")
    else:
        yield prefix, node


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    "text",
    [(PROJECT_ROOT / "params.yaml").read_text(), DIFFERENCES],
    ids=["the project's params.yaml", "YAML 1.1 against 1.2"],
)
def test_every_value_dvc_reads_petpipe_reads_the_same(text):
    theirs, ours = dict(leaves(dvc_parse_yaml(text, "params.yaml"))), dict(leaves(parse_yaml(text, "params.yaml")))
    assert list(ours) == list(theirs)
    different = {key: (ours[key], theirs[key]) for key in theirs if not same(ours[key], theirs[key])}
    assert not different


def test_yaml_1_2_numbers_and_words():
    read = parse_yaml(DIFFERENCES, "x.yaml")
    assert read["exponent"] == 1e-4 and isinstance(read["exponent"], float)  # a string in YAML 1.1
    assert read["yes_word"] == "yes" and read["on_word"] == "on" and read["No_word"] == "NO"  # booleans in 1.1
    assert read["leading_zero"] == 10 and read["octal_1_2"] == 15 and read["sexagesimal"] == "1:20"  # 8, str, 80


def test_a_yes_where_a_boolean_belongs_is_refused_as_dvc_reads_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("  tta: false", "  tta: yes"))
    with pytest.raises(ParamsError, match=r"evaluate\.tta = 'yes'"):
        load_params(params)


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        (PROJECT_ROOT / "params.yaml").read_text().replace("  weight_decay: 0.01", "  weight_decay: 1e-2")
    )
    assert load_params(params).train.weight_decay == 0.01


def test_a_key_written_twice_names_the_file_line_and_key(tmp_path):
    params: Path = tmp_path / "params.yaml"
    params.write_text("split:\n  valid_pct: 0.2\n  seed: 1\n  valid_pct: 0.3\n")
    with pytest.raises(ParamsError, match=rf"^{params}:4: key 'split.valid_pct' is written twice \(first on line 2\)"):
        load_params(params)
