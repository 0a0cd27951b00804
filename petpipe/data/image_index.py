"""The image index: find photos, check they decode, label, correct and split them, read and write index.csv.

Pure functions for labels and the split; small I/O helpers at the edges. Later stages only need
`load_index` and `load_classes`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

import petpipe.data.pixels  # noqa: F401  (sets PIL's decompression-bomb limit that check_image relies on)
from petpipe.data.folders import visible_files
from petpipe.errors import PetpipeError

INDEX_COLUMNS = ["path", "label", "split", "width", "height", "hash"]
SPLITS = ("train", "valid", "test")
# EXIF orientations 5-8 rotate by 90 or 270 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
# Below this many files a process pool costs more to start than it saves.
_MIN_FILES_FOR_POOL = 64


@dataclass(frozen=True)
class ImageInfo:
    """What the index records about one usable image."""

    width: int
    height: int
    hash: str


# --- finding and checking images -------------------------------------------------------------


def scan_images(folder: Path) -> list[Path]:
    """Every file under folder but junk (folders.is_junk: hidden files, __MACOSX), recursively, sorted by
    relative posix path."""
    return [Path(folder) / relative for relative in visible_files(Path(folder))]


def relative_posix(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def check_image(path: Path) -> ImageInfo | str:
    """Fully decode one file; return its size and content hash, or the reason it is unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if not data:
        return "zero-byte file"
    content_hash = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
                orientation = image.getexif().get(_EXIF_ORIENTATION)
    except UnidentifiedImageError:
        return "not an image (cannot identify image file)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"too large: {error}"
    except Exception as error:  # noqa: BLE001  (any decoder failure means the file is unusable)
        return f"truncated or corrupt: {error}"
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width=width, height=height, hash=content_hash)


def check_images(paths: Sequence[Path], *, workers: int | None = None) -> list[ImageInfo | str]:
    """check_image for every path, in the same order, decoding in parallel processes."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < _MIN_FILES_FOR_POOL:
        return [check_image(path) for path in paths]
    chunksize = max(1, min(64, len(paths) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_image, paths, chunksize=chunksize))


# --- labels ----------------------------------------------------------------------------------


def compile_label_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def label_from_name(name: str, pattern: re.Pattern[str]) -> str | None:
    """The pattern's first group matched in a file name (fastai's RegexLabeller), or None."""
    match = pattern.search(name)
    if match is None or not match.group(1):
        return None
    return match.group(1)


def label_from_folder(relative_path: str) -> str | None:
    """The name of the file's parent folder; None for files directly in the images folder."""
    parent = PurePosixPath(relative_path).parent
    return parent.name or None


def labels_from_regex(relative_paths: Iterable[str], pattern: re.Pattern[str]) -> dict[str, str | None]:
    return {path: label_from_name(PurePosixPath(path).name, pattern) for path in relative_paths}


def labels_from_folders(relative_paths: Iterable[str], *, under_split_folder: bool = False) -> dict[str, str | None]:
    """Each file's parent folder; under_split_folder: the path starts with a split folder (train/ants/1.jpg),
    which is never a class: a file directly in it (train/1.jpg) has none."""

    def inside(path: str) -> str:
        return PurePosixPath(*PurePosixPath(path).parts[1:]).as_posix() if under_split_folder else path

    return {path: label_from_folder(inside(path)) for path in relative_paths}


def labels_from_csv(csv_path: Path, relative_paths: Sequence[str]) -> dict[str, str | None]:
    """Labels from a path,label CSV; files the CSV does not name get None."""
    source = f"labels.csv {csv_path}"
    table = _read_table(csv_path, ["path", "label"], source=source)
    table["path"] = [_normalise_relative(path) for path in table["path"]]
    _refuse_duplicates(table["path"], source=source)
    _refuse_unknown_paths(table["path"], relative_paths, source=source)
    empty = table.loc[table["label"].str.strip() == "", "path"].tolist()
    if empty:
        raise PetpipeError(f"{source}: empty label for {_few(empty)}; give every row a label")
    known = dict(zip(table["path"], table["label"]))
    return {path: known.get(path) for path in relative_paths}


