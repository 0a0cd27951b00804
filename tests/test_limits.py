"""A full disk, a full memory and Ctrl-C: each ends in one line that says what happened and what was kept.

The disk is real: a tmpfs of a few megabytes mounted for the test (as root; CI runs as root), filled,
then written to; nothing is mocked. One test per kind of write petpipe makes: checkpoints, resume files,
the pixel cache (a numpy memmap), CSV, JSON and PNG outputs, downloads, archive extraction, the ONNX
export and MLflow artifacts (best effort: the stage still succeeds). Memory: a batch that cannot fit in
a real memory cgroup is refused before it is allocated; a GPU's out-of-memory error (no GPU here: raised
from the training step, the one place a CUDA allocation fails) names the settings to halve. Ctrl-C: a
real SIGINT to a finetune subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import io
import json
import logging
import os
import re
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import serving, write_params
from petpipe.data import pixels
from petpipe.errors import PetpipeError
from petpipe.model.checkpoint import load_checkpoint, save_checkpoint
from petpipe.train.resume import ResumeFile
from petpipe.utils import atomic, file_formats
from petpipe.utils.atomic import WriteFailed

# small: the module-scoped fixture, reused
from test_reliability import SMALL_TRAINING, environment, finetune_command, petpipe, small, start, wait_for  # noqa: F401

# The levers fixed (nothing timed: the timing probe would cost more than these runs), 32 px, four breeds.
LIMITS = {**SMALL_TRAINING, "train.memory_format": "channels_last"}
ONE_LINE_SPACE = re.compile(
    r"no space left on device writing (\S+) \((\d+\.\d) MB free\); (.+); free space and rerun "
    r"dvc repro$"
)


# ---------------------------------------------------------------- a small real disk


@contextlib.contextmanager
def small_disk(folder: Path, size: str, *, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of `size` mounted at folder for the block (skipped where mounting is not permitted)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk tests need root, as CI has")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the disk until `leave` bytes are free."""
    free = atomic.free_bytes(disk)
    with open(disk / "filler", "wb") as file, contextlib.suppress(OSError):
        file.write(b"\0" * max(free - leave, 0))


def refused(action: Callable[[], object]) -> WriteFailed:
    with pytest.raises(WriteFailed) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message, message
    return caught.value


def leftovers(disk: Path) -> list[str]:
    return sorted(path.name for path in disk.rglob("*") if path.name.endswith((".tmp", ".old")))


# ---------------------------------------------------------------- each kind of write


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(small, tmp_path):
    checkpoint = load_checkpoint(small.head)
    size = small.head.stat().st_size
    with small_disk(tmp_path / "disk", f"{int(size * 1.5)}") as disk:
        target = disk / "model.pt"
        save_checkpoint(target, checkpoint)
        before = target.read_bytes()
        error = refused(lambda: save_checkpoint(target, checkpoint.with_history([{"epoch": 9}])))
        assert ONE_LINE_SPACE.search(str(error)), error
        assert "model.pt" in str(error) and "the previous model.pt, if there was one, is unchanged" in str(error)
        assert target.read_bytes() == before and leftovers(disk) == []


def test_a_resume_file_on_a_full_disk_keeps_the_last_completed_epoch(small, tmp_path):
    checkpoint = load_checkpoint(small.head)
    resume_file = ResumeFile(checkpoint.stage, params=checkpoint.params, inputs=[], root=tmp_path / "resume")
    with small_disk(tmp_path / "resume", f"{int(small.head.stat().st_size * 1.5)}"):
        resume_file.save(dataclasses.replace(checkpoint, resume={"epoch": 1}))
        error = refused(lambda: resume_file.save(dataclasses.replace(checkpoint, resume={"epoch": 2})))
        assert ONE_LINE_SPACE.search(str(error)) and resume_file.path.name in str(error), error
        assert resume_file.load().resume["epoch"] == 1  # the file and its record still agree
        assert leftovers(resume_file.path.parent) == []


def test_the_pixel_cache_memmap_on_a_full_disk_is_refused_before_decoding(small, tmp_path):
    photos = sorted(small.images.glob("*.jpg"))
    # 40 photos at 128 px are 2 MB: more than the disk. Without reserving the blocks first, the first page
    # written through the map past the end of the disk would kill the process with SIGBUS.
    with small_disk(tmp_path / "cache", "1m") as disk:
        error = refused(
            lambda: pixels.load_pixels(
                photos, [str(index) for index in range(len(photos))], 128, cache_dir=disk, workers=1
            )
        )
        assert ONE_LINE_SPACE.search(str(error)) and "no pixel cache was kept" in str(error), error
        assert sorted(path.name for path in disk.iterdir()) == []


