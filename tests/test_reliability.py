"""Reliability: bad photos, killed stages and full disks, on the real sample photos.

Three groups, each asserting outcomes:
- bad inputs (tests/bad_inputs.py makes them from the sample): index-labels skips each unusable
  file with its reason and indexes every usable one; predict reports unusable files and
  predicts the rest; decompression bombs are refused before any pixel is decoded; EXIF
  orientation is applied before training and in show_batch;
- faults: kill -9 during finetune (resumes, ends with an uninterrupted run's metrics), during a
  download (resumes with a Range request), during index-labels and evaluate (only complete
  outputs, stray temporary files removed by the rerun), a file size limit reached during a
  checkpoint write (the previous checkpoint survives; a real full disk for every kind of write is
  tests/test_limits.py);
- end to end: the sample salted with every bad case goes through the real `dvc repro` to a
  trained model, with a report that lists exactly the unusable files.
Training runs use 32 px images and a few breeds so that each takes seconds on two cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bad_inputs import Salted, copy_sample, salt
from helpers import (
    OFFLINE_TRAINING,
    PIPELINE_SMALL,
    PNG_MAGIC,
    PROJECT_ROOT,
    STAGES,
    make_project,
    outputs_in,
    params_with,
    run_command,
    serving,
    write_params,
)
from petpipe.cli import main
from petpipe.data import image_index, pixels
from petpipe.data.download import cache_name
from petpipe.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from petpipe.stages import index_labels, train_head

# Tiny but real training: the offline EfficientNet-Lite0 at 32 px on four breeds. float32: on this
# CPU bfloat16 autocast costs more than it saves at batches of eight 32 px images.
SMALL_TRAINING = {
    **OFFLINE_TRAINING,
    "model.img_size": 32,
    "train.batch_size": 8,
    "train.precision": "float32",
    "train_head.epochs": 1,
    "train_head.lr": 0.01,
    "finetune.lr": 1e-3,
    "finetune.epochs": 2,
}
INDEX_OUTPUTS = ["index.csv", "classes.json", "report.json", "class_counts.png"]
EVALUATE_OUTPUTS = [
    "metrics.json",
    "confusion.csv",
    "confusion.png",
    "confusion_normalized.png",
    "top_losses.png",
    "top_losses.csv",
    "most_confused.csv",
    "report.md",
]


# ---------------------------------------------------------------- helpers


def environment(**extra: str) -> dict[str, str]:
    """For petpipe subprocesses: this checkout importable, no MLflow store written (tracking is tested apart)."""
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PETPIPE_TRACKING": "off", **extra}


def on_one_core(process: subprocess.Popen) -> subprocess.Popen:
    """Keep a just-started subprocess on one core (it starts its thread pools later, at import).

    Its threads then never wait on a core another job is using (two OpenMP threads on a busy
    2-core machine run 2-3x slower than one), and every run of a comparison has the same threads.
    """
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(process.pid, {max(os.sched_getaffinity(0))})
    return process


def petpipe(*arguments: Any) -> list[str]:
    return [sys.executable, "-m", "petpipe.cli", *map(str, arguments)]


# `petpipe` that stops just before renaming one output into place, after cutting its temporary
# file to half its size: the state a kill -9 half-way through writing that output leaves.
PAUSING_PETPIPE = r"""
import os, sys, time
from pathlib import Path

real_replace = os.replace
pause_before, paused = os.environ["PETPIPE_TEST_PAUSE_BEFORE"], Path(os.environ["PETPIPE_TEST_PAUSED"])

