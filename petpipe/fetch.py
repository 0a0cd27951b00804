"""Get the raw photos named by data.source: download (resumable, verified), extract safely, or copy a folder.

Every way in ends in one folder of untouched image files, swapped into place only when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from petpipe.archive_limits import Budget
from petpipe.atomic import atomic_directory, file_digest
from petpipe.errors import PetpipeError
from petpipe.paths import petpipe_folder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK_BYTES = 1 << 20
# A cut connection loses the chunk being read, so stream in small ones: resume then loses at most this.
HTTP_CHUNK_BYTES = 1 << 16
# (connect, read) seconds: fail fast without a network, but let a slow mirror keep streaming.
HTTP_TIMEOUT = (15, 60)
# fsspec protocols whose filesystem lives in an optional package.
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# Folders that macOS zips and version control add beside the photos.
IGNORED_NAMES = ("__MACOSX",)
# How each archive format petpipe reads begins; tar says "ustar" at byte 257 instead.
ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"PK\x03\x04", b"PK\x05\x06")
TAR_MAGIC_OFFSET = 257


def fetch_source(source: str, checksum: str | None, destination: Path) -> int:
    """Fill destination with the images that source names; return how many image files it holds."""
    if source.startswith("file://"):
        source = unquote(urlparse(source).path)
    if "://" in source:
        archive = download_archive(source, checksum, download_directory())
        return extract_archive(archive, destination)
    path = Path(source).expanduser()
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


def download_directory() -> Path:
    """Where downloads are cached: outside DVC's outs, so a re-run or `dvc checkout` never re-downloads."""
    return Path(os.environ.get("PETPIPE_DOWNLOAD_DIR") or petpipe_folder() / "downloads")


# --- downloads ---------------------------------------------------------------------------------


def download_archive(url: str, checksum: str | None, directory: Path) -> Path:
    """Download url into directory (resuming a partial file) and verify it; reuse a complete, verified copy."""
    target = directory / cache_name(url)
    if target.is_file():
        if not is_archive(target):  # kept by an older petpipe that cached whatever arrived
            log.warning("warning: %s (cached download of %s) is not an archive; downloading again", target, url)
        elif checksum is None or _digest_matches(target, checksum):
            return target
        target.unlink()  # cached for another checksum: the params changed, so fetch again
    part = target.with_name(target.name + ".part")
    directory.mkdir(parents=True, exist_ok=True)
    if urlparse(url).scheme in ("http", "https"):
        content_type = _download_http(url, part)
    else:
        content_type = _download_fsspec(url, part)
    _refuse_non_archive(part, url, content_type)
    if checksum is not None:
        verify_checksum(part, checksum, delete_on_mismatch=True, described_as=url)
    os.replace(part, target)
    return target


def cache_name(url: str) -> str:
    """A file name unique to url that still shows what it is: <sha256 prefix>-<basename>."""
    basename = PurePosixPath(urlparse(url).path).name or "download"
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename)
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{basename}"


