"""Archives: recognise one (tar, gzip, bzip2, xz, zip) and extract it safely into a folder of photos.

Tar members go through Python's own `data` extraction filter (PEP 706), which refuses names and links that
leave the folder and special files; zip has no such filter, so its entries are checked here. Both formats
keep to the size budget of petpipe/data/archive_limits.py and skip the junk of petpipe/data/folders.py.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from petpipe.data.archive_limits import Budget
from petpipe.data.folders import IMAGE_SUFFIXES, count_images, in_junk
from petpipe.errors import PetpipeError
from petpipe.utils.atomic import atomic_directory

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# How each archive format petpipe reads begins; tar says "ustar" at byte 257 instead.
ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"PK\x03\x04", b"PK\x05\x06")
TAR_MAGIC_OFFSET = 257
# What each refusal of tarfile's data filter means, in this module's words ({linkname}: the member's link).
# Keyed by class name: a Python whose tarfile predates the filter has none of these classes.
TAR_FILTER_REFUSALS = {
    "AbsolutePathError": "is an absolute path",
    "OutsideDestinationError": "would be written outside the output folder",
    "SpecialFileError": "is a device, fifo or other special file",
    "AbsoluteLinkError": "links to an absolute path ({linkname})",
    "LinkOutsideDestinationError": "links to {linkname}, outside the output folder",
}


# --- recognising archives ----------------------------------------------------------------------


def is_archive(path: Path) -> bool:
    """Whether path begins as a tar, gzip, bzip2, xz or zip file does (zip also when a prefix precedes it)."""
    head = read_head(path)
    if head.startswith(ARCHIVE_MAGIC) or head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar":
        return True
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)  # a self-extracting zip, a pre-POSIX tar


def read_head(path: Path) -> bytes:
    """The first 512 bytes: enough for every format's magic, tar's included."""
    with path.open("rb") as file:
        return file.read(512)


def looks_like_html(head: bytes, content_type: str | None = None) -> bool:
    """Whether a file that begins with `head` (and was served as content_type) is a web page."""
    if content_type and content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<") and (b"<html" in text or b"<!doctype html" in text)


# --- extracting --------------------------------------------------------------------------------


def extract_archive(archive: Path, destination: Path) -> int:
    """Extract a tar (plain, gz, bz2, xz) or zip archive safely; strip a single top-level folder."""
    with atomic_directory(destination) as staging:
        try:
            _extract_any(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError) as error:
            raise PetpipeError(
                f"archive {archive} is damaged ({_first_line(error)}); delete it and fetch again"
            ) from None
        _strip_single_top_folder(staging)
        _refuse_escaping_symlinks(archive, staging)
        count = count_images(staging)
        if count == 0:
            raise PetpipeError(f"archive {archive} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return count


def _first_line(error: BaseException) -> str:
    # tarfile's "file could not be opened successfully:" is followed by one line per compression it tried.
    text = str(error).strip()
    if text.startswith("file could not be opened successfully"):
        return "not a tar archive, compressed or not"
    return text.splitlines()[0] if text else type(error).__name__


def _extract_any(archive: Path, staging: Path) -> None:
    if looks_like_html(read_head(archive)):
        raise PetpipeError(
            f"data.source {archive} is an HTML page, not an archive (a login or error page saved "
            "in its place?); download the archive itself"
        )
    budget = Budget.for_archive(archive, staging)
    # Trust the name first: a plain tar that contains a zip can look like a zip to is_zipfile.
    name = archive.name.lower()
    if name.endswith(".zip"):
        _extract_zip(archive, staging, budget)
    elif name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(archive):
        _extract_tar(archive, staging, budget)
    elif zipfile.is_zipfile(archive):
        _extract_zip(archive, staging, budget)
    else:
        raise PetpipeError(f"data.source {archive}: not a folder, a tar archive (.tar.gz, .tgz, .tar) or a zip archive")


def _extract_tar(archive: Path, staging: Path, budget: Budget) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise PetpipeError(
            f"refusing to extract {archive}: this Python's tarfile has no data filter, which petpipe "
            "relies on to extract tar archives safely; use Python 3.10.12, 3.11.4 or newer, or extract "
            "the archive yourself and point data.source at the folder"
        )
    with tarfile.open(archive, "r:*") as tar:
        # extractall iterates the archive (not getmembers()), so a compressed one is read once, front to back.
        tar.extractall(staging, filter=_tar_filter(archive, budget))


def _tar_filter(archive: Path, budget: Budget) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """tarfile's data filter, refusing in petpipe's words, then skipping junk and keeping to the budget."""
    # A hard link to a member skipped as junk is written as a copy of it (tarfile finds its bytes in the archive).
    skipped_sizes: dict[str, int] = {}

    def admit(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        # The data filter strips a leading '/' and extracts the rest; an archive of photos naming one is crafted.
        if _is_absolute(member.name):
            raise PetpipeError(_unsafe(archive, member.name, "is an absolute path"))
        try:
            member = tarfile.data_filter(member, destination)
        except tarfile.FilterError as error:
            why = TAR_FILTER_REFUSALS.get(type(error).__name__, "{error}")
            raise PetpipeError(
                _unsafe(archive, error.tarinfo.name, why.format(linkname=error.tarinfo.linkname, error=error))
            ) from None
        if in_junk(_relative(member.name)):
            if member.isreg():
                skipped_sizes[os.path.normpath(member.name)] = member.size
            return None
        if member.isreg():
            # tar states no compressed size per member; tarfile writes exactly the declared size.
            budget.admit(member.name, member.size)
        elif member.islnk() and os.path.normpath(member.linkname) in skipped_sizes:
            budget.admit(member.name, skipped_sizes[os.path.normpath(member.linkname)])
        return member

    return admit


def _extract_zip(archive: Path, staging: Path, budget: Budget) -> None:
    root = os.path.realpath(staging)
    with zipfile.ZipFile(archive) as zipped:
        # The central directory declares every size up front: refuse a bomb before writing anything.
        for info in zipped.infolist():
            if not info.is_dir() and not in_junk(_relative(info.filename)):
                budget.admit(info.filename, info.file_size, info.compress_size)
        for info in zipped.infolist():
            relative = _safe_relative(archive, info.filename)
            if in_junk(relative):
                continue
            target = staging / relative
            kind = stat.S_IFMT(info.external_attr >> 16)  # unix file type, when the zip was made on unix
            if kind == stat.S_IFLNK:
                _extract_zip_symlink(archive, zipped, info, root, target)
            elif info.is_dir():
                _check_inside(archive, info.filename, root, target)
                target.mkdir(parents=True, exist_ok=True)
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise PetpipeError(_unsafe(archive, info.filename, "is a device, fifo or other special file"))
            else:
                _check_inside(archive, info.filename, root, target)
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract_zip_file(zipped, info, target, budget)


def _extract_zip_file(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: Budget) -> None:
    try:
        with zipped.open(info) as source, target.open("wb") as file:
            budget.copy_entry(info.filename, source, file, declared=info.file_size)
    except zipfile.BadZipFile as error:
        if "CRC" not in str(error):
            raise
        # zipfile stops an entry at its declared size, so one that inflates further fails its CRC here.
        raise PetpipeError(
            f"refusing to extract {budget.archive}: entry {info.filename!r} does not hold the {info.file_size:,} "
            f"bytes its header declares ({error}): the archive is damaged, or crafted to hide its size. "
            "Nothing was extracted; if it was downloaded, delete it and fetch again."
        ) from None


def _extract_zip_symlink(
    archive: Path, zipped: zipfile.ZipFile, info: zipfile.ZipInfo, root: str, target: Path
) -> None:
    # zipfile would write the link as a small text file; make the real link, if it stays inside.
    linkname = zipped.read(info).decode("utf-8")
    _check_inside(archive, info.filename, root, target.parent)
    if os.path.isabs(linkname) or not _is_inside(root, target.parent / linkname):
        raise PetpipeError(_unsafe(archive, info.filename, f"links to {linkname}, outside the output folder"))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(linkname, target)


def _safe_relative(archive: Path, name: str) -> PurePosixPath:
    """A zip entry's name as a relative path, refused if absolute or climbing out with '..'."""
    if _is_absolute(name):
        raise PetpipeError(_unsafe(archive, name, "is an absolute path"))
    if ".." in name.replace("\\", "/").split("/"):
        raise PetpipeError(_unsafe(archive, name, "climbs out of the output folder with '..'"))
    return _relative(name)


