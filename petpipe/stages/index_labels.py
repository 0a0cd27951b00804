"""index-labels: label every image, apply corrections, split train/valid once, report unusable files, draw a batch.

    petpipe index-labels --images stages/fetch/images --corrections labels/corrections.csv \\
        --index stages/index-labels/index.csv \\
        --classes stages/index-labels/classes.json --report stages/index-labels/report.json \\
        --show-batch stages/index-labels/show_batch.png --class-counts stages/index-labels/class_counts.png
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from petpipe import data
from petpipe.atomic import save_figure, write_csv, write_json
from petpipe.errors import PetpipeError
from petpipe.params import LabelParams, Params, SplitParams
from petpipe.pipeline import path_option
from petpipe.plots import plot_class_counts
from petpipe.runner import Context, Stage

log = logging.getLogger(__name__)

# fastai's show_batch shows nine images by default.
SHOW_BATCH_SIZE = 9


STAGE = Stage("index-labels",
              params=("labels", "split", "model.img_size", "model.presize_ratio", "train.seed", "train.augment"))


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.")
    corrections: Path | None = path_option(
        "labels.corrections: path,action,label CSV (relabel or exclude) applied after labelling; none when "
        "omitted.", optional=True)


@dataclass(frozen=True)
class Outputs:
    index: Path = path_option("index.csv to write.")
    classes: Path = path_option("classes.json to write.")
    report: Path = path_option("report.json to write.")
    class_counts: Path = path_option("class_counts.png to write.")
    # Drawn through the training augmentation, the one part of index-labels that needs torch.
    show_batch: Path | None = path_option("show_batch.png to write; not drawn when omitted.", optional=True)


def _show_batch(index: pd.DataFrame, folder: Path, params: Params) -> Any:
    """fastai's show_batch of the training split, augmented as train-head will augment it. Imported here:
    labelling, splitting and reporting need no torch, so index-labels without --show-batch loads none."""
    from petpipe.draw_batch import show_batch_figure
    from petpipe.views import Views

    views = Views.for_display(params.model, params.train.augment)
    return show_batch_figure(index, folder, split="train", count=SHOW_BATCH_SIZE, views=views,
                             seed=params.train.seed)


@dataclass(frozen=True)
class Survey:
    """What the images folder holds: usable labelled images, unusable files, names without a label."""

    files: int
    labels: dict[str, str]  # usable image (relative path) -> label
    infos: dict[str, data.ImageInfo]
    skipped: list[dict[str, str]]  # {"path", "reason"}
    unmatched: list[str]


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    params = context.params
    folder = Path(inputs.images)
    if not folder.is_dir():
        raise PetpipeError(f"{folder}: images folder not found; run `petpipe fetch` first or fix --images")
    found, corrected = corrected_survey(survey(folder, params.labels), inputs.corrections)
    _refuse_a_single_class(sorted(set(found.labels.values())), folder, params.labels)
    index, moved = split_index(found, params.split)
    classes = data.class_names(index)
    counts = data.split_counts(index, classes)
    _refuse_classes_without_training_images(counts, split_file=params.split.file)
    leaks = data.find_leaks(index)
    warnings = _warnings(counts, leaks=leaks, skipped=found.skipped, unmatched=found.unmatched, moved=moved)
    if corrected["ignored"]:
        warnings.append(f"{len(corrected['ignored'])} correction(s) name files without a label (see corrections)")
    for warning in warnings:
        log.warning("warning: %s", warning)

    # Draw both figures before writing anything, so a plotting failure leaves no new outputs.
    show_batch = _show_batch(index, folder, params) if outputs.show_batch is not None else None
    class_counts = plot_class_counts(counts)
    n_valid = int(counts["valid"].sum())
    write_csv(outputs.index, index)
    write_json(outputs.classes, {"classes": classes})
    write_json(outputs.report, _report(index, counts, survey=found, leaks=leaks, moved=moved,
                                       warnings=warnings, corrections=corrected))
    if show_batch is not None:
        save_figure(outputs.show_batch, show_batch)
    save_figure(outputs.class_counts, class_counts)
    context.log.log_metrics({"images": len(index), "classes": len(classes), "train_images": len(index) - n_valid,
                             "valid_images": n_valid, "skipped": len(found.skipped),
                             "unmatched": len(found.unmatched), "leaks": len(leaks),
                             "relabelled": corrected["relabelled"], "excluded": corrected["excluded"]})
    written = [outputs.report, outputs.classes, outputs.index, outputs.show_batch, outputs.class_counts]
    context.log.log_artifacts([path for path in written if path is not None])

    return (
        f"indexed {len(index)} images of {len(classes)} classes ({len(index) - n_valid} train, {n_valid} valid); "
        f"{len(found.skipped)} skipped, {len(found.unmatched)} unmatched, {len(leaks)} train/valid duplicates"
        + (f"; {corrected['relabelled']} relabelled, {corrected['excluded']} excluded by {inputs.corrections}"
           if inputs.corrections else "")
        + f" -> {outputs.index}"
    )


def survey(folder: Path, labels: LabelParams) -> Survey:
    """Label every file in the folder by labels.method, then decode each labelled one to check it."""
    relative_paths = [data.relative_posix(path, folder) for path in data.scan_images(folder)]
    found = data.label_images(relative_paths, method=labels.method, pattern=labels.pattern,
                              csv_path=Path(labels.csv) if labels.csv else None)
    unmatched = [path for path in relative_paths if found[path] is None]
    candidates = [path for path in relative_paths if found[path] is not None]
    log.info("checking %d images in %s (%d unmatched names)", len(candidates), folder, len(unmatched))
    results = data.check_images([folder / path for path in candidates])
    infos = {path: result for path, result in zip(candidates, results) if isinstance(result, data.ImageInfo)}
    skipped = [{"path": path, "reason": result} for path, result in zip(candidates, results) if isinstance(result, str)]
    if not infos:
        raise PetpipeError(
            f"no usable images in {folder}: {len(relative_paths)} files, {len(skipped)} skipped, "
            f"{len(unmatched)} unmatched; check labels.pattern / data.source"
        )
    return Survey(files=len(relative_paths), labels={path: found[path] for path in infos}, infos=infos,
                  skipped=skipped, unmatched=unmatched)


def corrected_survey(found: Survey, corrections: Path | None) -> tuple[Survey, dict[str, Any]]:
    """The survey with labels.corrections applied (the cleaner's relabel and exclude decisions), and
    report.json's account of them."""
    if corrections is None:
        return found, {"file": None, "relabelled": 0, "excluded": 0, "ignored": []}
    source = f"labels.corrections {corrections}"
    folder_files = [*found.labels, *(entry["path"] for entry in found.skipped), *found.unmatched]
    labels, done = data.apply_corrections(found.labels, data.load_corrections(corrections),
                                          folder_files=folder_files, source=source)
    if not labels:
        raise PetpipeError(f"{source} excludes every image; remove some exclude rows")
    infos = {path: found.infos[path] for path in labels}
    return replace(found, labels=labels, infos=infos), {"file": str(corrections), **done}


def split_index(found: Survey, split: SplitParams) -> tuple[pd.DataFrame, list[str]]:
    """index.csv's rows, split once; and the images moved to train because their class had none there."""
    splits = data.split_images(list(found.infos), valid_pct=split.valid_pct, seed=split.seed,
                               split_file=Path(split.file) if split.file else None)
    moved: list[str] = []
    if not split.file:  # a split file is the user's decision: a class it leaves untrained is refused later
        splits, moved = data.give_every_class_a_training_image(splits, found.labels)
    return data.build_index(found.labels, found.infos, splits), moved


def _refuse_a_single_class(classes: list[str], folder: Path, labels: LabelParams) -> None:
    """A one-class "classifier" trains to 100 % and learns nothing: two classes are the minimum."""
    if len(classes) >= 2:
        return
    how = {"regex": f"labels.pattern {labels.pattern!r} gives every file name this label",
           "folder": "every image is in this one folder (labels.method folder labels by parent folder)",
           "csv": f"labels.csv ({labels.csv}) gives every image this label"}[labels.method]
    raise PetpipeError(
        f"only one class found ({classes[0]}) in {folder}: a classifier needs at least two; {how}. "
        "Check labels.method / labels.pattern, or add images of other classes"
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
    index: pd.DataFrame, counts: pd.DataFrame, *, survey: Survey, leaks: list[dict[str, str]], moved: list[str],
    warnings: list[str], corrections: dict[str, Any],
) -> dict[str, Any]:
    return {
        "images": len(index),
        "train": int(counts["train"].sum()),
        "valid": int(counts["valid"].sum()),
        "classes": len(counts),
        "per_class": {name: {"train": int(row.train), "valid": int(row.valid)} for name, row in counts.iterrows()},
        "skipped": survey.skipped,
        "unmatched": survey.unmatched,
        "leaks": leaks,
        # Images the split put in valid, moved to train because their class had no training image.
        "moved_to_train": moved,
        # labels.corrections applied: images relabelled and excluded, corrections naming unlabelled files.
        "corrections": corrections,
        "warnings": warnings,
    }


