"""Get the raw photos named by data.source: download (petpipe/data/download.py), extract safely
(petpipe/data/archives.py), copy a folder (here), or download the photos of a URL list (petpipe/data/url_lists.py,
petpipe/data/image_downloads.py; laid out in label folders here).

Every way in ends in one folder of untouched image files, swapped into place only when complete.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from petpipe.data.archives import extract_archive
from petpipe.data.download import download_archive, download_directory, verify_checksum
from petpipe.data.folders import IMAGE_SUFFIXES, count_images, visible_files
from petpipe.data.image_downloads import Failure, Outcome, Settings, download_all
from petpipe.data.url_lists import Entry, read_url_list, url_problem
from petpipe.errors import PetpipeError
from petpipe.utils.atomic import atomic_directory, atomic_path
from petpipe.utils.file_formats import file_digest

log = logging.getLogger(__name__)


def fetch_source(source: str, checksum: str | None, destination: Path) -> int:
    """Fill destination with the images that source names; return how many image files it holds."""
    if source.startswith("file://"):
        source = unquote(urlparse(source).path)
    if "://" in source:
        archive = download_archive(source, checksum, download_directory())
        return extract_archive(archive, destination)
    path = Path(source).expanduser()
    if path.suffix == ".url" and path.is_file():
        return fetch_source(read_url_file(path), checksum, destination)
    if path.is_dir():
        return copy_folder(path, destination)
    if path.is_file():
        if checksum is not None:
            verify_checksum(path, checksum, delete_on_mismatch=False)
        return extract_archive(path, destination)
    raise PetpipeError(
        f"data.source {source!r}: no such file or folder (relative paths start at {Path.cwd()}). "
        "Point data.source at a folder of images, an archive (.tar.gz, .tgz, .tar, .zip), a URL, or a list of "
        "image URLs (a .csv with columns url,label, or a folder of <label>.txt files)."
    )


def read_url_file(path: Path) -> str:
    """The one URL a .url file holds (lines starting with # are comments).

    A URL kept in a file is what DVC hashes for fetch instead of the URL itself: DVC would ask the server
    for the URL's ETag on every `dvc status` and, offline, stop with "dependency ... does not exist" before
    fetch could say what to do. data.checksum pins the archive's bytes; editing the file reruns fetch.
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    urls = [line for line in lines if line and not line.startswith("#")]
    if len(urls) != 1 or "://" not in urls[0] or urls[0].startswith("file://"):
        raise PetpipeError(
            f"data.source {path}: a .url file holds one http(s)/s3/gs URL on a line of its own "
            f"(lines starting with # are comments); found {urls[:3] or 'none'}"
        )
    return urls[0]


# --- local folders -----------------------------------------------------------------------------


def copy_folder(source: Path, destination: Path) -> int:
    """Copy every file under source but junk (folders.is_junk), keeping sub-folders (labels may be folder
    names); source is untouched."""
    _refuse_overlap(source, destination)
    with atomic_directory(destination) as staging:
        for relative in visible_files(source):
            kind = _special_file_kind(source / relative)
            if kind:
                log.warning("warning: skipping %s: %s, not a file of photo data", source / relative, kind)
                continue
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, staging / relative)
        count = count_images(staging)
        if count == 0:
            raise PetpipeError(
                f"data.source {source}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                "point data.source at a folder of photos"
            )
    return count


def _refuse_overlap(source: Path, destination: Path) -> None:
    # Copying a folder into itself would recurse, and replacing the output would delete the source.
    source, destination = source.resolve(), destination.resolve()
    if destination == source or destination.is_relative_to(source) or source.is_relative_to(destination):
        raise PetpipeError(
            f"data.source {source} overlaps the output folder {destination}; point data.source elsewhere"
        )


def _special_file_kind(path: Path) -> str | None:
    """ "a named pipe", "a socket", ... for a file that is not a regular file (after symlinks); else None."""
    try:
        mode = os.stat(path).st_mode  # never opens it: opening a named pipe would wait for a writer
    except OSError:
        return None  # a dangling or looping symlink: copying it fails with its own error, naming the file
    kinds = {
        stat.S_IFIFO: "a named pipe",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFDIR: None,
        stat.S_IFREG: None,
    }
    return kinds.get(stat.S_IFMT(mode), "a special file")


