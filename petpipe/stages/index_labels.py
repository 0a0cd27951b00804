"""index-labels: label every image, split train/valid once, report unusable files, draw a batch.

    petpipe index-labels --images stages/fetch/images --index stages/index-labels/index.csv \
        --classes stages/index-labels/classes.json --report stages/index-labels/report.json \
        --show-batch stages/index-labels/show_batch.png --class-counts stages/index-labels/class_counts.png
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from petpipe import data, tracking
from petpipe.atomic import save_figure, write_csv, write_json
from petpipe.errors import PetpipeError
from petpipe.params import Params
from petpipe.plots import plot_class_counts
from petpipe.show_batch import show_batch_figure

log = logging.getLogger(__name__)

# fastai's show_batch shows nine images by default.
SHOW_BATCH_SIZE = 9


@dataclass(frozen=True)
class Inputs:
    images: Path


@dataclass(frozen=True)
class Outputs:
    index: Path
    classes: Path
    report: Path
    show_batch: Path
    class_counts: Path


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    folder = Path(inputs.images)
    if not folder.is_dir():
        raise PetpipeError(f"{folder}: images folder not found; run `petpipe fetch` first or fix --images")

    relative_paths = [data.relative_posix(path, folder) for path in data.scan_images(folder)]
    labels = data.label_images(
        relative_paths,
        method=params.labels.method,
        pattern=params.labels.pattern,
        csv_path=Path(params.labels.csv) if params.labels.csv else None,
    )
    unmatched = [path for path in relative_paths if labels[path] is None]
    candidates = [path for path in relative_paths if labels[path] is not None]
    log.info("checking %d images in %s (%d unmatched names)", len(candidates), folder, len(unmatched))

    results = data.check_images([folder / path for path in candidates])
    infos = {path: result for path, result in zip(candidates, results) if isinstance(result, data.ImageInfo)}
    skipped = [{"path": path, "reason": result} for path, result in zip(candidates, results) if isinstance(result, str)]
    if not infos:
        raise PetpipeError(
            f"no usable images in {folder}: {len(relative_paths)} files, {len(skipped)} skipped, "
            f"{len(unmatched)} unmatched; check labels.pattern / data.source"
        )

    usable_labels = {path: labels[path] for path in infos}
    splits = data.split_images(
        list(infos),
        valid_pct=params.split.valid_pct,
        seed=params.split.seed,
        split_file=Path(params.split.file) if params.split.file else None,
    )
    moved: list[str] = []
    if not params.split.file:  # a split file is the user's decision: a class it leaves untrained is refused below
        splits, moved = data.give_every_class_a_training_image(splits, usable_labels)
    index = data.build_index(usable_labels, infos, splits)
    classes = data.class_names(index)
    counts = data.split_counts(index, classes)
    _refuse_classes_without_training_images(counts, split_file=params.split.file)
    leaks = data.find_leaks(index)
    warnings = _warnings(counts, leaks=leaks, skipped=skipped, unmatched=unmatched, moved=moved)
    for warning in warnings:
        log.warning("warning: %s", warning)

    # Draw both figures before writing anything, so a plotting failure leaves no new outputs.
    show_batch = show_batch_figure(
        index, folder, split="train", count=SHOW_BATCH_SIZE, presize=params.model.presize,
        size=params.model.img_size, augment=params.train.augment, seed=params.train.seed,
    )
    class_counts = plot_class_counts(counts)

    n_valid = int(counts["valid"].sum())
    used = {"labels": params.labels.model_dump(), "split": params.split.model_dump(),
            "model": {"img_size": params.model.img_size, "presize_ratio": params.model.presize_ratio},
            "train": {"seed": params.train.seed, "augment": params.train.augment.model_dump()}}
    with tracking.stage_run("index-labels", params=used) as run_log:
        write_csv(outputs.index, index)
        write_json(outputs.classes, {"classes": classes})
        write_json(outputs.report, _report(index, counts, skipped=skipped, unmatched=unmatched, leaks=leaks,
                                           moved=moved, warnings=warnings))
        save_figure(outputs.show_batch, show_batch)
        save_figure(outputs.class_counts, class_counts)
        run_log.log_metrics({"images": len(index), "classes": len(classes), "train_images": len(index) - n_valid,
                             "valid_images": n_valid, "skipped": len(skipped), "unmatched": len(unmatched),
                             "leaks": len(leaks)})
        run_log.log_artifacts([outputs.report, outputs.classes, outputs.index, outputs.show_batch,
                               outputs.class_counts])

    return (
        f"indexed {len(index)} images of {len(classes)} classes ({len(index) - n_valid} train, {n_valid} valid); "
        f"{len(skipped)} skipped, {len(unmatched)} unmatched, {len(leaks)} train/valid duplicates -> {outputs.index}"
    )


def _refuse_classes_without_training_images(counts: pd.DataFrame, *, split_file: str | None) -> None:
    """Only a split file can leave a class untrained (the hash split moves one image of it to train)."""
    empty = counts.index[counts["train"] == 0].tolist()
    if empty:
        raise PetpipeError(
            f"class(es) with no training image: {', '.join(empty)}; mark at least one image of each as train "
            f"in split.file ({split_file}) or add images of these classes"
        )


def _warnings(
    counts: pd.DataFrame, *, leaks: list[dict[str, str]], skipped: list[dict[str, str]], unmatched: list[str],
    moved: list[str],
) -> list[str]:
    warnings = []
    if moved:
        warnings.append(f"{len(moved)} class(es) had no training image; moved to train: {', '.join(moved)}")
    no_valid = counts.index[counts["valid"] == 0].tolist()
    if no_valid:
        warnings.append(f"{len(no_valid)} class(es) with no validation image: {', '.join(no_valid)}")
    if leaks:
        warnings.append(f"{len(leaks)} identical file pair(s) across train and valid (see leaks)")
    if skipped:
        warnings.append(f"{len(skipped)} unusable file(s) skipped (see skipped)")
    if unmatched:
        warnings.append(f"{len(unmatched)} file name(s) without a label (see unmatched)")
    return warnings


def _report(
    index: pd.DataFrame, counts: pd.DataFrame, *, skipped: list[dict[str, str]], unmatched: list[str],
    leaks: list[dict[str, str]], moved: list[str], warnings: list[str],
) -> dict[str, Any]:
    return {
        "images": len(index),
        "train": int(counts["train"].sum()),
        "valid": int(counts["valid"].sum()),
        "classes": len(counts),
        "per_class": {name: {"train": int(row.train), "valid": int(row.valid)} for name, row in counts.iterrows()},
        "skipped": skipped,
        "unmatched": unmatched,
        "leaks": leaks,
        # Images the split put in valid, moved to train because their class had no training image.
        "moved_to_train": moved,
        "warnings": warnings,
    }