def label_images(
    relative_paths: Sequence[str], *, method: str, pattern: str, csv_path: Path | None, under_split_folder: bool = False
) -> dict[str, str | None]:
    """Map each relative path to its label by labels.method; None means unmatched. under_split_folder: every
    path starts with its split's folder (split.method folders), which folder labels skip."""
    if method == "regex":
        return labels_from_regex(relative_paths, compile_label_pattern(pattern))
    if method == "folder":
        return labels_from_folders(relative_paths, under_split_folder=under_split_folder)
    if method == "csv":
        if csv_path is None:
            raise PetpipeError("labels.method is csv but labels.csv is null; set labels.csv to a path,label CSV")
        return labels_from_csv(csv_path, relative_paths)
    raise PetpipeError(f"labels.method {method!r} is unknown; use regex, folder or csv")


# --- corrections -----------------------------------------------------------------------------

# labels.corrections: the cleaner's decisions (petpipe serve's Clean page, or written by hand).
CORRECTION_COLUMNS = ["path", "action", "label"]
CORRECTION_ACTIONS = ("relabel", "exclude")


@dataclass(frozen=True)
class Correction:
    """One image's correction: relabel it as `label`, or exclude it from the index (label "")."""

    action: str
    label: str = ""


def load_corrections(path: Path) -> dict[str, Correction]:
    """labels.corrections as {relative path: Correction}; a header row alone corrects nothing."""
    source = f"labels.corrections {path}"
    table = _read_table(path, CORRECTION_COLUMNS, source=source)
    table["path"] = [_normalise_relative(relative) for relative in table["path"]]
    _refuse_duplicates(table["path"], source=source)
    table["action"] = table["action"].str.strip().str.lower()
    wrong = table.loc[~table["action"].isin(CORRECTION_ACTIONS)]
    if len(wrong):
        shown = [f"{row.path}={row.action!r}" for row in wrong.head(5).itertuples()]
        raise PetpipeError(f"{source}: action must be relabel or exclude, got {', '.join(shown)}")
    unlabelled = table.loc[(table["action"] == "relabel") & (table["label"].str.strip() == ""), "path"].tolist()
    if unlabelled:
        raise PetpipeError(
            f"{source}: relabel without a new label for {_few(unlabelled)}; put the class in the label column"
        )
    return {
        row.path: Correction(row.action, row.label if row.action == "relabel" else "") for row in table.itertuples()
    }


def corrections_table(corrections: dict[str, Correction]) -> pd.DataFrame:
    """The rows labels.corrections holds, sorted by path so that a git diff shows only what changed."""
    rows = [
        {"path": path, "action": correction.action, "label": correction.label}
        for path, correction in sorted(corrections.items())
    ]
    return pd.DataFrame(rows, columns=CORRECTION_COLUMNS)


def apply_corrections(
    labels: dict[str, str], corrections: dict[str, Correction], *, folder_files: Sequence[str], source: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """The labels with the corrections applied, and what was done: relabelled, excluded, ignored.

    A correction must name a file of the images folder. One naming a file that has no label (unusable,
    or unmatched by labels.method) has nothing to correct and is ignored. A new label must be a class
    the images already have, so that a typo cannot become a class of one image.
    """
    _refuse_unknown_paths(list(corrections), folder_files, source=source)
    classes = set(labels.values())
    unknown = sorted({c.label for c in corrections.values() if c.action == "relabel"} - classes)
    if unknown:
        raise PetpipeError(
            f"{source}: relabel to unknown class(es) {_few(unknown)}; "
            f"use one of the classes the images have ({_few(sorted(classes))})"
        )
    corrected = dict(labels)
    done: dict[str, Any] = {"relabelled": 0, "excluded": 0, "ignored": []}
    for path, correction in sorted(corrections.items()):
        if path not in corrected:
            done["ignored"].append(path)
        elif correction.action == "exclude":
            del corrected[path]
            done["excluded"] += 1
        else:
            corrected[path] = correction.label
            done["relabelled"] += 1
    return corrected, done


# --- split -----------------------------------------------------------------------------------

# Top-level folders that name a split, compared case-insensitively: the names fastai (train/valid),
# Ultralytics classify and Hugging Face imagefolder (train/val/test) and Keras give them.
SPLIT_FOLDER_NAMES = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}