# --- URL lists ---------------------------------------------------------------------------------

REPORT_COLUMNS = ("url", "label", "status", "file", "reason")


@dataclass
class Tally:
    """What a URL list gave: one report row per entry, and the counts of the summary and of MLflow."""

    rows: list[dict[str, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # downloaded, present, duplicate, failed
    failures: Counter[str] = field(default_factory=Counter)  # failure reason -> count

    def add(self, entry: Entry, status: str, file: str = "", reason: str = "") -> None:
        self.rows.append({"url": entry.url, "label": entry.label, "status": status, "file": file, "reason": reason})
        self.counts[status] += 1

    def fail(self, entry: Entry, failure: Failure) -> None:
        self.add(entry, "failed", reason=str(failure))
        self.failures[failure.reason] += 1

    @property
    def kept(self) -> int:
        return self.counts["downloaded"] + self.counts["present"]

    def metrics(self) -> dict[str, int]:
        return {
            "urls": len(self.rows),
            "images": self.kept,
            **{status: self.counts[status] for status in STATUSES},
            **{f"failed_{reason.replace('-', '_')}": count for reason, count in self.failures.items()},
        }

    def summary(self) -> str:
        by_reason = ", ".join(f"{reason} {count}" for reason, count in self.failures.most_common())
        return (
            f"{self.counts['downloaded']} downloaded, {self.counts['present']} already present, "
            f"{self.counts['duplicate']} duplicate, {self.counts['failed']} failed"
            + (f" ({by_reason})" if by_reason else "")
        )


STATUSES = ("downloaded", "present", "duplicate", "failed")


def fetch_url_list(source: str, settings: Settings, destination: Path, report: Path) -> Tally:
    """Download the photos a URL list names into destination/<label>/<url key><ext>, each distinct photo once,
    and write the report (a row per entry); PetpipeError when no photo came of it (the report is written)."""
    entries = read_url_list(source)
    wanted = [entry.url for entry in entries if url_problem(entry.url) is None]
    outcomes = download_all(wanted, url_cache_directory(), settings)
    tally = Tally()
    with atomic_directory(destination) as staging:
        _place_photos(entries, outcomes, staging, tally)
        write_report(report, tally.rows)
        if tally.kept == 0:
            raise PetpipeError(
                f"data.source {source}: none of its {len(entries)} URLs gave a photo "
                f"({tally.summary()}); see {report} for each URL's reason"
            )
    return tally


def url_cache_directory() -> Path:
    """Where the photos of URL lists are kept between runs (beside the archive downloads)."""
    return download_directory() / "url-images"


def _place_photos(entries: list[Entry], outcomes: dict[str, Outcome], staging: Path, tally: Tally) -> None:
    """Copy each entry's photo into staging/<label>/, in list order, so the first of duplicates is the one kept."""
    kept_urls: dict[str, tuple[Entry, str]] = {}  # url -> (its first entry, its file)
    kept_photos: dict[str, tuple[Entry, str]] = {}  # content hash -> (its first entry, its file)
    for entry in entries:
        problem = url_problem(entry.url)
        if problem is not None:
            tally.fail(entry, Failure("refused", problem))
            continue
        if entry.url in kept_urls:
            first, file = kept_urls[entry.url]
            tally.add(entry, "duplicate", file, f"same URL as {first.where}")
            continue
        outcome = outcomes[entry.url]
        if isinstance(outcome, Failure):
            tally.fail(entry, outcome)
            continue
        content = file_digest(outcome.path)
        if content in kept_photos:
            first, file = kept_photos[content]
            tally.add(entry, "duplicate", file, f"same photo as {first.url} ({first.where})")
            continue
        file = f"{entry.label}/{outcome.path.name}"
        (staging / entry.label).mkdir(exist_ok=True)
        shutil.copyfile(outcome.path, staging / file)
        kept_urls[entry.url] = kept_photos[content] = (entry, file)
        tally.add(entry, "downloaded" if outcome.downloaded else "present", file)


def write_report(report: Path, rows: list[dict[str, str]]) -> None:
    """downloads.csv: url,label,status,file,reason (a header alone for a source that is not a URL list)."""
    with atomic_path(report) as temporary, temporary.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