def _is_absolute(name: str) -> bool:
    normalized = name.replace("\\", "/")  # archives made on Windows use backslashes
    return normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) is not None


def _relative(name: str) -> PurePosixPath:
    return PurePosixPath(*(part for part in name.replace("\\", "/").split("/") if part not in ("", ".")))


def _check_inside(archive: Path, name: str, root: str, path: Path) -> None:
    # Resolves links already extracted, so an entry cannot write through an earlier symlink.
    if not _is_inside(root, path):
        raise PetpipeError(_unsafe(archive, name, "would be written outside the output folder"))


def _is_inside(root: str, path: Path | str) -> bool:
    resolved = os.path.realpath(path)
    return resolved == root or resolved.startswith(root + os.sep)


def _refuse_escaping_symlinks(archive: Path, staging: Path) -> None:
    # A link that was safe when made can point outside once a later link changes a folder on its path; the data
    # filter judges each member as it is written, so the finished tree is checked too (tar and zip alike).
    root = os.path.realpath(staging)
    for folder, subfolders, files in os.walk(staging):
        for name in subfolders + files:
            path = Path(folder) / name
            if path.is_symlink() and not _is_inside(root, path):
                member = path.relative_to(staging).as_posix()
                raise PetpipeError(_unsafe(archive, member, f"links to {os.readlink(path)}, outside the output folder"))


def _strip_single_top_folder(staging: Path) -> None:
    """images/<files> -> <files>: the output holds the photos themselves, as the tutorial's path does."""
    entries = list(staging.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return
    # Rename first so a child named like the top folder cannot collide with it.
    top = entries[0].rename(staging / ".petpipe-top-folder")
    for child in top.iterdir():
        os.replace(child, staging / child.name)
    top.rmdir()


def _unsafe(archive: Path, member: str, why: str) -> str:
    return (
        f"refusing to extract {archive}: member {member!r} {why}. The archive may be malicious; nothing was extracted."
    )
