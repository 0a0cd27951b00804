"""index-labels: label every image, apply corrections, split train/valid/test once, report unusable files.

    petpipe index-labels --images stages/fetch/images --corrections labels/corrections.csv \\
        --index stages/index-labels/index.csv \\
        --classes stages/index-labels/classes.json --report stages/index-labels/report.json \\
        --class-counts stages/index-labels/class_counts.png
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from petpipe.data import image_index
from petpipe.errors import PetpipeError
from petpipe.interpret.plots import plot_class_counts
from petpipe.params import LabelParams, Params, SplitParams
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.utils.file_formats import save_figure, write_csv, write_json

log = logging.getLogger(__name__)

# No model params: index-labels imports no torch and no model code (train-head draws show_batch.png).
STAGE = Stage("index-labels", params=("labels", "split"))


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    corrections: Path | None = path_option(
        "labels.corrections: path,action,label CSV (relabel or exclude) applied after labelling; none when omitted.",
        optional=True,
        at="${labels.corrections}",
        note="the cleaner's decisions (petpipe serve's Clean page), committed with git",
    )


@dataclass(frozen=True)
class Outputs:
    index: Path = path_option("index.csv to write.", file="index.csv")
    classes: Path = path_option("classes.json to write.", file="classes.json")
    report: Path = path_option("report.json to write.", file="report.json")
    class_counts: Path = path_option(
        "class_counts.png to write.",
        file="class_counts.png",
        kind="plots",
        note="Figures are image plots (`dvc plots show/diff` put each revision's side by side); plots are cached "
        "outputs like outs (cache: true is DVC's default), so `dvc push/pull` carry them.",
    )


@dataclass(frozen=True)
class Survey:
    """What the images folder holds: usable labelled images, unusable files, names without a label."""

    files: int
    labels: dict[str, str]  # usable image (relative path) -> label
    infos: dict[str, image_index.ImageInfo]
    skipped: list[dict[str, str]]  # {"path", "reason"}
    unmatched: list[str]
    outside: list[str]  # images outside every split folder (split.method folders): not indexed


# Above this ratio of the largest class to the smallest, index-labels warns (the issue trackers' "imbalanced").
IMBALANCE_WARNING = 10.0


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    params = context.params
    folder = Path(inputs.images)
    found = _findings(*_label_and_split(folder, params, inputs.corrections), params=params)
    for warning in found.warnings:
        log.warning("warning: %s", warning)

    # Draw the figure before writing anything, so a plotting failure leaves no new outputs.
    class_counts = plot_class_counts(found.counts)
    write_csv(outputs.index, found.index)
    write_json(outputs.classes, {"classes": image_index.class_names(found.index)})
    write_json(outputs.report, _report(found))
    save_figure(outputs.class_counts, class_counts)
    context.log.log_metrics(_metrics(found))
    context.log.log_artifacts([outputs.report, outputs.classes, outputs.index, outputs.class_counts])
    return _summary(found, inputs.corrections) + f" -> {outputs.index}"


@dataclass(frozen=True)
class Findings:
    """What index-labels found: the index and its images per class and split, the survey of the folder, what
    the corrections did, identical files across splits, the class imbalance, how the split was made (method,
    words, folders) and the warnings."""

    index: pd.DataFrame
    counts: pd.DataFrame
    survey: Survey
    corrected: dict[str, Any]
    leaks: list[dict[str, str]]
    imbalance: dict[str, Any]
    split: dict[str, Any]
    warnings: list[str]

    @property
    def sizes(self) -> dict[str, int]:
        """Images per split: train, valid, test."""
        return {split: int(self.counts[split].sum()) for split in image_index.SPLITS}


def _findings(
    survey: Survey, corrected: dict[str, Any], plan: image_index.SplitPlan, index: pd.DataFrame, *, params: Params
) -> Findings:
    """The index's counts, leaks, imbalance and warnings; a split no model can train or validate on is refused."""
    counts = image_index.split_counts(index, image_index.class_names(index))
    _refuse_classes_without_training_images(counts, plan)
    _refuse_an_empty_validation_split(counts, plan, params.split)
    leaks, imbalance = image_index.find_leaks(index), image_index.class_imbalance(counts)
    warnings = _warnings(
        counts,
        leaks=leaks,
        skipped=survey.skipped,
        unmatched=survey.unmatched,
        outside=survey.outside,
        imbalance=imbalance,
        ignored_corrections=len(corrected["ignored"]),
    )
    split = {"method": plan.method, "how": split_description(plan, params.split), "folders": plan.folders}
    return Findings(index, counts, survey, corrected, leaks, imbalance, split, warnings)