def _download_http(url: str, part: Path) -> str | None:
    """Download url into part (resuming it); return the Content-Type the server gave the bytes, if any."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        with _http_get(url, offset) as response:
            if response.status_code == 416 and offset:
                # Range Not Satisfiable: the partial file already holds every byte, unless the server says otherwise.
                total = _content_range_total(response)
                if total is None or total == offset:
                    return None
                part.unlink()
                return _download_http(url, part)
            response.raise_for_status()
            if offset and response.status_code == 206 and _content_range_start(response) != offset:
                part.unlink()  # a range we did not ask for: start over rather than splice wrong bytes
                return _download_http(url, part)
            if response.status_code != 206:
                offset = 0  # the server ignored the Range header and sends everything again
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            content_type = response.headers.get("Content-Type")
            with part.open("ab" if offset else "wb") as file:
                file.truncate(offset)
                _copy_with_progress(response.iter_content(HTTP_CHUNK_BYTES), file, offset, total, url)
    except requests.HTTPError as error:
        raise PetpipeError(download_failed(url, f"HTTP {error.response.status_code} {error.response.reason}")) from None
    except requests.RequestException as error:
        raise PetpipeError(download_failed(url, _reason(error), resumable=part.exists())) from None
    if total is not None and part.stat().st_size != total:
        reason = f"got {part.stat().st_size} of {total} bytes"
        raise PetpipeError(download_failed(url, reason, resumable=True))
    return content_type


def _http_get(url: str, offset: int) -> requests.Response:
    # identity: a server must not re-compress the archive, so the bytes on disk are the bytes checksummed.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return requests.get(url, headers=headers, stream=True, timeout=HTTP_TIMEOUT)


def _content_range_start(response: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _content_range_total(response: requests.Response) -> int | None:
    match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _download_fsspec(url: str, part: Path) -> None:
    """Download url into part (resuming it) through fsspec, which tells no content type."""
    filesystem, path = _fsspec_filesystem(url)
    offset = part.stat().st_size if part.exists() else 0
    # Backends raise their own exception types (botocore, google-auth, ...), so catch broadly here only.
    try:
        total = filesystem.size(path)
        if offset > total:
            offset = 0
        with filesystem.open(path, "rb") as remote, part.open("ab" if offset else "wb") as file:
            file.truncate(offset)
            remote.seek(offset)
            chunks = iter(lambda: remote.read(CHUNK_BYTES), b"")
            _copy_with_progress(chunks, file, offset, total, url)
    except Exception as error:  # noqa: BLE001
        raise PetpipeError(download_failed(url, _reason(error), resumable=part.exists())) from None
    if total is not None and part.stat().st_size != total:
        raise PetpipeError(download_failed(url, f"got {part.stat().st_size} of {total} bytes", resumable=True))


def _fsspec_filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = FSSPEC_PACKAGES.get(protocol, f"the fsspec implementation for {protocol}://")
        raise PetpipeError(f"data.source {url}: reading {protocol}:// needs {package}; pip install {package}") from None
    except ValueError as error:
        raise PetpipeError(
            f"data.source {url}: unsupported URL ({error}); use http(s)://, s3://, gs://, a local archive or a folder"
        ) from None


def _copy_with_progress(chunks: Any, file: IO[bytes], offset: int, total: int | None, url: str) -> None:
    name = PurePosixPath(urlparse(url).path).name or url
    # disable=None: a bar on a terminal, silence in logs and tests.
    with tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
              disable=None) as bar:
        for chunk in chunks:
            file.write(chunk)
            bar.update(len(chunk))


def download_failed(url: str, reason: str, resumable: bool = False) -> str:
    """The message for a failed download: what failed, why, and how to go on without the network."""
    retry = "Run again to resume the partial download, or, without" if resumable else "Without"
    return (
        f"download of {url} failed ({reason}).\n"
        f"{retry} network access, point data.source at a local folder of images or an archive:\n"
        "  dvc exp run -S data.source=/path/to/images   (or edit data.source in params.yaml)"
    )


def _reason(error: BaseException) -> str:
    text = str(error)
    # requests wraps the useful part ("[Errno 111] Connection refused") in three layers of pool reprs.
    errno_text = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno_text:
        return errno_text.group(0).strip()
    if isinstance(error, requests.Timeout):
        return "timed out"
    return f"{type(error).__name__}: {text}"[:300]


def _refuse_non_archive(part: Path, url: str, content_type: str | None) -> None:
    """Delete what arrived unless it is an archive, so a login or error page is never cached as one."""
    if is_archive(part):
        return
    head = _head(part)
    part.unlink()
    if _looks_like_html(head, content_type):
        what = "the server sent an HTML page, not an archive (a login or error page?)"
    else:
        what = f"what arrived is not an archive (it begins {head[:16]!r}; petpipe reads tar, gzip, bzip2, xz and zip)"
    raise PetpipeError(
        f"download of {url}: {what}. It was not kept. Check that the URL gives the archive itself (open it in a "
        "browser), or download the archive yourself and point data.source at the file."
    )


def is_archive(path: Path) -> bool:
    """Whether path begins as a tar, gzip, bzip2, xz or zip file does (zip also when a prefix precedes it)."""
    head = _head(path)
    if head.startswith(ARCHIVE_MAGIC) or head[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + 5] == b"ustar":
        return True
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)  # a self-extracting zip, a pre-POSIX tar


def _head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(512)


def _looks_like_html(head: bytes, content_type: str | None = None) -> bool:
    if content_type and content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<") and (b"<html" in text or b"<!doctype html" in text)


# --- checksums ---------------------------------------------------------------------------------


def _digest_matches(path: Path, checksum: str) -> bool:
    algorithm, expected = checksum.split(":", 1)
    return file_digest(path, algorithm) == expected.lower()


def verify_checksum(path: Path, checksum: str, delete_on_mismatch: bool, described_as: str | None = None) -> None:
    """Raise PetpipeError unless path's digest is checksum ("md5:<hex>"); optionally delete a bad download."""
    algorithm, expected = checksum.split(":", 1)
    actual = file_digest(path, algorithm)
    if actual == expected.lower():
        return
    if delete_on_mismatch:
        path.unlink()
    what = described_as or str(path)
    deleted = " The download was deleted." if delete_on_mismatch else ""
    raise PetpipeError(
        f"checksum mismatch for {what}: expected {algorithm}:{expected.lower()}, got {algorithm}:{actual}.{deleted} "
        f"If the source changed on purpose, set data.checksum to {algorithm}:{actual} (or null)."
    )