def replace(source, target, *args, **kwargs):
    if Path(target).name == pause_before:
        written = Path(source).read_bytes()
        Path(source).write_bytes(written[: len(written) // 2])
        paused.write_text(str(source))
        time.sleep(600)
    return real_replace(source, target, *args, **kwargs)

os.replace = replace
from petpipe.cli import main
main(prog_name="petpipe")
"""


def pausing_petpipe(*arguments: Any) -> list[str]:
    return [sys.executable, "-c", PAUSING_PETPIPE, *map(str, arguments)]


def start(command: list[str], cwd: Path, **extra: str) -> subprocess.Popen:
    """Start a petpipe process; its stderr goes to a file (a pipe nobody reads could fill and block it)."""
    log = (cwd / f"stderr-{time.monotonic_ns()}.log").open("w")
    process = on_one_core(
        subprocess.Popen(command, cwd=cwd, env=environment(**extra), stdout=subprocess.DEVNULL, stderr=log)
    )
    process.log = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return process


def wait_for(condition: Callable[[], Any], process: subprocess.Popen, *, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            output = process.log.read_text()  # type: ignore[attr-defined]
            raise AssertionError(f"the process ended (rc {process.returncode}) before {what}:\n{output[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def kill_hard(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)  # no handler, no finally, no atexit: the harshest interruption
    process.wait()


def temporaries(folder: Path) -> list[str]:
    """Files and folders that petpipe.utils.atomic names while writing (`.<output>.<host>-<pid>.<random>.tmp`)."""
    return sorted(path.name for path in folder.rglob(".*.tmp"))


def run_quietly(arguments: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    process = on_one_core(
        subprocess.Popen(
            arguments, cwd=cwd, env=environment(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    )
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, f"{arguments[2:4]} failed:\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(arguments, process.returncode, stdout, stderr)


@contextlib.contextmanager
def working_in(folder: Path) -> Iterator[None]:
    """Run a stage in-process from folder (resume files land there), tracking off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("PETPIPE_TRACKING", "off")
        yield


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones included) -> its content hash, plus each file's mode and mtime."""
    return {
        f"{path.relative_to(folder)}|{path.stat().st_mode:o}|{path.stat().st_mtime_ns}": sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------- a tiny trained head, shared


@dataclass(frozen=True)
class SmallSample:
    root: Path
    images: Path
    index: Path
    head: Path  # train-head's model.pt (1 epoch, 32 px)


@pytest.fixture(scope="module")
def small(tmp_path_factory, sample_images) -> SmallSample:
    """Four breeds of ten photos, indexed and with a head trained for one epoch at 32 px."""
    root = tmp_path_factory.mktemp("small")
    images = root / "images"
    copy_sample(sample_images, images, breeds=4, per_breed=10)
    outputs = outputs_in(root / "index")
    with working_in(root):
        index_labels.run(params_with(SMALL_TRAINING), index_labels.Inputs(images=images), outputs)
        head = train_head.Outputs(
            model=root / "head/model.pt",
            metrics=root / "head/metrics.json",
            history=root / "head/history.csv",
            plot=root / "head/training.png",
        )
        train_head.run(params_with(SMALL_TRAINING), train_head.Inputs(images=images, index=outputs.index), head)
    return SmallSample(root=root, images=images, index=outputs.index, head=head.model)


# ================================================================ bad inputs


def test_index_labels_skips_each_unusable_file_with_its_reason_and_indexes_every_usable_one(sample_images, tmp_path):
    images = tmp_path / "images"
    copy_sample(sample_images, images, breeds=4, per_breed=5)
    originals = sorted(path.name for path in images.iterdir())
    salted = salt(images, sample_images)
    outputs = outputs_in(tmp_path / "out")

    with working_in(tmp_path):
        summary = index_labels.run(params_with({"model.img_size": 32}), index_labels.Inputs(images=images), outputs)
    index, report = image_index.load_index(outputs.index), json.loads(outputs.report.read_text(encoding="utf-8"))

    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert sorted(reasons) == sorted(salted.unusable)  # exactly the unusable files, each once
    for path, reason in salted.unusable.items():
        assert reasons[path].startswith(reason), (path, reasons[path])
    assert sorted(index["path"]) == sorted(originals + list(salted.usable))  # every usable file, no other
    assert report["unmatched"] == []
    assert [(leak["train"], leak["valid"]) for leak in report["leaks"]] == [salted.leak]
    # The class of one image: kept in train by the stratified split, trained on, its missing valid photo said.
    [single] = [path for path in salted.usable if path.startswith(salted.single_image_class)]
    assert index.set_index("path").loc[single, "split"] == "train"
    assert report["per_class"][salted.single_image_class] == {"train": 1, "valid": 0, "test": 0}
    assert any(
        "no validation image" in warning and salted.single_image_class in warning for warning in report["warnings"]
    )
    assert f"{len(salted.unusable)} skipped" in summary and "1 duplicates across splits" in summary
    # The EXIF-rotated photo is recorded with its upright size.
    with Image.open(sample_images / salted.rotated_from) as upright:
        rotated = index.set_index("path").loc[salted.rotated]
        assert (rotated["width"], rotated["height"]) == upright.size
    assert temporaries(tmp_path / "out") == []


MEASURE_BOMBS = r"""
import json, resource, sys, time
from pathlib import Path
from petpipe.data import image_index
from petpipe.data import pixels

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
checked = [image_index.check_image(Path(path)) for path in sys.argv[1:]]
decoded = []
for path in sys.argv[1:]:
    try:
        pixels.decode_image(path, 64)
        decoded.append("decoded")
    except Exception as error:
        decoded.append(type(error).__name__)
print(json.dumps({"checked": checked, "decoded": decoded, "seconds": time.perf_counter() - start,
                  "grew_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_decompression_bombs_are_refused_before_any_pixel_is_decoded(sample_images, tmp_path):
    salted = salt(tmp_path, sample_images)
    bombs = [path for path, reason in salted.unusable.items() if reason.startswith("too large")]
    sizes = {path: struct.unpack(">II", (tmp_path / path).read_bytes()[16:24]) for path in bombs}  # IHDR
    assert sorted(sizes.values()) == [(12_000, 12_000), (20_000, 20_000)]
    assert all((tmp_path / path).stat().st_size < 200_000 for path in bombs)  # tiny on disk...
    # ...144 and 400 million pixels once decoded: at least that many MiB.

    result = subprocess.run(
        [sys.executable, "-c", MEASURE_BOMBS, *(str(tmp_path / path) for path in bombs)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert all(reason.startswith("too large: ") for reason in measured["checked"]), measured
    assert measured["decoded"] == ["DecompressionBombError"] * len(bombs)  # predict's and the cache's decoder
    assert measured["grew_mib"] < 40, measured
    assert measured["seconds"] < 10, measured


def test_every_odd_but_usable_image_decodes_to_rgb(sample_images, tmp_path):
    salted = salt(tmp_path, sample_images)
    for path in salted.usable:
        pixels_of = pixels.decode_image(tmp_path / path, 64)
        assert pixels_of.shape == (64, 64, 3) and pixels_of.dtype == np.uint8, path
        assert pixels_of.std() > 10, f"{path} decoded flat"  # a photo, not a blank
    # Transparent pixels are composited on white, not black.
    assert pixels.decode_image(tmp_path / "Bengal_9010.png", 64)[:, :8].min() >= 250
    # 16-bit greyscale is scaled to 8 bits, not clipped: it matches its 8-bit twin.
    sixteen = pixels.decode_image(tmp_path / "Bengal_9014.png", 64).astype(int)
    eight = pixels.decode_image(tmp_path / "Bengal_9012.jpg", 64).astype(int)
    assert np.abs(sixteen - eight).mean() < 4


def test_exif_orientation_is_applied_before_training_and_in_show_batch(sample_images, tmp_path, monkeypatch):
    salted = salt(tmp_path / "salted", sample_images)
    rotated, upright = tmp_path / "salted" / salted.rotated, sample_images / salted.rotated_from
    with Image.open(rotated) as stored, Image.open(upright) as original:
        assert stored.size[::-1] == original.size  # the pixels are stored on their side

    def difference(first: np.ndarray, second: np.ndarray) -> float:
        return float(np.abs(first.astype(int) - second.astype(int)).mean())

    # The pixel cache (what training reads) holds the photo upright.
    cached = [
        pixels.load_pixels([path], [sha256(path)], 64, cache_dir=tmp_path / "cache", workers=1)[0]
        for path in (rotated, upright)
    ]  # (3, 64, 64) each
    assert difference(*cached) < 6
    assert difference(np.rot90(cached[0], axes=(1, 2)), cached[1]) > 4 * difference(*cached)

    # show_batch draws it upright.
    from petpipe.data.views import Views
    from petpipe.interpret import draw_batch

    drawn = []
    monkeypatch.setattr(draw_batch, "plot_show_batch", lambda batch, labels, title: drawn.append(batch[0].numpy()))
    for path in (rotated, upright):
        index = pd.DataFrame({"path": [path.name], "label": ["Bengal"], "split": ["train"]})
        params = params_with({"model.img_size": 64})
        views = Views.for_display(params.model, params.train.augment)
        draw_batch.show_batch_figure(index, path.parent, split="train", count=1, views=views, seed=0)
    assert difference(*drawn) < 0.03  # floats in [0, 1]: the same picture after the same augmentation


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, then petpipe refuses
def test_predict_reports_unusable_files_and_predicts_the_rest(salted_pipeline):
    photos, salted = salted_pipeline.photos, salted_pipeline.salted
    paths = [photos / path for path in sorted(salted.unusable) + sorted(salted.usable)]
    model = salted_pipeline.project / "stages/finetune/model.pt"

    result = CliRunner().invoke(main, ["predict", "--model", str(model), "--json", *map(str, paths)])

    assert result.exit_code == 1, result.output
    items = {Path(item["path"]).relative_to(photos).as_posix(): item for item in json.loads(result.stdout)}
    assert sorted(items) == sorted([*salted.unusable, *salted.usable])
    failed = sorted(path for path, item in items.items() if item["error"])
    assert failed == sorted(salted.unusable)
    for path in salted.unusable:
        assert f"error: {photos / path}: " in result.stderr and items[path]["predictions"] == []
    for path in salted.usable:
        assert len(items[path]["predictions"]) == 3 and 0 < items[path]["predictions"][0]["probability"] <= 1
    assert "DecompressionBombError" in items["Bengal_9005.png"]["error"]


# ================================================================ faults


def finetune_command(sample: SmallSample, params_file: Path, lr_find: Path, out: Path) -> list[str]:
    return petpipe(
        "finetune",
        "--params",
        params_file,
        "--images",
        sample.images,
        "--index",
        sample.index,
        "--checkpoint",
        sample.head,
        "--lr-find",
        lr_find,
        "--model",
        out / "model.pt",
        "--metrics",
        out / "metrics.json",
        "--history",
        out / "history.csv",
        "--plot",
        out / "training.png",
    )


def test_killed_finetune_resumes_and_matches_an_uninterrupted_run(small, tmp_path):
    params_file = tmp_path / "params.yaml"
    write_params(params_file, SMALL_TRAINING)
    lr_find = tmp_path / "lr_find.json"
    lr_find.write_text("{}\n")  # finetune.lr is a number: lr-find's result is a dependency, not read
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    resume_files = tmp_path / ".petpipe/resume"

    process = start(finetune_command(small, params_file, lr_find, killed), tmp_path)
    wait_for(lambda: list(resume_files.glob("finetune-*.pt")), process, what="finetune's first epoch was saved")
    kill_hard(process)
    assert not any((killed / name).exists() for name in ("model.pt", "metrics.json", "history.csv"))
    [resume] = resume_files.glob("finetune-*.pt")
    assert load_checkpoint(resume).resume["epoch"] == 1

    resumed = run_quietly(finetune_command(small, params_file, lr_find, killed), tmp_path)
    assert "resuming from" in resumed.stderr and "(epoch 1 done)" in resumed.stderr
    # A kill -9 leaves no word in the resume file's record: the rerun says a signal ended it, with the memory advice.
    assert re.search(
        r"warning: finetune: the run that saved this resume file was killed by a signal \(the kernel's "
        r"OOM killer sends SIGKILL, so does kill -9\); train.batch_size = 8 at model.img_size = 32 needs "
        r"about \d+\.\d MB of memory .*, within the \d+\.\d [MG]B available now \(.*\), where a batch of up "
        r"to \d+ fits",
        resumed.stderr,
    ), resumed.stderr[-2000:]
    assert not resume.exists()  # a finished stage leaves no resume state behind
    uninterrupted = run_quietly(finetune_command(small, params_file, lr_find, whole), tmp_path)
    assert "resuming from" not in uninterrupted.stderr

    assert (killed / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    columns = ["epoch", "train_loss", "valid_loss", "accuracy"]
    pd.testing.assert_frame_equal(
        pd.read_csv(killed / "history.csv")[columns], pd.read_csv(whole / "history.csv")[columns]
    )
    state = load_checkpoint(killed / "model.pt").state_dict
    for name, tensor in load_checkpoint(whole / "model.pt").state_dict.items():
        assert torch.equal(state[name], tensor), name
    assert temporaries(tmp_path) == []


class StallingServer:
    """127.0.0.1 HTTP server for one archive: the first transfer sends half, then stalls (until released)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.range_headers: list[str | None] = []
        self.release = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pets/images.tar.gz"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                requested = self.headers.get("Range")
                owner.range_headers.append(requested)
                start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
                body = owner.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(owner.payload) - 1}/{len(owner.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if len(owner.range_headers) > 1:
                    self.wfile.write(body)
                    return
                with contextlib.suppress(OSError):  # the client is killed mid-transfer
                    for offset in range(0, len(body) // 2, 16_384):
                        self.wfile.write(body[offset : min(offset + 16_384, len(body) // 2)])
                        self.wfile.flush()
                        time.sleep(0.005)
                    owner.release.wait(120)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    @contextlib.contextmanager
    def running(self) -> Iterator[StallingServer]:
        with serving(self.server, before_shutdown=self.release.set):
            yield self


def test_killed_download_resumes_where_it_stopped(sample_images, tmp_path):
    photos = sorted(sample_images.glob("*.jpg"))[:30]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for photo in photos:
            tar.add(photo, arcname=f"images/{photo.name}")
    payload = buffer.getvalue()
    checksum = "sha256:" + hashlib.sha256(payload).hexdigest()

    with StallingServer(payload).running() as server:
        write_params(tmp_path / "params.yaml", {"data.source": server.url, "data.checksum": checksum})
        part = tmp_path / ".petpipe/downloads" / (cache_name(server.url) + ".part")
        process = start(petpipe("fetch", "--out", "stages/fetch/images"), tmp_path)
        wait_for(lambda: part.exists() and part.stat().st_size >= 128 * 1024, process, what="128 KiB downloaded")
        kill_hard(process)
        partial = part.stat().st_size
        assert 0 < partial < len(payload) and payload.startswith(part.read_bytes())
        assert not (tmp_path / "stages/fetch/images").exists()

        run_quietly(petpipe("fetch", "--out", "stages/fetch/images"), tmp_path)

    assert server.range_headers == [None, f"bytes={partial}-"]  # the rerun asked only for the rest
    assert not part.exists() and part.with_suffix("").read_bytes() == payload
    fetched = tmp_path / "stages/fetch/images"
    assert sorted(path.name for path in fetched.iterdir()) == [photo.name for photo in photos]
    assert all((fetched / photo.name).read_bytes() == photo.read_bytes() for photo in photos)
    assert temporaries(tmp_path) == []


def outputs_state(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names if (folder / name).exists()}


def assert_killed_then_rerun(
    folder: Path, names: list[str], paused_at: str, command: list[str], cwd: Path, written_before: list[str]
) -> None:
    """Kill `command` half-way through writing `paused_at`, check what is left, rerun, check again."""
    paused = cwd / "paused"
    process = start(
        pausing_petpipe(*command), cwd, PETPIPE_TEST_PAUSE_BEFORE=paused_at, PETPIPE_TEST_PAUSED=str(paused)
    )
    wait_for(paused.exists, process, what=f"it began writing {paused_at}")
    kill_hard(process)

    left = outputs_state(folder, names)
    assert sorted(left) == sorted(written_before)  # outputs written before the kill; the one being written: none
    [half_written] = temporaries(folder)  # the half-written one lives only under its temporary name...
    assert half_written.startswith(f".{paused_at}.")
    assert Path(paused.read_text()).name == half_written

    with working_in(cwd):  # ...and the rerun (in this process: one start-up less) removes it and writes everything
        rerun = CliRunner().invoke(main, list(map(str, command)))
    assert rerun.exit_code == 0, rerun.output

    assert sorted(outputs_state(folder, names)) == sorted(names)
    assert temporaries(folder) == []
    for name, content in left.items():  # what the killed run left was complete
        assert_same_complete_output(name, content, (folder / name).read_bytes())


def assert_same_complete_output(name: str, left: bytes, rewritten: bytes) -> None:
    """A file the killed run left is whole: a PNG that decodes to its end, a table or text equal to the rerun's
    (tables up to float noise: evaluate's probabilities may differ in the last bits between processes)."""
    if name.endswith(".png"):
        assert left.startswith(PNG_MAGIC) and left.endswith(b"IEND\xaeB`\x82"), name
        with Image.open(io.BytesIO(left)) as image, Image.open(io.BytesIO(rewritten)) as again:
            image.load()
            assert image.size == again.size, name
    elif name.endswith(".csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(io.BytesIO(left)), pd.read_csv(io.BytesIO(rewritten)), check_exact=False, rtol=1e-4
        )
    else:
        assert left == rewritten, name


def test_killed_index_labels_leaves_only_complete_outputs(small, tmp_path):
    write_params(tmp_path / "params.yaml", SMALL_TRAINING)
    out = tmp_path / "stages/index-labels"
    command = [
        "index-labels",
        "--images",
        small.images,
        *(argument for name in INDEX_OUTPUTS for argument in (f"--{name.split('.')[0].replace('_', '-')}", out / name)),
    ]
    assert_killed_then_rerun(
        out, INDEX_OUTPUTS, "report.json", command, tmp_path, written_before=["index.csv", "classes.json"]
    )
    assert image_index.load_index(out / "index.csv").equals(image_index.load_index(small.index))


def test_killed_evaluate_leaves_only_complete_outputs(small, tmp_path):
    write_params(tmp_path / "params.yaml", {**SMALL_TRAINING, "evaluate.checkpoint": "train-head"})
    out = tmp_path / "stages/evaluate"
    options = {
        "metrics.json": "--metrics",
        "confusion.csv": "--confusion",
        "confusion.png": "--confusion-plot",
        "confusion_normalized.png": "--confusion-normalized-plot",
        "top_losses.png": "--top-losses",
        "top_losses.csv": "--top-losses-table",
        "most_confused.csv": "--most-confused",
        "report.md": "--report",
    }
    command = [
        "evaluate",
        "--images",
        small.images,
        "--index",
        small.index,
        "--finetune-model",
        small.head,
        "--head-model",
        small.head,
        *(argument for name in EVALUATE_OUTPUTS for argument in (options[name], out / name)),
    ]
    # evaluate writes report.md second to last, then metrics.json: kill it while it writes report.md.
    assert_killed_then_rerun(
        out,
        EVALUATE_OUTPUTS,
        "report.md",
        command,
        tmp_path,
        written_before=[name for name in EVALUATE_OUTPUTS if name not in ("report.md", "metrics.json")],
    )
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == "train-head"


def a_checkpoint(small: SmallSample, *, epoch: int) -> Checkpoint:
    checkpoint = load_checkpoint(small.head)
    return checkpoint.with_history([*checkpoint.history, {"epoch": epoch}])


FILL_THE_DISK = r"""
import resource, signal, sys, torch
from petpipe.model.checkpoint import load_checkpoint, save_checkpoint

source, target, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
checkpoint = load_checkpoint(source)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    save_checkpoint(target, checkpoint.with_history([*checkpoint.history, {"epoch": 2}]))
except Exception as error:
    print(f"failed: {type(error).__name__}: {error}")
else:
    print("saved")
"""


def test_a_write_that_fails_at_the_os_level_keeps_the_previous_checkpoint(small, tmp_path):
    model = tmp_path / "model.pt"
    save_checkpoint(model, a_checkpoint(small, epoch=1))
    before = model.read_bytes()

    # The kernel refuses to grow any file past half the checkpoint's size: a real failed write().
    result = subprocess.run(
        [sys.executable, "-c", FILL_THE_DISK, str(small.head), str(model), str(len(before) // 2)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0 and result.stdout.startswith(
        "failed: WriteFailed: file size limit reached (ulimit -f"
    ), result.stdout + result.stderr
    assert "model.pt" in result.stdout and "the previous model.pt, if there was one, is unchanged" in result.stdout
    assert model.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt"]


def test_stale_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from petpipe.utils import atomic, file_formats

    target = tmp_path / "metrics.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = atomic._temporary_prefix(target).rsplit("-", 1)[0]  # .metrics.json.<host>
    stale = tmp_path / f"{tag}-{dead.pid}.abc123.tmp"
    live = tmp_path / f"{tag}-{os.getppid()}.def456.tmp"  # pytest's parent: alive
    other_host = tmp_path / f".metrics.json.00000000-{dead.pid}.xyz789.tmp"
    other_file = tmp_path / f".index.csv.{tag.rsplit('.', 1)[1]}-{dead.pid}.abc123.tmp"
    stale_folder = tmp_path / f"{tag}-{dead.pid}.q1w2e3.old"
    for path in (stale, live, other_host, other_file):
        path.write_text("partial")
    (stale_folder / "old").mkdir(parents=True)

    file_formats.write_json(target, {"ok": True})

    assert json.loads(target.read_text()) == {"ok": True}
    assert not stale.exists() and not stale_folder.exists()
    assert live.exists() and other_host.exists() and other_file.exists()


# ================================================================ the salted sample through dvc repro


# tests/test_pipeline.py's settings, with the head trained on features computed once (faster, and
# the other train-head path): about a minute on two idle cores.
SALTED_PIPELINE = {**PIPELINE_SMALL, "train_head.cache_features": True}


@dataclass(frozen=True)
class SaltedPipeline:
    project: Path
    photos: Path
    salted: Salted
    log: str
    source_before: dict[str, str]


@pytest.fixture(scope="module")
def salted_pipeline(tmp_path_factory, sample_images) -> SaltedPipeline:
    """The 370 sample photos plus every bad case, in a folder whose name has spaces and non-ASCII,
    through the real `dvc repro` of every stage."""
    root = tmp_path_factory.mktemp("salted")
    photos = root / "pet photos – ünïcode"
    copy_sample(sample_images, photos)
    salted = salt(photos, sample_images)
    source_before = tree_digest(photos)
    project = make_project(root / "project", {**SALTED_PIPELINE, "data.source": str(photos)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PETPIPE_TRACKING", "off")  # MLflow on the way is tests/test_pipeline.py's and test_tracking's
        log = run_command(["dvc", "repro"], project, timeout=1200).stdout
    return SaltedPipeline(project=project, photos=photos, salted=salted, log=log, source_before=source_before)


def test_salted_photos_go_through_dvc_repro_to_a_trained_model(salted_pipeline):
    project, salted = salted_pipeline.project, salted_pipeline.salted
    for stage in STAGES:
        assert f"Running stage '{stage}'" in salted_pipeline.log

    report = json.loads((project / "stages/index-labels/report.json").read_text(encoding="utf-8"))
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert sorted(skipped) == sorted(salted.unusable)  # exactly the unusable files
    for path, reason in salted.unusable.items():
        assert skipped[path].startswith(reason)
    index = image_index.load_index(project / "stages/index-labels/index.csv")
    assert set(salted.usable) <= set(index["path"]) and len(index) == 370 + len(salted.usable)
    assert [(leak["train"], leak["valid"]) for leak in report["leaks"]] == [salted.leak]
    classes = image_index.load_classes(project / "stages/index-labels/classes.json")
    assert len(classes) == 38 and salted.single_image_class in classes

    tuned = load_checkpoint(project / "stages/finetune/model.pt")
    assert list(tuned.spec.classes) == classes and tuned.stage == "finetune"
    metrics = json.loads((project / "stages/evaluate/metrics.json").read_text(encoding="utf-8"))
    head = json.loads((project / "stages/train-head/metrics.json").read_text(encoding="utf-8"))
    assert head["accuracy"] >= 3 / 38 and metrics["accuracy"] >= 3 / 38, (head, metrics)  # well above chance
    assert metrics["checkpoint"] == "finetune"
    assert metrics["images"] == int((index["split"] == "valid").sum())
    status = run_command(["dvc", "status"], project).stdout
    assert "up to date" in status  # DVC cached every output, the odd names included
    assert temporaries(project / "stages") == []


def test_the_source_folder_is_never_modified(salted_pipeline):
    assert tree_digest(salted_pipeline.photos) == salted_pipeline.source_before
    fetched = salted_pipeline.project / "stages/fetch/images"
    for path in [*salted_pipeline.salted.unusable, *salted_pipeline.salted.usable]:
        assert sha256(fetched / path) == sha256(salted_pipeline.photos / path), path  # copied untouched