@dataclass(frozen=True)
class SplitPlan:
    """How index-labels splits: method folders, random or file; why; and, for folders, each split's folder."""

    method: str
    reason: str
    folders: dict[str, str]  # split -> its folder's name as on disk (folders only)
    file: Path | None = None

    def folder_of(self, relative_path: str) -> str | None:
        """The split whose folder holds the file, or None (outside every split folder, or not folders)."""
        top = PurePosixPath(relative_path).parts[0]
        return next((split for split, name in self.folders.items() if name == top), None)


def find_split_folders(relative_paths: Iterable[str]) -> dict[str, str]:
    """{split: folder} for each top-level folder named as a split (SPLIT_FOLDER_NAMES, any case)."""
    tops = sorted({PurePosixPath(path).parts[0] for path in relative_paths if len(PurePosixPath(path).parts) > 1})
    found: dict[str, list[str]] = {}
    for top in tops:
        for split, names in SPLIT_FOLDER_NAMES.items():
            if top.lower() in names:
                found.setdefault(split, []).append(top)
    twice = {split: names for split, names in found.items() if len(names) > 1}
    if twice:
        split, names = next(iter(twice.items()))
        raise PetpipeError(
            f"folders {', '.join(n + '/' for n in names)} all name the {split} split; "
            "keep one of them (or set split.method random)"
        )
    return {split: names[0] for split, names in found.items()}


def plan_split(relative_paths: Sequence[str], *, method: str, file: str | None) -> SplitPlan:
    """split.method resolved against the images: which method splits them and why (index-labels' summary)."""
    if method == "file" or (method == "auto" and file is not None):
        return SplitPlan("file", f"split.file {file}", {}, Path(str(file)))
    folders = find_split_folders(relative_paths) if method in ("auto", "folders") else {}
    usable = "train" in folders and ("valid" in folders or "test" in folders)
    listed = ", ".join(f"{folders[split]}/" for split in SPLITS if split in folders)
    if method == "folders" and not usable:
        raise PetpipeError(
            "split.method folders needs train/ and valid/ (or val/, validation/; optionally test/) folders at "
            f"the top of the images, found {listed or 'none'}; make them or set split.method auto or random"
        )
    if usable:
        return SplitPlan(
            "folders", f"{'auto' if method == 'auto' else 'split.method folders'}: the folders {listed}", folders
        )
    why = "split.method random" if method == "random" else "auto: no train/ and valid/ folders"
    return SplitPlan("random", f"{why}; stratified per class", {})


def split_key(relative_path: str, seed: int) -> float:
    """A file's place in the order of its class, in [0, 1): a hash of the seed and its name alone."""
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def held_out(count: int, fraction: float) -> int:
    """Photos of a class of `count` a split of `fraction` takes: fraction x count rounded half up, so a class
    of at least 1/(2 x fraction) photos gets one (at 0.2: 3 photos). Grows by 0 or 1 as count grows by one."""
    return math.floor(count * fraction + 0.5 + 1e-9)


def held_out_counts(count: int, *, valid_pct: float, test_pct: float) -> tuple[int, int]:
    """(valid, test) photos of a class of `count`, each its held_out share, capped so training keeps one.

    Each cap is the minimum of two counts that grow by 0 or 1 with the class, so the result does too:
    the split's stability (one boundary moves by at most one place per added file) holds under the caps.
    """
    n_valid = min(held_out(count, valid_pct), max(count - 1, 0))
    n_test = min(held_out(count, test_pct), max(count - 1 - n_valid, 0))
    return n_valid, n_test


