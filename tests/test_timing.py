"""Each stage's one line of where its time went (petpipe/utils/timing.py), and the phases it names."""

from __future__ import annotations

import re
import time

import pytest

from petpipe.utils import timing

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro


def test_nested_phases_count_once_and_the_rest_is_other():
    with timing.stage("train-head") as seconds:
        with timing.phase("decode"):
            time.sleep(0.05)
        with timing.phase("epochs"):
            time.sleep(0.02)
            with timing.phase("validation"):  # inside epochs: counted for validation alone
                time.sleep(0.05)
        with timing.phase("epochs"):  # a phase met twice adds up
            time.sleep(0.02)
        time.sleep(0.03)
    assert list(seconds.seconds) == ["decode", "validation", "epochs"]
    assert 0.05 <= seconds.seconds["validation"] < 0.09
    assert 0.04 <= seconds.seconds["epochs"] < 0.08, "the nested validation was counted in epochs too"
    line = seconds.line()
    match = re.fullmatch(
        r"train-head: (\d+\.\d) s = decode 0\.\d, validation 0\.\d, epochs 0\.\d, other (\d+\.\d)", line
    )
    assert match, line
    total, other = map(float, match.groups())
    assert 0.1 <= total < 1.0 and other < total
    assert seconds.metrics().keys() == {"seconds_decode", "seconds_validation", "seconds_epochs", "seconds_total"}


def test_a_phase_outside_a_stage_times_nothing():
    with timing.phase("decode"):
        pass
    calls = []

    @timing.timed("features")
    def features(value: int) -> int:
        calls.append(value)
        return value * 2

    assert features(3) == 6 and calls == [3]
    with timing.stage("evaluate") as seconds:
        assert features(4) == 8
    assert list(seconds.seconds) == ["features"]


def test_start_up_is_named_where_the_process_is_the_stages_command():
    age = timing.process_age()
    assert age is None or 0 < age < 24 * 3600
    with timing.stage("fetch", command=True) as command, timing.stage("fetch") as called:
        pass
    assert "s of start-up: Python, imports, DVC)" in command.line() or age is None
    assert "start-up" not in called.line()  # called from Python (tests, notebooks): its age says nothing