WRITERS = {
    "csv": lambda target, size: file_formats.write_csv(target, pd.DataFrame({"value": np.arange(size // 8)})),
    "json": lambda target, size: file_formats.write_json(target, {"values": list(range(size // 6))}),
    "png": lambda target, size: file_formats.save_figure(target, _figure(size)),
    "text": lambda target, size: file_formats.write_text(target, "x" * size),
}


def _figure(size: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 2) if size < 10_000 else (12, 12))
    axes.imshow(np.random.default_rng(0).random((400, 400)) if size >= 10_000 else np.zeros((2, 2)))
    return figure


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_an_output_on_a_full_disk_keeps_the_previous_version(tmp_path, kind):
    with small_disk(tmp_path / "disk", "1m") as disk:
        target = disk / f"output.{kind}"
        WRITERS[kind](target, 1000)
        before = target.read_bytes()
        fill(disk, leave=8192)
        error = refused(lambda: WRITERS[kind](target, 400_000))
        assert ONE_LINE_SPACE.search(str(error)) and target.name in str(error), error
        assert target.read_bytes() == before and leftovers(disk) == []


def test_a_read_only_folder_is_named_with_the_fix(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        file_formats.write_text(disk / "report.md", "before\n")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        error = refused(lambda: file_formats.write_text(disk / "report.md", "after\n"))
        assert re.search(
            r"read-only file system writing \S*report.md \(\d+\.\d MB free\); the previous report.md, "
            r"if there was one, is unchanged; make \S+ writable and rerun dvc repro$",
            str(error),
        ), error
        assert (disk / "report.md").read_text() == "before\n"


def test_an_archive_extracted_onto_a_full_disk_keeps_the_previous_images(small, tmp_path):
    from petpipe.data.archives import extract_archive

    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w") as tar:
        for photo in sorted(small.images.glob("*.jpg")):
            tar.add(photo, arcname=f"photos/{photo.name}")
    # Room for the bytes (the archive's declared sizes pass the free-space check) but not for 40 files:
    # the disk runs out of inodes, a real ENOSPC half-way through.
    with small_disk(tmp_path / "disk", "64m", inodes=24) as disk:
        images = disk / "images"
        extract_archive(_archive_of(small, tmp_path, count=3), images)
        before = sorted(path.name for path in images.iterdir())
        error = refused(lambda: extract_archive(archive, images))
        assert ONE_LINE_SPACE.search(str(error)) and "images" in str(error), error
        assert sorted(path.name for path in images.iterdir()) == before
        assert [path.name for path in disk.iterdir()] == ["images"]  # the half-extracted staging folder is gone


def _archive_of(small, folder: Path, *, count: int) -> Path:
    archive = folder / f"first-{count}.tar"
    with tarfile.open(archive, "w") as tar:
        for photo in sorted(small.images.glob("*.jpg"))[:count]:
            tar.add(photo, arcname=photo.name)
    return archive


def test_a_download_onto_a_full_disk_keeps_what_arrived_for_the_rerun(small, tmp_path):
    from petpipe.data.download import download_archive

    served = tmp_path / "served"
    served.mkdir()
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        for photo in sorted(small.images.glob("*.jpg")):
            tar.add(photo, arcname=photo.name)
    (served / "photos.tar").write_bytes(payload.getvalue() * 2)  # about 2 MB
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}/photos.tar"
    with serving(server), small_disk(tmp_path / "downloads", "1m") as disk:
        error = refused(lambda: download_archive(url, None, disk))
        assert ONE_LINE_SPACE.search(str(error)) and ".part" in str(error), error
        assert re.search(
            r"the \d+\.\d MB of \S+ downloaded so far are kept in \S+\.part and the rerun resumes "
            r"from them",
            str(error),
        ), error
        [part] = disk.glob("*.part")
        assert part.read_bytes() == (served / "photos.tar").read_bytes()[: part.stat().st_size]


def test_an_onnx_export_onto_a_full_disk_keeps_the_previous_bundle(small, tmp_path):
    pytest.importorskip("onnxscript", reason="export needs onnxscript")
    from click.testing import CliRunner

    from petpipe.cli import main

    with small_disk(tmp_path / "disk", "2m") as disk:
        (disk / "bundle").mkdir()
        (disk / "bundle" / "bundle.json").write_text("{}\n")
        result = CliRunner().invoke(main, ["export", "--model", str(small.head), "--out", str(disk / "bundle")])
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert line.startswith("Error: export: no space left on device writing ") and "\n" not in line, line
        assert ONE_LINE_SPACE.search(line), line
        assert sorted(path.name for path in (disk / "bundle").iterdir()) == ["bundle.json"]
        assert [path.name for path in disk.iterdir()] == ["bundle"]


def test_mlflow_artifacts_on_a_full_disk_cost_a_warning_not_the_stage(small, tmp_path, monkeypatch, caplog):
    from helpers import outputs_in, params_with
    from petpipe.stages import index_labels

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PETPIPE_TRACKING", "on")
    outputs = outputs_in(tmp_path / "stages/index-labels")
    with small_disk(tmp_path / "mlruns", "4k"), caplog.at_level(logging.WARNING):
        index_labels.run(params_with(LIMITS), index_labels.Inputs(images=small.images), outputs)
    assert outputs.index.is_file() and outputs.class_counts.is_file()  # the stage's own outputs are complete
    [line] = [record.getMessage() for record in caplog.records if record.getMessage().startswith("mlflow:")]
    assert re.search(
        r"no space left on device writing \S*mlruns\S* \(\d+\.\d MB free\); not logged for stage "
        r"index-labels: artifacts",
        line,
    ), line


# ---------------------------------------------------------------- a training stage, end to end


def test_a_full_disk_during_train_head_says_which_epoch_is_kept(small, tmp_path):
    write_params(tmp_path / "params.yaml", {**LIMITS, "train_head.epochs": 3})
    out = tmp_path / "head"
    command = _train_head(small, tmp_path / "params.yaml", out)
    # Room for one resume file, not for its next epoch beside it (the write is atomic: old and new coexist).
    with small_disk(tmp_path / ".petpipe/resume", f"{int(small.head.stat().st_size * 1.6)}") as disk:
        result = subprocess.run(
            command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 1, result.stderr[-3000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("Error: train-head: no space left on device writing .petpipe/resume/train-head-"), line
        assert re.search(
            r"the last completed epoch \(1\) is kept in \.petpipe/resume/train-head-\S+\.pt, and dvc "
            r"repro resumes from it; free space and rerun dvc repro$",
            line,
        ), line
        assert "Traceback" not in result.stderr
        [resume] = disk.glob("*.pt")
        assert load_checkpoint(resume).resume["epoch"] == 1 and leftovers(disk) == []
        assert not (out / "model.pt").exists()  # nothing half-written where DVC would take it


# ---------------------------------------------------------------- memory


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Callable[[], None]]:
    """A real memory cgroup (v1 or v2) limited to `limit` bytes; yields a preexec_fn that joins it."""
    for base, limit_file in (
        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
        (Path("/sys/fs/cgroup/unified"), "memory.max"),
        (Path("/sys/fs/cgroup"), "memory.max"),
    ):
        group = base / f"petpipe-test-{os.getpid()}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit))
        except OSError:
            with contextlib.suppress(OSError):
                group.rmdir()
            continue
        try:
            yield lambda: (group / "cgroup.procs").write_text(str(os.getpid()))
        finally:
            for _ in range(50):  # the process has ended; the kernel lets go of the group soon after
                with contextlib.suppress(OSError):
                    group.rmdir()
                    break
                time.sleep(0.1)
        return
    pytest.skip("no memory cgroup can be made here (needs root and a writable cgroup hierarchy, as CI has)")


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_allocation(small, tmp_path):
    # At 128 px every image of a batch costs EfficientNet-Lite0 about 50 MB of saved activations, so the
    # whole training split in one batch needs well over the 1.6 GB the cgroup allows; the process itself
    # (interpreter, torch, the model) needs about 1 GB.
    write_params(
        tmp_path / "params.yaml",
        {**LIMITS, "train.batch_size": 4096, "model.img_size": 128, "train_head.cache_features": False},
    )
    out = tmp_path / "head"
    with memory_cgroup(1_600_000_000) as join:
        result = subprocess.run(
            _train_head(small, tmp_path / "params.yaml", out),
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            preexec_fn=join,
        )
    assert result.returncode == 1, f"rc {result.returncode} (137: the OOM killer): {result.stderr[-3000:]}"
    line = result.stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        r"Error: train-head: train.batch_size = 4096 \(batches of (\d+): the training split\) at "
        r"model.img_size = 128 needs about (\d+\.\d) MB of memory \((\d+\.\d) MB \+ \1 x "
        r"(\d+\.\d) MB per image\), (\d+\.\d) MB more than the process holds now, more than the "
        r"(\d+\.\d) MB available \(cgroup limit 1600.0 MB \(\S+\)\); set train.batch_size to (\d+) "
        r"or less \(dvc exp run -S train.batch_size=\7\)\. Nothing was allocated for it",
        line,
    )
    assert found, line
    batch, needed, fixed, per_image, growth, available, largest = map(float, found.groups())
    assert growth > available and available < 1600 and 0 < largest < batch
    held = needed - growth
    assert abs((available - (fixed - held)) / per_image - largest) < 1.5  # the largest batch that fits, MB rounded
    assert not out.exists() and not list(tmp_path.glob(".petpipe/resume/*.pt"))  # refused before the first batch


def _train_head(small, params_file: Path, out: Path) -> list[str]:
    return petpipe(
        "train-head",
        "--params",
        params_file,
        "--images",
        small.images,
        "--index",
        small.index,
        "--model",
        out / "model.pt",
        "--metrics",
        out / "metrics.json",
        "--history",
        out / "history.csv",
        "--plot",
        out / "training.png",
    )


def test_out_of_gpu_memory_names_the_batch_size_to_halve_and_the_epoch_kept(small, tmp_path, monkeypatch):
    from petpipe.stages import finetune
    from petpipe.train import fit_loop

    steps = {"count": 0}
    real_step = fit_loop.training_step

    def out_of_memory_in_epoch_two(*args, **kwargs):  # what a CUDA allocation raises; no GPU here
        steps["count"] += 1
        if steps["count"] > 4:  # 4 batches of 8 per epoch: the first epoch completes
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(fit_loop, "training_step", out_of_memory_in_epoch_two)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr_find.json").write_text("{}\n")
    out = tmp_path / "out"
    outputs = finetune.Outputs(
        model=out / "model.pt", metrics=out / "metrics.json", history=out / "history.csv", plot=out / "training.png"
    )
    with pytest.raises(PetpipeError) as caught:
        finetune.run(
            _params(),
            finetune.Inputs(
                images=small.images, index=small.index, checkpoint=small.head, lr_find=tmp_path / "lr_find.json"
            ),
            outputs,
        )
    assert re.fullmatch(
        r"finetune: out of memory on cpu at train.batch_size = 8, model.img_size = 32; the last "
        r"completed epoch \(1\) is kept in \.petpipe/resume/finetune-\S+\.pt, and dvc repro resumes "
        r"from it; halve the batch \(dvc exp run -S train.batch_size=4\) or lower model.img_size",
        str(caught.value),
    ), caught.value
    [resume] = (tmp_path / ".petpipe/resume").glob("*.pt")
    assert load_checkpoint(resume).resume["epoch"] == 1 and not out.exists()


def _params():
    from helpers import params_with

    return params_with(LIMITS)


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_in_finetune_says_which_epoch_is_kept_and_exits_130(small, tmp_path):
    # 30 short epochs: with the early layers frozen, 6 could all end between two looks at the resume folder
    write_params(tmp_path / "params.yaml", {**LIMITS, "finetune.epochs": 30})
    (tmp_path / "lr_find.json").write_text("{}\n")
    resume_files = tmp_path / ".petpipe/resume"
    process = start(
        finetune_command(small, tmp_path / "params.yaml", tmp_path / "lr_find.json", tmp_path / "out"), tmp_path
    )
    wait_for(lambda: list(resume_files.glob("finetune-*.json")), process, what="finetune's first epoch was saved")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stderr = process.log.read_text()
    line = stderr.strip().splitlines()[-1]
    found = re.fullmatch(
        r"finetune: interrupted in epoch (\d+) of 30; the last completed epoch \((\d+)\) is kept in "
        r"\.petpipe/resume/finetune-\S+\.pt, and dvc repro resumes from it",
        line,
    )
    assert found, stderr[-2000:]
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    in_flight, kept = int(found.group(1)), int(found.group(2))
    assert in_flight == kept + 1
    [resume] = resume_files.glob("finetune-*.pt")
    assert load_checkpoint(resume).resume["epoch"] == kept
    assert json.loads(resume.with_suffix(".json").read_text())["stopped"] == "interrupted"
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_training_stage_says_what_its_memory_cost(trained_head):
    """The session's `petpipe train-head`: its summary line ends with the estimate and the measured peak."""
    line = trained_head.stdout.strip().splitlines()[-1]
    found = re.search(r"^train-head: 3 epochs, .*; memory: estimated (\d+\.\d) MB, peak RSS (\d+\.\d) MB$", line)
    assert found, line
    estimated, peak = map(float, found.groups())
    assert 0.5 < estimated / peak < 2, line  # benchmarks/memory.json: within 20% on the sample
