"""Get the raw photos named by data.source: download (petpipe/download.py), extract safely
(petpipe/archives.py), or copy a folder (here).

Every way in ends in one folder of untouched image files, swapped into place only when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

from petpipe.archives import extract_archive
from petpipe.atomic import atomic_directory
from petpipe.download import download_archive, download_directory, verify_checksum
from petpipe.errors import PetpipeError
from petpipe.folders import IMAGE_SUFFIXES, count_images, visible_files

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
        "Point data.source at a folder of images, an archive (.tar.gz, .tgz, .tar, .zip) or a URL."
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
        raise PetpipeError(f"data.source {path}: a .url file holds one http(s)/s3/gs URL on a line of its own "
                           f"(lines starting with # are comments); found {urls[:3] or 'none'}")
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
    """"a named pipe", "a socket", ... for a file that is not a regular file (after symlinks); else None."""
    try:
        mode = os.stat(path).st_mode  # never opens it: opening a named pipe would wait for a writer
    except OSError:
        return None  # a dangling or looping symlink: copying it fails with its own error, naming the file
    kinds = {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
             stat.S_IFBLK: "a block device", stat.S_IFDIR: None, stat.S_IFREG: None}
    return kinds.get(stat.S_IFMT(mode), "a special file")