def _label_and_split(
    folder: Path, params: Params, corrections: Path | None
) -> tuple[Survey, dict[str, Any], image_index.SplitPlan, pd.DataFrame]:
    """Every image of `folder` labelled, corrected and split once (the survey, what the corrections did, the
    split's plan and the index); a folder that is missing or holds one class is refused."""
    if not folder.is_dir():
        raise PetpipeError(f"{folder}: images folder not found; run `petpipe fetch` first or fix --images")
    relative_paths = [image_index.relative_posix(path, folder) for path in image_index.scan_images(folder)]
    plan = image_index.plan_split(relative_paths, method=params.split.method, file=params.split.file)
    found, corrected = corrected_survey(survey(folder, params.labels, plan, relative_paths), corrections)
    _refuse_a_single_class(sorted(set(found.labels.values())), folder, params.labels)
    return found, corrected, plan, split_index(found, params.split, plan)


def _metrics(found: Findings) -> dict[str, float]:
    """index-labels' MLflow metrics: the counts of images, classes, splits and of each kind of problem."""
    sizes = found.sizes
    return {
        "images": len(found.index),
        "classes": len(found.counts),
        "train_images": sizes["train"],
        "valid_images": sizes["valid"],
        "test_images": sizes["test"],
        "skipped": len(found.survey.skipped),
        "unmatched": len(found.survey.unmatched),
        "leaks": len(found.leaks),
        "relabelled": found.corrected["relabelled"],
        "excluded": found.corrected["excluded"],
        "imbalance_ratio": found.imbalance["ratio"],
    }


def _summary(found: Findings, corrections: Path | None) -> str:
    """The stage's one summary line, but where the index went."""
    n_train, n_valid, n_test = found.sizes.values()
    survey, corrected, imbalance = found.survey, found.corrected, found.imbalance
    return (
        f"indexed {len(found.index)} images of {len(found.counts)} classes ({n_train} train, {n_valid} valid, "
        f"{n_test} test; split: {found.split['how']}); classes of {imbalance['smallest']['images']} to "
        f"{imbalance['largest']['images']} images ({imbalance['ratio']:g}x); {len(survey.skipped)} skipped, "
        f"{len(survey.unmatched)} unmatched, {len(found.leaks)} duplicates across splits"
        + (f", {len(survey.outside)} outside the split folders" if survey.outside else "")
        + (
            f"; {corrected['relabelled']} relabelled, {corrected['excluded']} excluded by {corrections}"
            if corrections
            else ""
        )
    )


def split_description(plan: image_index.SplitPlan, split: SplitParams) -> str:
    """The method used and why, in words for the summary line and report.json: which folders were the
    splits, and what was drawn from train/ for a split without its folder."""
    if plan.method != "folders":
        shares = (
            f"valid_pct {split.valid_pct:g}, test_pct {split.test_pct:g}, seed {split.seed}"
            if plan.method == "random"
            else ""
        )
        return f"{plan.method} ({plan.reason}" + (f", {shares})" if shares else ")")
    drawn = []
    if "valid" not in plan.folders:
        drawn.append(
            f"valid drawn from {plan.folders['train']}/ by split.valid_pct {split.valid_pct:g} "
            f"(no valid/ or val/ folder)"
        )
    if "test" not in plan.folders and split.test_pct > 0:
        drawn.append(f"test drawn from {plan.folders['train']}/ by split.test_pct {split.test_pct:g}")
    if "test" in plan.folders and split.test_pct > 0:
        drawn.append(f"split.test_pct ignored: {plan.folders['test']}/ is the test split")
    return f"folders ({plan.reason}" + "".join(f"; {part}" for part in drawn) + ")"


