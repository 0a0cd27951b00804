"""What the network sees is one record (petpipe/model/preprocessing.py), written by checkpoints, bundles and MLflow
models and read back by one parser, including the records earlier petpipes wrote."""

from __future__ import annotations

import pytest

from petpipe.errors import PetpipeError
from petpipe.model.preprocessing import RESIZE, VERSION, Preprocessing

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

SEEN = Preprocessing(img_size=224, presize=258, eval_crop=0.875, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_a_record_round_trips_and_says_its_version_and_resize():
    written = SEEN.to_dict()
    assert written["version"] == VERSION and written["resize"] == RESIZE
    assert Preprocessing.from_dict(written) == SEEN


def test_records_from_before_the_version_read_as_they_were_evaluated():
    """No version and no resize (checkpoints and bundles before this record); the earliest had no eval_crop
    either and were evaluated on the central img_size pixels."""
    earliest = {"img_size": 32, "presize": 36, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    read = Preprocessing.from_dict(earliest)
    assert read.eval_crop == 32 / 36 and read.mean == (0.485, 0.456, 0.406)
    assert Preprocessing.from_dict({**earliest, "eval_crop": 1.0}).eval_crop == 1.0


def test_a_record_this_petpipe_cannot_reproduce_is_refused_in_one_line():
    with pytest.raises(PetpipeError, match=r"resizes with .*antialias.*True.*export it again"):
        Preprocessing.from_dict({**SEEN.to_dict(), "resize": {**RESIZE, "antialias": True}})
    with pytest.raises(PetpipeError, match=rf"version {VERSION + 1} is newer than this petpipe's \({VERSION}\)"):
        Preprocessing.from_dict({**SEEN.to_dict(), "version": VERSION + 1})
