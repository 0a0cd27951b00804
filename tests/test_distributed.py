"""train-head as DistributedDataParallel: two processes on the gloo backend, on the CPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from helpers import run_command, train_head_command


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun is installed with torch"
)
def test_two_process_train_head_writes_once_and_matches_single_process(
    tmp_path, trained_head, indexed_sample, sample_images
):
    """Against the session's single-process `petpipe train-head` (the same params, pixels and timed levers)."""
    single = trained_head
    command = train_head_command(trained_head.params_file, sample_images, indexed_sample, tmp_path / "ddp")
    ddp = run_command(
        ["torchrun", "--standalone", "--nproc-per-node", "2", *command],
        tmp_path,
        PETPIPE_CACHE_DIR=str(trained_head.cache),
    )

    assert sorted(path.name for path in (tmp_path / "ddp").iterdir()) == [
        "history.csv",
        "metrics.json",
        "model.pt",
        "show_batch.png",  # drawn by rank 0 alone, after training
        "training.png",
    ]
    assert ddp.stdout.count("train-head: 3 epochs") == 1, "only rank 0 reports"
    assert not list((tmp_path / ".petpipe/resume").glob("*.pt"))
    single_accuracy = json.loads(single.outputs.metrics.read_text())["accuracy"]
    ddp_accuracy = json.loads((tmp_path / "ddp/metrics.json").read_text())["accuracy"]
    assert ddp_accuracy >= 3 / 37
    # Per-rank BatchNorm statistics and augmentations differ: close, not identical (86 valid photos).
    assert abs(ddp_accuracy - single_accuracy) <= 0.12, (single_accuracy, ddp_accuracy)
    assert single.stdout.count("train-head: 3 epochs") == 1
