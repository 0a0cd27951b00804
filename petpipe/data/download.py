"""Downloads: an archive from a URL (http(s) resumed with Range requests, any other fsspec URL), cached at the
project root and verified against data.checksum; what arrives must be an archive, never a login page.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from petpipe.data.archives import is_archive, looks_like_html, read_head
from petpipe.errors import PetpipeError
from petpipe.utils.atomic import display, megabytes, write_refusal
from petpipe.utils.file_formats import file_digest
from petpipe.utils.paths import petpipe_folder

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# A cut connection loses the chunk being read, so stream in small ones: resume then loses at most this.
HTTP_CHUNK_BYTES = 1 << 16
# (connect, read) seconds: fail fast without a network, but let a slow mirror keep streaming.
HTTP_TIMEOUT = (15, 60)
# fsspec protocols whose filesystem lives in an optional package.
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def download_directory() -> Path:
    """Where downloads are cached: outside DVC's outs, so a re-run or `dvc checkout` never re-downloads."""
    return Path(os.environ.get("PETPIPE_DOWNLOAD_DIR") or petpipe_folder() / "downloads")


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
    resumed = _sound_partial(part, url)
    content_type = _keeping_partial(lambda: _download(url, part), url, part)
    _refuse_non_archive(part, url, content_type)
    if checksum is not None:
        if resumed and not _digest_matches(part, checksum):
            # Only the whole file can be checked: a partial one claims to be a prefix of it, nothing more.
            log.warning(
                "warning: %s, resumed from the partial download %s, does not match data.checksum (the "
                "partial file was damaged, or the file changed on the server); downloading it whole again",
                url,
                part,
            )
            part.unlink()
            content_type = _download(url, part)
            _refuse_non_archive(part, url, content_type)
        verify_checksum(part, checksum, delete_on_mismatch=True, described_as=url)
    os.replace(part, target)
    return target


def _keeping_partial(download: Callable[[], str | None], url: str, part: Path) -> str | None:
    """A full disk (or a read-only download folder) in one line; the bytes already downloaded stay for the rerun."""
    try:
        return download()
    except OSError as error:
        refusal = write_refusal(error, part, temporary=part)
        if refusal is None:
            raise
        size = part.stat().st_size if part.is_file() else 0
        kept = (
            f"the {megabytes(size)} of {url} downloaded so far are kept in {display(part)} and the rerun resumes "
            f"from them"
            if size
            else f"nothing of {url} was kept"
        )
        raise refusal.keeping(kept) from None


def _download(url: str, part: Path) -> str | None:
    if urlparse(url).scheme in ("http", "https"):
        return _download_http(url, part)
    return _download_fsspec(url, part)


def _sound_partial(part: Path, url: str) -> bool:
    """Whether a partial download is there to resume: one that does not begin as an archive does (replaced, or
    overwritten from the start) is deleted with a warning, as nothing of it would be kept anyway."""
    if not part.is_file() or part.stat().st_size == 0:
        return False
    try:
        sound = is_archive(part)
    except Exception:  # noqa: BLE001 - a damaged prefix may raise anything from the decompressors
        sound = False
    if not sound:
        log.warning(
            "warning: partial download %s of %s does not begin as an archive does (it begins %r); "
            "downloading it whole again",
            part,
            url,
            read_head(part)[:16],
        )
        part.unlink()
    return sound


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
                log.warning(
                    "warning: partial download %s holds %d bytes, more than the %d of %s; downloading it whole again",
                    part,
                    offset,
                    total,
                    url,
                )
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
    except (requests.ConnectionError, requests.Timeout) as error:  # no DNS, no route, refused, timed out
        raise PetpipeError(download_failed(url, _reason(error), resumable=part.exists(), unreachable=True)) from None
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
            log.warning(
                "warning: partial download %s holds %d bytes, more than the %d of %s; downloading it whole again",
                part,
                offset,
                total,
                url,
            )
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
    with tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None
    ) as bar:
        for chunk in chunks:
            file.write(chunk)
            bar.update(len(chunk))


def download_failed(url: str, reason: str, resumable: bool = False, unreachable: bool = False) -> str:
    """The message for a failed download, in one line: what failed, why, and how to go on without the network."""
    why = ": the network or the server is unreachable" if unreachable else ""
    retry = "Run again to resume the partial download, or, without" if resumable else "Without"
    return (
        f"download of {url} failed ({reason}){why}. {retry} network access, use local photos (a folder or "
        "an archive): dvc exp run -S data.source=/path/to/images -S data.checksum=null (or edit params.yaml)"
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
    head = read_head(part)
    part.unlink()
    if looks_like_html(head, content_type):
        what = "the server sent an HTML page, not an archive (a login or error page?)"
    else:
        what = f"what arrived is not an archive (it begins {head[:16]!r}; petpipe reads tar, gzip, bzip2, xz and zip)"
    raise PetpipeError(
        f"download of {url}: {what}. It was not kept. Check that the URL gives the archive itself (open it in a "
        "browser), or download the archive yourself and point data.source at the file."
    )


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
