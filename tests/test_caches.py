"""Caches petpipe keeps across runs are checked before they are trusted: pixel caches (square and wide), a wide
cache's geometry and the records beside them, resume files, levers.json and partial downloads, each truncated,
extended, zeroed over a page and replaced. Every damaged run logs one line saying what was wrong and what it did,
succeeds, and ends with the metrics (or, for a download, the photos) of a run from a clean cache.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import logging
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers import OFFLINE_TRAINING, copy_subset, outputs_in, params_with, serving, stage_environment
from petpipe.train import levers as levers_module
from petpipe.train import resume as resume_module

PAGE = 4096
# One epoch on 3 breeds x 6 photos at 32 px; the levers fixed so that no timing (levers.json) is involved.
FAST = {
    **OFFLINE_TRAINING,
    "model.img_size": 32,
    "train.batch_size": 8,
    "train_head.epochs": 1,
    "train.precision": "float32",
    "train.memory_format": "contiguous",
    "train.threads": 1,
}


def truncate(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


def extend(path: Path) -> None:
    with path.open("ab") as file:
        file.write(b"\x01" * PAGE)


def zero_a_page(path: Path) -> None:
    """Zero the page in the middle of the file, where the data is (made to differ if it was zero already)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - PAGE // 2)
    page = data[start : start + PAGE]
    data[start : start + PAGE] = bytes(len(page)) if any(page) else b"\x01" * len(page)
    path.write_bytes(bytes(data))


def replace_with_lookalike(path: Path) -> None:
    """Same name, same size and a valid layout for its kind; other contents (a restore of another cache)."""
    if path.suffix == ".npy":
        array = np.load(path)
        replacement = np.flip(array, axis=0).copy()
        np.save(path, array + 1 if np.array_equal(replacement, array) else replacement)
    elif path.suffix == ".json":
        record = json.loads(path.read_text())
        record["sha256"] = "0" * 64
        path.write_text(json.dumps(record))
    else:  # a resume file: another valid checkpoint in its place (the last run's model.pt)
        shutil.copy(sorted(path.parents[2].glob("run-*/model.pt"))[-1], path)


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": truncate,
    "extended": extend,
    "zeroed page": zero_a_page,
    "replaced": replace_with_lookalike,
}


class Project:
    """A tiny sample indexed once, and train-head run in-process from `root` (caches in root/cache)."""

    def __init__(self, root: Path, sample_images: Path):
        from petpipe.stages import index_labels

        self.root, self.images = root, root / "images"
        copy_subset(sample_images, self.images, breeds=3, per_breed=6)
        outputs = outputs_in(root / "indexed")
        index_labels.run(params_with({"model.img_size": 32}), index_labels.Inputs(images=self.images), outputs)
        self.index = outputs.index
        self.runs = 0

    def train(self, **overrides) -> dict:
        """train-head's metrics.json (without timings) from a run in a fresh output folder."""
        from petpipe.stages import train_head

        self.runs += 1
        folder = self.root / f"run-{self.runs}"
        outputs = train_head.Outputs(
            model=folder / "model.pt",
            metrics=folder / "metrics.json",
            history=folder / "history.csv",
            plot=folder / "training.png",
        )
        with stage_environment(self.root):
            train_head.run(
                params_with({**FAST, **overrides}), train_head.Inputs(images=self.images, index=self.index), outputs
            )
        return comparable(json.loads(outputs.metrics.read_text()))

    @property
    def cache(self) -> Path:
        return self.root / "cache"


def comparable(metrics: dict) -> dict:
    """The metrics that must not depend on the cache: drop timings and speeds."""
    return {
        key: value
        for key, value in metrics.items()
        if not any(word in key for word in ("second", "time", "per_second", "duration"))
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, sample_images) -> Project:
    return Project(tmp_path_factory.mktemp("caches"), sample_images)


@pytest.fixture(scope="module")
def clean_metrics(project) -> dict:
    """The metrics from a clean cache: what every damaged run must end with."""
    shutil.rmtree(project.cache, ignore_errors=True)
    return project.train()


