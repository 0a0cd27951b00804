"""A list of image URLs as data.source: read it, check its labels, and say which URLs petpipe will download.

Two forms, the ones image-search workflows produce:
- a CSV file with a header row naming the columns `url` and `label` (other columns are ignored);
- a folder of `<label>.txt` (or `<label>.csv`) files with one URL per line: fastai's `download_images` layout,
  where the file's name is the class.

Labels become folder names under stages/fetch/images, so a label that is not a portable folder name is
refused here, before anything is downloaded, rather than silently renamed (two labels could then merge).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from petpipe.data.folders import count_images, is_junk
from petpipe.errors import PetpipeError

LIST_SUFFIXES = (".txt", ".csv")
# Only the web: file:// would copy files of the machine that runs fetch into the data set (a shared list could
# reach any file it can read; local photos belong in a folder as data.source), and data:, ftp:, s3: etc. are
# not what image searches return.
ALLOWED_SCHEMES = ("http", "https")
# Names Windows keeps for devices: a folder so named cannot be created or checked out there.
RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{n}" for n in range(10)), *(f"lpt{n}" for n in range(10))}
)
FORBIDDEN_CHARACTERS = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')
MAX_LABEL_BYTES = 255


@dataclass(frozen=True)
class Entry:
    """One line of the list: its URL, its class, and where it was read ("urls.csv:4")."""

    url: str
    label: str
    where: str


def is_url_list(source: str) -> bool:
    """Whether data.source names a URL list: a .csv file, or a folder holding .txt/.csv files and no image."""
    path = Path(source).expanduser()
    if "://" in source:
        return False
    if path.is_file():
        return path.suffix.lower() == ".csv"
    if path.is_dir():
        return bool(_list_files(path)) and count_images(path) == 0
    return False


def read_url_list(source: str) -> list[Entry]:
    """Every entry of the list in its order; PetpipeError (one line) for a list petpipe cannot use."""
    path = Path(source).expanduser()
    entries = _read_folder(path) if path.is_dir() else _read_csv(path)
    _refuse_bad_labels(entries, source)
    if not any(url_problem(entry.url) is None for entry in entries):
        examples = ", ".join(repr(entry.url) for entry in entries[:3]) or "none"
        raise PetpipeError(
            f"data.source {source}: no http(s) URL in the list ({len(entries)} entries; first: {examples}). "
            "Put one image URL per line in <label>.txt files, or a CSV with columns url,label"
        )
    return entries


def url_problem(url: str) -> str | None:
    """Why petpipe will not download url (its scheme, or that it is no URL), or None for a URL it will."""
    try:
        parts = urlsplit(url)
    except ValueError as error:  # e.g. an unbalanced [ in the host
        return f"not a valid URL ({error})"
    scheme = parts.scheme.lower()
    if not scheme:
        return "not a URL (no scheme: write http:// or https://)"
    if scheme not in ALLOWED_SCHEMES:
        return f"scheme {scheme}: is refused (petpipe downloads {' and '.join(ALLOWED_SCHEMES)} URLs only)"
    if not parts.hostname:
        return "not a valid URL (no host)"
    return None


def label_problem(label: str) -> str | None:
    """Why a label cannot be a folder name on every system, or None."""
    if not label:
        return "is empty"
    if label in (".", ".."):
        return "would climb out of the images folder"
    if FORBIDDEN_CHARACTERS.search(label):
        return 'holds / \\ < > : " | ? * or a control character'
    if is_junk(label):
        return "starts with '.' (a hidden folder, which index-labels skips)"
    if label.split(".")[0].strip().lower() in RESERVED_NAMES:
        return "is a name Windows keeps for a device"
    if label != label.rstrip(" ."):
        return "ends with a space or a dot (Windows drops them)"
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        return f"is longer than {MAX_LABEL_BYTES} bytes"
    return None


# --- the two forms --------------------------------------------------------------------------------


def _list_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not is_junk(path.name) and path.suffix.lower() in LIST_SUFFIXES
    )


def _read_folder(folder: Path) -> list[Entry]:
    """fastai's layout: the class is the file's name, each line a URL (blank lines and # comments skipped)."""
    entries = []
    for path in _list_files(folder):
        label = path.stem.strip()
        for number, url in _urls_in_file(path):
            entries.append(Entry(url, label, f"{path.name}:{number}"))
    return entries


def _urls_in_file(path: Path) -> list[tuple[int, str]]:
    """(line number, URL) of a per-class file: a .txt holds a URL a line; a .csv its `url` column if its
    header names one, else its first column."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".txt":
        lines = enumerate(text.splitlines(), start=1)
        return [(number, line.strip()) for number, line in lines if line.strip() and not line.lstrip().startswith("#")]
    rows = list(csv.reader(text.splitlines()))
    column, first = 0, 1
    if rows and "url" in (header := [cell.strip().lower() for cell in rows[0]]):
        column, first = header.index("url"), 2
    found = []
    for number, row in enumerate(rows[first - 1 :], start=first):
        url = row[column].strip() if len(row) > column else ""
        if url and not url.startswith("#"):
            found.append((number, url))
    return found


def _read_csv(path: Path) -> list[Entry]:
    """A CSV with a header row naming `url` and `label` (in any order, any case; other columns ignored)."""
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = [cell.strip().lower() for cell in next(reader, [])]
        missing = [name for name in ("url", "label") if name not in header]
        if missing:
            raise PetpipeError(
                f"data.source {path}: a URL list CSV needs a header row with the columns url,label; "
                f"no {' or '.join(missing)} column in its first row {header}"
            )
        url_column, label_column = header.index("url"), header.index("label")
        entries = []
        for row in reader:
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue  # a blank line
            url = cells[url_column] if len(cells) > url_column else ""
            label = cells[label_column] if len(cells) > label_column else ""
            entries.append(Entry(url, label, f"{path.name}:{reader.line_num}"))
    return entries


def _refuse_bad_labels(entries: list[Entry], source: str) -> None:
    bad: dict[str, tuple[str, str]] = {}
    for entry in entries:
        problem = label_problem(entry.label)
        if problem is not None:
            bad.setdefault(entry.label, (problem, entry.where))
    if bad:
        listed = "; ".join(f"{label!r} ({where}) {problem}" for label, (problem, where) in list(bad.items())[:5])
        raise PetpipeError(
            f"data.source {source}: {len(bad)} label(s) cannot be folder names under stages/fetch/images: {listed}. "
            "Rename them (letters, digits, spaces, - and _ are safe); nothing was downloaded"
        )