def stratified_split(labels: dict[str, str], *, valid_pct: float, test_pct: float, seed: int) -> dict[str, str]:
    """train/valid/test for each path, class by class: the class's files ordered by split_key, valid the
    first and test the last of their held_out_counts, train the rest.

    Stratified: every class gives each split its share within one photo. Stable: the order depends on
    names and the seed alone, so listing files in another order moves none, and a new file shifts each
    boundary of its class by at most one place: at most one other file moves between train and valid
    (and, with test_pct, one between train and test).
    """
    by_class: dict[str, list[str]] = {}
    for path, label in labels.items():
        by_class.setdefault(label, []).append(path)
    splits: dict[str, str] = {}
    for paths in by_class.values():
        ordered = sorted(paths, key=lambda path: (split_key(path, seed), path))
        n_valid, n_test = held_out_counts(len(ordered), valid_pct=valid_pct, test_pct=test_pct)
        for position, path in enumerate(ordered):
            splits[path] = "valid" if position < n_valid else "test" if position >= len(ordered) - n_test else "train"
    return {path: splits[path] for path in labels}


def splits_from_file(split_path: Path, relative_paths: Sequence[str]) -> dict[str, str]:
    """The split a path,split CSV fixes for each path; every path must be in it."""
    source = f"split.file {split_path}"
    table = _read_table(split_path, ["path", "split"], source=source)
    table["path"] = [_normalise_relative(path) for path in table["path"]]
    _refuse_duplicates(table["path"], source=source)
    table["split"] = table["split"].str.strip().str.lower()
    wrong = table.loc[~table["split"].isin(SPLITS)]
    if len(wrong):
        shown = [f"{row.path}={row.split!r}" for row in wrong.head(5).itertuples()]
        raise PetpipeError(f"{source}: split must be train, valid or test, got {', '.join(shown)}")
    fixed = dict(zip(table["path"], table["split"]))
    missing = [path for path in relative_paths if path not in fixed]
    if missing:
        raise PetpipeError(
            f"{source}: {len(missing)} image(s) have no split, e.g. {_few(missing)}; "
            "add them to split.file or set split.file to null to split by valid_pct and seed"
        )
    return {path: fixed[path] for path in relative_paths}


def split_images(
    labels: dict[str, str], plan: SplitPlan, *, valid_pct: float, test_pct: float, seed: int
) -> dict[str, str]:
    """train/valid/test for each labelled path, by the plan: the user's folders or file, else stratified.

    With folders, a split without its folder is drawn from train/ as random would (valid by valid_pct,
    test by test_pct): train/ and test/ alone still give a validation split.
    """
    if plan.method == "file":
        assert plan.file is not None
        return splits_from_file(plan.file, list(labels))
    if plan.method == "random":
        return stratified_split(labels, valid_pct=valid_pct, test_pct=test_pct, seed=seed)
    placed = {path: plan.folder_of(path) for path in labels}
    in_train = {path: label for path, label in labels.items() if placed[path] == "train"}
    drawn = stratified_split(
        in_train,
        valid_pct=0.0 if "valid" in plan.folders else valid_pct,
        test_pct=0.0 if "test" in plan.folders else test_pct,
        seed=seed,
    )
    return {path: drawn.get(path) or str(placed[path]) for path in labels}


# --- index -----------------------------------------------------------------------------------


def build_index(labels: dict[str, str], infos: dict[str, ImageInfo], splits: dict[str, str]) -> pd.DataFrame:
    """index.csv as a frame: one row per usable, labelled image, sorted by path."""
    rows = [
        {
            "path": path,
            "label": labels[path],
            "split": splits[path],
            "width": infos[path].width,
            "height": infos[path].height,
            "hash": infos[path].hash,
        }
        for path in sorted(labels)
    ]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def class_names(index: pd.DataFrame) -> list[str]:
    """Sorted unique labels: position i is class id i in every later stage."""
    return sorted(index["label"].unique().tolist())