def warnings_in(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def forget_checks(monkeypatch) -> None:
    """As in a new process: nothing is known to have been checked (stages are processes; these tests are one)."""
    from petpipe.data import pixels

    monkeypatch.setattr(pixels, "_CHECKED", {})


def test_a_clean_cache_is_reused_without_a_warning(project, clean_metrics, caplog, monkeypatch):
    forget_checks(monkeypatch)
    caches = sorted(project.cache.glob("pixels-*.npy"))
    assert len(caches) == 2 and len(list(project.cache.glob("geometry-*.npy"))) == 1  # wide train, square valid
    before = {path: path.stat().st_ino for path in caches}
    with caplog.at_level(logging.INFO):
        assert project.train() == clean_metrics
    assert warnings_in(caplog) == []
    assert {path: path.stat().st_ino for path in caches} == before, "a sound cache was rebuilt"
    assert not any("decoding" in record.getMessage() for record in caplog.records)


PIXEL_FILES = {
    "square pixel cache": lambda cache: _square(cache),
    "wide pixel cache": lambda cache: _wide(cache),
    "geometry file": lambda cache: next(cache.glob("geometry-*.npy")),
    "cache record": lambda cache: _wide(cache).with_suffix(".json"),
}


def _wide(cache: Path) -> Path:
    [geometry] = cache.glob("geometry-*.npy")
    return geometry.with_name(geometry.name.replace("geometry-", "pixels-", 1))


def _square(cache: Path) -> Path:
    [square] = set(cache.glob("pixels-*.npy")) - {_wide(cache)}
    return square


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", PIXEL_FILES)
def test_a_damaged_pixel_cache_is_rebuilt_in_one_line_and_the_run_matches_a_clean_one(
    project, clean_metrics, caplog, monkeypatch, kind, damage
):
    forget_checks(monkeypatch)  # every cache is sound here: built by clean_metrics, rebuilt by the test before
    target = PIXEL_FILES[kind](project.cache)
    DAMAGES[damage](target)
    with caplog.at_level(logging.WARNING):
        assert project.train() == clean_metrics
    [warning] = warnings_in(caplog)
    assert warning.startswith("warning: pixel cache ") and warning.endswith("; decoding the images again"), warning
    damaged_cache = _square(project.cache) if kind == "square pixel cache" else _wide(project.cache)
    assert str(damaged_cache) in warning
    # Rebuilt: the cache matches its record again, and the next run uses it without a word.
    caplog.clear()
    forget_checks(monkeypatch)
    assert project.train() == clean_metrics
    assert warnings_in(caplog) == []


def test_the_record_is_written_last_so_a_cache_cut_off_while_being_built_is_never_trusted(
    project, clean_metrics, caplog, monkeypatch
):
    forget_checks(monkeypatch)
    _square(project.cache).with_suffix(".json").unlink()
    with caplog.at_level(logging.WARNING):
        assert project.train() == clean_metrics
    [warning] = warnings_in(caplog)
    assert "has no record of what it holds" in warning


# ---------------------------------------------------------------- resume files


def seed_resume_file(project: Project, monkeypatch) -> Path:
    """A resume file as a killed train-head leaves it: a run whose clear() never came."""
    with monkeypatch.context() as patch:
        patch.setattr(resume_module.ResumeFile, "clear", lambda self: None)
        project.train()
    [resume] = (project.root / ".petpipe/resume").glob("train-head-*.pt")
    return resume


RESUME_FILES = {"resume file": lambda resume: resume, "its record": lambda resume: resume.with_suffix(".json")}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", RESUME_FILES)
def test_a_damaged_resume_file_is_ignored_in_one_warning_and_training_starts_over(
    project, clean_metrics, caplog, monkeypatch, kind, damage
):
    resume = seed_resume_file(project, monkeypatch)
    DAMAGES[damage](RESUME_FILES[kind](resume))
    with caplog.at_level(logging.INFO):
        assert project.train() == clean_metrics
    [warning] = warnings_in(caplog)
    assert warning.startswith(f"warning: ignoring resume file {resume}: it ") and warning.endswith(
        "; training from the first epoch"
    ), warning
    assert not any("resuming from" in record.getMessage() for record in caplog.records)
    assert not resume.exists() and not resume.with_suffix(".json").exists()  # a finished run clears both


def test_a_sound_resume_file_is_still_resumed_from(project, clean_metrics, caplog, monkeypatch):
    seed_resume_file(project, monkeypatch)
    with caplog.at_level(logging.INFO):
        assert project.train() == clean_metrics
    # The cache itself draws no word; the run that left it ended without one (as a kill does), which is said
    # once, with the memory advice (tests/test_limits.py).
    [warning] = warnings_in(caplog)
    assert warning.startswith("warning: train-head: the run that saved this resume file was killed by a signal"), (
        warning
    )
    assert any("resuming from" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------- levers.json

AUTO_LEVERS = {"train.memory_format": "auto"}  # one lever left to time: levers.json is read and written


@pytest.fixture()
def timed_once(project, monkeypatch) -> Path:
    """levers.json as a timing leaves it; timing made deterministic (contiguous wins), as it is not the point."""
    monkeypatch.setattr(
        levers_module,
        "_probe",
        lambda model, images, views, options: {
            lever: "contiguous" if lever == "memory_format" else choices[0] for lever, choices in options.items()
        },
    )
    (project.cache / "levers.json").unlink(missing_ok=True)
    project.train(**AUTO_LEVERS)
    return project.cache / "levers.json"


@pytest.mark.parametrize("damage", [*DAMAGES, "another machine's choice"])
def test_a_damaged_levers_file_is_ignored_in_one_warning_timed_again_and_rewritten(
    project, clean_metrics, timed_once, caplog, monkeypatch, damage
):
    if damage == "another machine's choice":  # valid JSON and valid levers, but not a choice this run has
        known = json.loads(timed_once.read_text())
        timed_once.write_text(
            json.dumps({key: {**entry, "precision": "bfloat16", "threads": 999} for key, entry in known.items()})
        )
    elif damage == "replaced":
        timed_once.write_text(json.dumps(["not", "levers"]))
    else:
        DAMAGES[damage](timed_once)
    timings = []
    original = levers_module._probe
    monkeypatch.setattr(levers_module, "_probe", lambda *args: timings.append(1) or original(*args))
    with caplog.at_level(logging.WARNING):
        assert project.train(**AUTO_LEVERS) == clean_metrics
    [warning] = warnings_in(caplog)
    assert str(timed_once) in warning and warning.endswith("timing the levers again"), warning
    assert timings == [1]
    assert all(levers_module._is_levers(entry) for entry in json.loads(timed_once.read_text()).values())


# ---------------------------------------------------------------- partial downloads


class RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves one archive at /images.tar.gz, honouring `Range: bytes=N-` as a real server does."""

    payload = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        total = len(self.payload)
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        if start >= total and match:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{total}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(total - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args) -> None:
        pass


def replace_with_a_page(path: Path) -> None:
    """What a captive portal leaves when it answered the first attempt: an HTML page of the same size."""
    page = b"<!doctype html><html><body>Please log in</body></html>"
    path.write_bytes((page * (path.stat().st_size // len(page) + 1))[: path.stat().st_size])


@pytest.mark.parametrize("damage", [*DAMAGES, "replaced with a page"])
def test_a_damaged_partial_download_ends_in_the_archive_itself(sample_images, tmp_path, monkeypatch, caplog, damage):
    from petpipe.data.download import cache_name
    from petpipe.data.sources import fetch_source

    photos = tmp_path / "photos"
    copy_subset(sample_images, photos, breeds=2, per_breed=3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for photo in sorted(photos.iterdir()):
            archive.add(photo, arcname=f"images/{photo.name}")
    payload = buffer.getvalue()
    handler = type("Handler", (RangeServer,), {"payload": payload})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}/images.tar.gz"
    monkeypatch.chdir(tmp_path)
    part = tmp_path / ".petpipe/downloads" / (cache_name(url) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[: len(payload) // 2])  # as a cut connection leaves it
    if damage == "replaced with a page":
        replace_with_a_page(part)
    elif damage == "replaced":  # the same size, a gzip stream all the same: another archive's first half
        other = gzip.compress(bytes(reversed(payload)), mtime=0)
        part.write_bytes(other[: part.stat().st_size])
    else:
        DAMAGES[damage](part)
    with serving(server), caplog.at_level(logging.WARNING):
        count = fetch_source(url, "md5:" + hashlib.md5(payload).hexdigest(), tmp_path / "images")
    assert count == 6
    assert all((tmp_path / "images" / photo.name).read_bytes() == photo.read_bytes() for photo in photos.iterdir())
    warnings = warnings_in(caplog)
    if damage == "truncated":  # a shorter prefix is still a prefix: resumed, and the checksum agrees
        assert warnings == []
    else:
        [warning] = warnings
        assert str(part) in warning and warning.endswith("downloading it whole again"), warning