# --- local folders -----------------------------------------------------------------------------


def copy_folder(source: Path, destination: Path) -> int:
    """Copy every visible file under source, keeping sub-folders (labels may be folder names); source is untouched."""
    _refuse_overlap(source, destination)
    with atomic_directory(destination) as staging:
        for relative in _visible_files(source):
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


def _visible_files(root: Path) -> Iterator[Path]:
    """Relative paths of files under root, skipping hidden files and folders (.DS_Store, .git, ...)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not _hidden(name))
        for name in sorted(files):
            if not _hidden(name):
                yield (Path(folder) / name).relative_to(root)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def count_images(root: Path) -> int:
    """Image files under root, by extension (os.walk: never loops through a symlinked folder)."""
    return sum(
        1
        for folder, _, files in os.walk(root)
        for name in files
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(folder) / name).is_file()
    )


# --- archives ----------------------------------------------------------------------------------


def extract_archive(archive: Path, destination: Path) -> int:
    """Extract a tar (plain, gz, bz2, xz) or zip archive safely; strip a single top-level folder."""
    with atomic_directory(destination) as staging:
        try:
            _extract_any(archive, staging)
        except getattr(tarfile, "FilterError", ()) as error:
            raise PetpipeError(_unsafe(archive, error.tarinfo.name, str(error))) from None
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError) as error:
            raise PetpipeError(f"archive {archive} is damaged ({_first_line(error)}); delete it and fetch again") from None
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
    if _looks_like_html(_head(archive)):
        raise PetpipeError(f"data.source {archive} is an HTML page, not an archive (a login or error page saved "
                           "in its place?); download the archive itself")
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
    root = os.path.realpath(staging)
    # Python's own "data" filter (3.11.4+) is a second line of defence behind the checks below.
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {"set_attrs": False}
    with tarfile.open(archive, "r:*") as tar:
        # Iterating (not getmembers()) reads a compressed archive once, front to back.
        for member in tar:
            relative = _safe_relative(archive, member.name)
            if _skipped(relative):
                continue
            target = staging / relative
            if member.isdir():
                _check_inside(archive, member.name, root, target)
                target.mkdir(parents=True, exist_ok=True)
                continue
            _check_tar_member(archive, member, root, staging, relative)
            if member.isreg():
                # tar states no compressed size per member; tarfile writes exactly the declared size.
                budget.admit(member.name, member.size)
            tar.extract(member, staging, **extra)


def _check_tar_member(archive: Path, member: tarfile.TarInfo, root: str, staging: Path,
                      relative: PurePosixPath) -> None:
    target = staging / relative
    if member.issym():
        _check_inside(archive, member.name, root, target.parent)
        if os.path.isabs(member.linkname):
            raise PetpipeError(_unsafe(archive, member.name, f"is a symlink to an absolute path ({member.linkname})"))
        _check_link_target(archive, member, root, target.parent / member.linkname)
    elif member.islnk():
        _check_inside(archive, member.name, root, target)
        why = _unsafe_name(member.linkname)
        if why:
            raise PetpipeError(_unsafe(archive, member.name, f"is a hard link to {member.linkname}, which {why}"))
        _check_link_target(archive, member, root, staging / _relative(member.linkname))
    elif member.isreg():
        _check_inside(archive, member.name, root, target)
    else:
        raise PetpipeError(_unsafe(archive, member.name, "is a device, fifo or other special file"))


def _check_link_target(archive: Path, member: tarfile.TarInfo, root: str, target: Path) -> None:
    if not _is_inside(root, target):
        raise PetpipeError(_unsafe(archive, member.name, f"links to {member.linkname}, outside the output folder"))


def _extract_zip(archive: Path, staging: Path, budget: Budget) -> None:
    root = os.path.realpath(staging)
    with zipfile.ZipFile(archive) as zipped:
        # The central directory declares every size up front: refuse a bomb before writing anything.
        for info in zipped.infolist():
            if not info.is_dir() and not _skipped(_relative(info.filename)):
                budget.admit(info.filename, info.file_size, info.compress_size)
        for info in zipped.infolist():
            relative = _safe_relative(archive, info.filename)
            if _skipped(relative):
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


def _extract_zip_symlink(archive: Path, zipped: zipfile.ZipFile, info: zipfile.ZipInfo, root: str,
                         target: Path) -> None:
    # zipfile would write the link as a small text file; make the real link, if it stays inside.
    linkname = zipped.read(info).decode("utf-8")
    _check_inside(archive, info.filename, root, target.parent)
    if os.path.isabs(linkname) or not _is_inside(root, target.parent / linkname):
        raise PetpipeError(_unsafe(archive, info.filename, f"links to {linkname}, outside the output folder"))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(linkname, target)


def _safe_relative(archive: Path, name: str) -> PurePosixPath:
    """A member name as a relative path, refused if absolute or climbing out with '..'."""
    why = _unsafe_name(name)
    if why:
        raise PetpipeError(_unsafe(archive, name, why))
    return _relative(name)


def _unsafe_name(name: str) -> str | None:
    normalized = name.replace("\\", "/")  # archives made on Windows use backslashes
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return "is an absolute path"
    if ".." in normalized.split("/"):
        return "climbs out of the output folder with '..'"
    return None


def _relative(name: str) -> PurePosixPath:
    return PurePosixPath(*(part for part in name.replace("\\", "/").split("/") if part not in ("", ".")))


def _skipped(relative: PurePosixPath) -> bool:
    # Hidden files and macOS resource forks are not photos; a local folder copy skips them too.
    return not relative.parts or any(_hidden(part) for part in relative.parts)


def _check_inside(archive: Path, name: str, root: str, path: Path) -> None:
    # Resolves links already extracted, so a member cannot write through an earlier symlink.
    if not _is_inside(root, path):
        raise PetpipeError(_unsafe(archive, name, "would be written outside the output folder"))


def _is_inside(root: str, path: Path | str) -> bool:
    resolved = os.path.realpath(path)
    return resolved == root or resolved.startswith(root + os.sep)


def _refuse_escaping_symlinks(archive: Path, staging: Path) -> None:
    # A link that was safe when made can point outside once a later link changes a folder on its path.
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
        f"refusing to extract {archive}: member {member!r} {why}. "
        "The archive may be malicious; nothing was extracted."
    )