def survey(folder: Path, labels: LabelParams, plan: image_index.SplitPlan, relative_paths: list[str]) -> Survey:
    """Label every file in the folder by labels.method, then decode each labelled one to check it. With split
    folders, files outside them are not indexed, and the split folder is never a folder label."""
    outside = [path for path in relative_paths if plan.folders and plan.folder_of(path) is None]
    inside = [path for path in relative_paths if not plan.folders or plan.folder_of(path) is not None]
    found = image_index.label_images(
        inside,
        method=labels.method,
        pattern=labels.pattern,
        csv_path=Path(labels.csv) if labels.csv else None,
        under_split_folder=bool(plan.folders),
    )
    if labels.method == "folder":
        _refuse_split_folders_without_class_folders(inside, found, plan, folder)
    unmatched = [path for path in inside if found[path] is None]
    candidates = [path for path in inside if found[path] is not None]
    log.info("checking %d images in %s (%d unmatched names)", len(candidates), folder, len(unmatched))
    results = image_index.check_images([folder / path for path in candidates])
    infos = {path: result for path, result in zip(candidates, results) if isinstance(result, image_index.ImageInfo)}
    skipped = [{"path": path, "reason": result} for path, result in zip(candidates, results) if isinstance(result, str)]
    if not infos:
        raise PetpipeError(
            f"no usable images in {folder}: {len(relative_paths)} files, {len(skipped)} skipped, "
            f"{len(unmatched)} unmatched; check labels.pattern / data.source"
        )
    _refuse_unreadable_split_folders(candidates, results, plan, folder)
    return Survey(
        files=len(relative_paths),
        labels={path: found[path] for path in infos},
        infos=infos,
        skipped=skipped,
        unmatched=unmatched,
        outside=[path for path in outside if _looks_like_image(path)],
    )


# What counts as a photo when reporting files outside the split folders or loose in one (notes.txt is not).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _looks_like_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _refuse_split_folders_without_class_folders(
    paths: list[str], found: dict[str, str | None], plan: image_index.SplitPlan, folder: Path
) -> None:
    """Folder labels under split folders need class folders: test/1.jpg has no class, and a split folder
    holding only such images is a layout mistake, not a few unmatched names."""
    for split, name in plan.folders.items():
        members = [path for path in paths if plan.folder_of(path) == split and _looks_like_image(path)]
        if members and all(found[path] is None for path in members):
            raise PetpipeError(
                f"{folder / name}: {len(members)} images but no class folders; with labels.method folder put each "
                f"in {name}/<class>/ (as {plan.folders.get('train', 'train')}/ has them), or label by name "
                "(labels.method regex)"
            )


def _refuse_unreadable_split_folders(
    candidates: list[str], results: list[image_index.ImageInfo | str], plan: image_index.SplitPlan, folder: Path
) -> None:
    """A split folder whose every labelled image is unusable would silently vanish from the split."""
    for split, name in plan.folders.items():
        reasons = [(path, result) for path, result in zip(candidates, results) if plan.folder_of(path) == split]
        if reasons and all(isinstance(result, str) for _, result in reasons):
            path, reason = reasons[0]
            raise PetpipeError(
                f"{folder / name}: none of its {len(reasons)} images can be read (e.g. {path}: "
                f"{reason}); replace them, or remove the folder"
            )


def corrected_survey(found: Survey, corrections: Path | None) -> tuple[Survey, dict[str, Any]]:
    """The survey with labels.corrections applied (the cleaner's relabel and exclude decisions), and
    report.json's account of them."""
    if corrections is None:
        return found, {"file": None, "relabelled": 0, "excluded": 0, "ignored": []}
    source = f"labels.corrections {corrections}"
    folder_files = [*found.labels, *(entry["path"] for entry in found.skipped), *found.unmatched, *found.outside]
    labels, done = image_index.apply_corrections(
        found.labels, image_index.load_corrections(corrections), folder_files=folder_files, source=source
    )
    if not labels:
        raise PetpipeError(f"{source} excludes every image; remove some exclude rows")
    infos = {path: found.infos[path] for path in labels}
    return replace(found, labels=labels, infos=infos), {"file": str(corrections), **done}


def split_index(found: Survey, split: SplitParams, plan: image_index.SplitPlan) -> pd.DataFrame:
    """index.csv's rows, split once by the plan."""
    splits = image_index.split_images(
        found.labels, plan, valid_pct=split.valid_pct, test_pct=split.test_pct, seed=split.seed
    )
    return image_index.build_index(found.labels, found.infos, splits)


def _refuse_a_single_class(classes: list[str], folder: Path, labels: LabelParams) -> None:
    """A one-class "classifier" trains to 100 % and learns nothing: two classes are the minimum."""
    if len(classes) >= 2:
        return
    how = {
        "regex": f"labels.pattern {labels.pattern!r} gives every file name this label",
        "folder": "every image is in this one folder (labels.method folder labels by parent folder)",
        "csv": f"labels.csv ({labels.csv}) gives every image this label",
    }[labels.method]
    raise PetpipeError(
        f"only one class found ({classes[0]}) in {folder}: a classifier needs at least two; {how}. "
        "Check labels.method / labels.pattern, or add images of other classes"
    )