def split_counts(index: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """(class x {train, valid, test}) image counts, zeros included, rows in class order."""
    counts = pd.crosstab(index["label"], index["split"])
    return counts.reindex(index=list(classes), columns=list(SPLITS), fill_value=0).astype(int)


def find_leaks(index: pd.DataFrame) -> list[dict[str, str]]:
    """Pairs of files with identical bytes in two splits: {"train": a, "valid": b, "hash": h}, or with "test"
    beside train or valid (a test photo also in training or validation scores what was tuned on)."""
    leaks = []
    for first, second in (("train", "valid"), ("train", "test"), ("valid", "test")):
        pairs = index.loc[index["split"] == first, ["path", "hash"]].merge(
            index.loc[index["split"] == second, ["path", "hash"]], on="hash", suffixes=("_a", "_b")
        )
        pairs = pairs.sort_values(["hash", "path_a", "path_b"])
        leaks += [
            {first: path_a, second: path_b, "hash": content_hash}
            for path_a, path_b, content_hash in zip(pairs["path_a"], pairs["path_b"], pairs["hash"])
        ]
    return leaks


def class_imbalance(counts: pd.DataFrame) -> dict[str, Any]:
    """The largest and smallest class (images over every split) and their ratio, as report.json holds it."""
    totals = counts.sum(axis=1)
    largest, smallest = str(totals.idxmax()), str(totals.idxmin())
    return {
        "largest": {"class": largest, "images": int(totals[largest])},
        "smallest": {"class": smallest, "images": int(totals[smallest])},
        "ratio": round(float(totals[largest]) / max(int(totals[smallest]), 1), 2),
    }


def load_index(path: Path) -> pd.DataFrame:
    """Read index.csv written by index-labels, checking its columns and split values."""
    path = Path(path)
    hint = "run `petpipe index-labels` (or `dvc repro index-labels`) to write it"
    try:
        # keep_default_na=False: a class called "NA" or "null" stays a string.
        index = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise PetpipeError(f"{path}: index not found; {hint}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PetpipeError(f"{path}: not a readable index CSV ({error}); {hint}") from None
    missing = [column for column in INDEX_COLUMNS if column not in index.columns]
    if missing:
        raise PetpipeError(
            f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, index.columns))}); {hint}"
        )
    index = index[INDEX_COLUMNS]
    bad_split = sorted(set(index["split"]) - set(SPLITS))
    if bad_split:
        raise PetpipeError(
            f"{path}: split must be train, valid or test, found {', '.join(map(repr, bad_split))}; {hint}"
        )
    try:
        index = index.astype({"width": int, "height": int})
    except ValueError as error:
        raise PetpipeError(f"{path}: width/height are not whole numbers ({error}); {hint}") from None
    return index


def load_classes(path: Path) -> list[str]:
    """Read classes.json: the list whose position i is class id i."""
    path = Path(path)
    hint = "run `petpipe index-labels` (or `dvc repro index-labels`) to write it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PetpipeError(f"{path}: classes file not found; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PetpipeError(f"{path}: not valid JSON ({error}); {hint}") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
        raise PetpipeError(f'{path}: expected {{"classes": [<class names>]}}; {hint}')
    return classes


# --- helpers ---------------------------------------------------------------------------------


def _read_table(path: Path, columns: list[str], *, source: str) -> pd.DataFrame:
    """A small user CSV with the given columns, as strings; PetpipeError naming what is wrong."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise PetpipeError(f"{source}: file not found; fix the path in params.yaml") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PetpipeError(f"{source}: not a readable CSV ({error}); it needs columns {','.join(columns)}") from None
    table.columns = [str(column).strip().lower() for column in table.columns]
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise PetpipeError(
            f"{source}: missing column(s) {', '.join(missing)} (has {', '.join(table.columns)}); "
            f"it needs a header row {','.join(columns)}"
        )
    return table[columns]


def _normalise_relative(path: str) -> str:
    """'./a\\b.jpg' -> 'a/b.jpg', the form index.csv uses."""
    return PurePosixPath(path.strip().replace("\\", "/")).as_posix()


def _refuse_duplicates(paths: pd.Series, *, source: str) -> None:
    duplicated = sorted(set(paths[paths.duplicated()]))
    if duplicated:
        raise PetpipeError(f"{source}: path(s) listed more than once: {_few(duplicated)}; keep one row per image")


def _refuse_unknown_paths(paths: Iterable[str], known: Sequence[str], *, source: str) -> None:
    known_set = set(known)
    unknown = [path for path in paths if path not in known_set]
    if unknown:
        raise PetpipeError(
            f"{source}: {len(unknown)} path(s) not found in the images folder, e.g. {_few(unknown)}; "
            "its paths are relative to the images folder"
        )


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
