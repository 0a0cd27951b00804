"""train-head as DistributedDataParallel: two processes on the gloo backend, on the CPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_TRAINING, run_command, write_params

SETTINGS = {**OFFLINE_TRAINING, "model.img_size": 64, "train_head.epochs": 3, "train_head.lr": 0.01}


def train_head_command(folder: Path, index: Path, images: Path) -> list[str]:
    return ["train-head", "--params", "params.yaml", "--images", str(images), "--index", str(index),
            "--model", f"{folder}/model.pt", "--metrics", f"{folder}/metrics.json",
            "--history", f"{folder}/history.csv", "--plot", f"{folder}/training.png"]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is installed with torch")
def test_two_process_train_head_writes_once_and_matches_single_process(tmp_path, indexed_sample, sample_images):
    write_params(tmp_path / "params.yaml", SETTINGS)
    petpipe = str(Path(sys.executable).parent / "petpipe")
    single = run_command([petpipe, *train_head_command(tmp_path / "single", indexed_sample, sample_images)], tmp_path)
    ddp = run_command(["torchrun", "--standalone", "--nproc-per-node", "2", petpipe,
                       *train_head_command(tmp_path / "ddp", indexed_sample, sample_images)], tmp_path)

    assert sorted(path.name for path in (tmp_path / "ddp").iterdir()) == \
        ["history.csv", "metrics.json", "model.pt", "training.png"]
    assert ddp.stdout.count("train-head: 3 epochs") == 1, "only rank 0 reports"
    assert not list((tmp_path / ".petpipe/resume").glob("*.pt"))
    single_accuracy = json.loads((tmp_path / "single/metrics.json").read_text())["accuracy"]
    ddp_accuracy = json.loads((tmp_path / "ddp/metrics.json").read_text())["accuracy"]
    assert ddp_accuracy >= 3 / 37
    # Per-rank BatchNorm statistics and augmentations differ: close, not identical (86 valid photos).
    assert abs(ddp_accuracy - single_accuracy) <= 0.12, (single_accuracy, ddp_accuracy)
    assert single.stdout.count("train-head: 3 epochs") == 1