def _refuse_classes_without_training_images(counts: pd.DataFrame, plan: image_index.SplitPlan) -> None:
    """A class with no training image cannot be learnt. The random split always trains on one of each; the
    user's folders or file can leave one out: refused, since moving a photo the user placed would be worse."""
    empty = counts.index[counts["train"] == 0].tolist()
    if not empty:
        return
    where = {
        "folders": f"add photos of them to {plan.folders.get('train', 'train')}/ (they are only in the "
        "valid or test folders), or set split.method random",
        "file": f"mark at least one image of each as train in split.file ({plan.file})",
    }
    raise PetpipeError(
        f"class(es) with no training image: {', '.join(empty)}; {where.get(plan.method, 'add images of these classes')}"
    )


def _refuse_an_empty_validation_split(counts: pd.DataFrame, plan: image_index.SplitPlan, split: SplitParams) -> None:
    """Every stage after this one reports on valid (epoch tables, lr-find, the champion): with no validation
    image there is nothing to report, so refuse here rather than fail in train-head."""
    if counts["valid"].sum() > 0:
        return
    largest = int(counts.sum(axis=1).max())
    fix = {
        "folders": f"put photos in a valid/ folder beside {plan.folders.get('train', 'train')}/",
        "file": f"mark some images as valid in split.file ({plan.file})",
    }.get(
        plan.method,
        f"raise split.valid_pct (now {split.valid_pct:g}: a class needs at least "
        f"{max(2, math.ceil(0.5 / split.valid_pct - 1e-9))} images to give one, the largest has {largest})",
    )
    raise PetpipeError(f"the split has no validation image; {fix}, or add images")


def _warnings(
    counts: pd.DataFrame,
    *,
    leaks: list[dict[str, str]],
    skipped: list[dict[str, str]],
    unmatched: list[str],
    outside: list[str],
    imbalance: dict[str, Any],
    ignored_corrections: int = 0,
) -> list[str]:
    warnings = []
    no_valid = counts.index[counts["valid"] == 0].tolist()
    if no_valid:
        warnings.append(f"{len(no_valid)} class(es) with no validation image: {', '.join(no_valid)}")
    if imbalance["ratio"] > IMBALANCE_WARNING:
        warnings.append(
            f"classes are imbalanced {imbalance['ratio']:g}x: {imbalance['largest']['class']} has "
            f"{imbalance['largest']['images']} images, {imbalance['smallest']['class']} "
            f"{imbalance['smallest']['images']} (read balanced_accuracy and per_class.csv, not "
            "accuracy alone)"
        )
    if leaks:
        warnings.append(f"{len(leaks)} identical file pair(s) across splits (see leaks)")
    if skipped:
        warnings.append(f"{len(skipped)} unusable file(s) skipped (see skipped)")
    if unmatched:
        warnings.append(f"{len(unmatched)} file name(s) without a label (see unmatched)")
    if outside:
        warnings.append(f"{len(outside)} image(s) outside the split folders, not indexed (see outside_splits)")
    if ignored_corrections:
        warnings.append(f"{ignored_corrections} correction(s) name files without a label (see corrections)")
    return warnings


def _report(found: Findings) -> dict[str, Any]:
    index, counts, survey = found.index, found.counts, found.survey
    return {
        "images": len(index),
        **found.sizes,
        "classes": len(counts),
        # How the split was made: method folders, random or file, and why (the summary line's words).
        "split": found.split,
        # The largest and smallest class over every split, and their ratio (a warning above 10x).
        "imbalance": found.imbalance,
        "per_class": {
            name: {"train": int(row.train), "valid": int(row.valid), "test": int(row.test)}
            for name, row in counts.iterrows()
        },
        "skipped": survey.skipped,
        "unmatched": survey.unmatched,
        # Images outside the train/valid/test folders when those are the split: not indexed.
        "outside_splits": survey.outside,
        "leaks": found.leaks,
        # labels.corrections applied: images relabelled and excluded, corrections naming unlabelled files.
        "corrections": found.corrected,
        "warnings": found.warnings,
    }
