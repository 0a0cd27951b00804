"""Download the photos of a URL list (petpipe/data/url_lists.py) into a cache shared by every run, the way a real
image-search list needs: N at a time, every request bounded in time and bytes, one retry for what may pass,
and nothing kept that does not decode as an image.

The cache (<download dir>/url-images/<aa>/<sha256(url)[:16]>.<ext>, ext from the decoded format) holds only
complete, verified photos, each renamed into place: a killed fetch loses at most the downloads in flight, and
the next run asks only for what the cache lacks. Failures are not cached: the next run asks again (a dead
link costs one request; a server that never answers costs the timeout, twice).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from petpipe.data.archives import looks_like_html
from petpipe.utils.atomic import atomic_path

# A redirect loop, or a chain no image host needs, ends here.
MAX_REDIRECTS = 5
# Back-off before the one retry of a transient failure, with jitter so N workers do not return in step;
# a Retry-After of the server is honoured up to RETRY_AFTER_CAP_S.
RETRY_BACKOFF_S = 1.0
RETRY_AFTER_CAP_S = 10.0
# Statuses that may pass on a second try: timeouts, rate limits, overloaded or restarting servers.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 16
# Decoded size petpipe accepts (as petpipe/data/pixels.py): a few kilobytes can claim billions of pixels.
MAX_PIXELS = 128_000_000
# What Pillow calls the formats kept, and the extension each gets (index-labels reads these).
FORMAT_SUFFIXES = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tiff",
}
HEADERS = {
    "User-Agent": "petpipe (fetch of a data.source URL list)",
    "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
}


@dataclass(frozen=True)
class Settings:
    """data.download_workers, data.download_timeout (seconds, the whole request) and the size cap in bytes."""

    workers: int
    timeout: float
    max_bytes: int


@dataclass(frozen=True)
class Failure:
    """Why a URL gave no photo: `reason` a short key for counting (http-404, timeout, ...), `detail` the rest."""

    reason: str
    detail: str
    transient: bool = False
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class Got:
    """A URL's photo in the cache; `downloaded` says whether this run fetched it (else the cache had it)."""

    path: Path
    downloaded: bool


Outcome = Got | Failure


def url_key(url: str) -> str:
    """The stable name of url's photo: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def cached_photos(cache: Path) -> dict[str, Path]:
    """url_key -> the photo the cache holds for it (temporary files of writers are hidden, so never listed)."""
    return {path.stem: path for path in cache.glob("??/*") if not path.name.startswith(".") and path.is_file()}


def download_all(urls: Iterable[str], cache: Path, settings: Settings) -> dict[str, Outcome]:
    """Every URL's outcome: the cached photo when there is one, else a download (N at a time) or its failure."""
    cached = cached_photos(cache)
    outcomes: dict[str, Outcome] = {}
    missing = []
    for url in dict.fromkeys(urls):
        hit = cached.get(url_key(url))
        if hit is not None:
            outcomes[url] = Got(hit, downloaded=False)
        else:
            missing.append(url)
    if not missing:
        return outcomes
    sessions = _Sessions()
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="download")
    try:
        with tqdm(total=len(missing), unit="url", desc="downloading", disable=None) as bar:
            futures = {pool.submit(_download_one, sessions, url, cache, settings): url for url in missing}
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                bar.update()
    finally:
        # Ctrl-C or an error: drop the queued URLs; those in flight end within their timeout.
        pool.shutdown(wait=True, cancel_futures=True)
        sessions.close()
    return outcomes


class _Sessions:
    """A requests.Session per download thread (sessions are not shared between threads; each reuses its
    connections per host), all closed at the end."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._opened: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _new_session()
            with self._lock:
                self._opened.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._opened:
                session.close()


def _new_session() -> requests.Session:
    """A session that follows at most MAX_REDIRECTS redirects, and whose connection pools hand each
    connection to the thread's watchdog."""
    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    session.headers.update(HEADERS)
    adapter = HTTPAdapter()
    adapter.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --- the whole-request deadline ------------------------------------------------------------------------------

_CURRENT = threading.local()  # the watchdog of the attempt the thread runs now


class _Watchdog:
    """Cuts one attempt when data.download_timeout has passed since it began, wherever it waits: it shuts down
    the sockets of the connections the attempt took, so a server that sends its headers or its body a byte at a
    time, or a chain of slow redirects, ends then (requests' own timeout bounds each wait, not the whole)."""

    RECHECK_S = 0.1  # after expiry, how often a connection still being opened is looked at again

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        _CURRENT.watchdog = self
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        _CURRENT.watchdog = None
        with self._lock:
            self._done = True
            self._timer.cancel()

    def watch(self, connection: Any) -> None:
        with self._lock:
            self._connections.append(connection)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            unopened = [connection for connection in self._connections if not _shut_down(connection)]
            if unopened or not self._connections:  # still connecting: its socket appears within the connect timeout
                self._timer = threading.Timer(self.RECHECK_S, self._expire)
                self._timer.daemon = True
                self._timer.start()


def _shut_down(connection: Any) -> bool:
    """Shut a connection's socket down (a thread blocked reading it wakes at once); False when it has none yet."""
    sock = getattr(connection, "sock", None)
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return True


class _Watched:
    """A urllib3 pool that hands every connection it gives out to the thread's current watchdog."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        connection = super()._get_conn(timeout)  # type: ignore[misc]
        watchdog = getattr(_CURRENT, "watchdog", None)
        if watchdog is not None:
            watchdog.watch(connection)
        return connection


class _WatchedHTTPPool(_Watched, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_Watched, HTTPSConnectionPool):
    pass


def _download_one(sessions: _Sessions, url: str, cache: Path, settings: Settings) -> Outcome:
    """Download, verify and cache one URL, retrying once after a transient failure."""
    result = _attempt(sessions.get(), url, settings)
    if isinstance(result, Failure) and result.transient:
        pause = RETRY_BACKOFF_S * (1 + random.random())
        if result.retry_after is not None:
            pause = max(pause, min(result.retry_after, RETRY_AFTER_CAP_S))
        time.sleep(pause)
        result = _attempt(sessions.get(), url, settings)
    if isinstance(result, Failure):
        return result
    data, suffix = result
    key = url_key(url)
    target = cache / key[:2] / f"{key}{suffix}"
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
    return Got(target, downloaded=True)


def _attempt(session: requests.Session, url: str, settings: Settings) -> tuple[bytes, str] | Failure:
    """One GET of url, cut when its time is up: its bytes and image extension, or why not."""
    with _Watchdog(settings.timeout) as watchdog:
        result = _get(session, url, settings)
    if watchdog.expired:
        session.close()  # its sockets may be shut down: open fresh ones for the next URL
        if not isinstance(result, Failure) or result.reason == "connection":
            # what a socket shut down mid-answer looks like: an early end of the body, or a broken connection
            return Failure("timeout", f"not complete within {settings.timeout:g} s", transient=True)
    return result if isinstance(result, Failure) else _identify(*result)


def _get(session: requests.Session, url: str, settings: Settings) -> tuple[bytes, str | None] | Failure:
    """The body of url and its Content-Type, or why not."""
    deadline = time.monotonic() + settings.timeout
    try:
        with session.get(url, stream=True, timeout=settings.timeout) as response:
            if response.status_code >= 400:
                return _http_failure(response)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > settings.max_bytes:
                return Failure("too-large", f"{int(length)} bytes announced, over data.download_max_mb")
            data = _read_capped(response, settings, deadline)
            if isinstance(data, Failure):
                return data
            content_type = response.headers.get("Content-Type")
    except requests.TooManyRedirects:
        return Failure("too-many-redirects", f"more than {MAX_REDIRECTS} redirects (a loop?)")
    except requests.Timeout:
        return Failure("timeout", f"no answer within {settings.timeout:g} s", transient=True)
    except (
        requests.exceptions.InvalidSchema,
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
    ) as error:  # e.g. a redirect to ftp:// or file://
        return Failure("bad-url", _first_line(error))
    except requests.ConnectionError as error:
        return Failure("connection", _connection_reason(error), transient=True)
    except requests.RequestException as error:
        return Failure("connection", _first_line(error), transient=True)
    return data, content_type


def _read_capped(response: requests.Response, settings: Settings, deadline: float) -> bytes | Failure:
    """The body, cut at max_bytes and at the deadline. read1 returns what has arrived, so the clock is looked at
    between small reads; a read that waits past the deadline is woken by the watchdog."""
    raw = response.raw
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Failure(
                "timeout", f"not complete within {settings.timeout:g} s ({len(buffer)} bytes arrived)", transient=True
            )
        chunk = raw.read1(CHUNK_BYTES, decode_content=True)
        if not chunk:
            return bytes(buffer)
        buffer += chunk
        if len(buffer) > settings.max_bytes:
            return Failure("too-large", f"over {settings.max_bytes} bytes (data.download_max_mb)")


def _identify(data: bytes, content_type: str | None) -> tuple[bytes, str] | Failure:
    """Decode the whole image (the Content-Type is never trusted): its extension, or why it is no photo."""
    if not data:
        return Failure("empty", "the server sent no bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return Failure("too-large", f"{image.width}x{image.height} pixels, over {MAX_PIXELS}")
            image_format = image.format
            image.load()
    except Image.DecompressionBombError as error:  # over twice Pillow's own pixel limit
        return Failure("too-large", _first_line(error))
    except UnidentifiedImageError:
        if looks_like_html(data[:512], content_type):
            return Failure("html-page", "the server sent an HTML page, not an image")
        return Failure(
            "not-an-image", f"cannot identify an image in it ({content_type or 'no Content-Type'}, begins {data[:8]!r})"
        )
    except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
        return Failure("truncated", f"does not decode: {_first_line(error)}")
    suffix = FORMAT_SUFFIXES.get(image_format or "")
    if suffix is None:
        return Failure(
            "unsupported-format",
            f"a {image_format} image; petpipe keeps {', '.join(sorted(set(FORMAT_SUFFIXES) - {'MPO'}))}",
        )
    return data, suffix


def _http_failure(response: requests.Response) -> Failure:
    status = response.status_code
    retry_after = response.headers.get("Retry-After", "")
    return Failure(
        f"http-{status}",
        response.reason or "error",
        transient=status in TRANSIENT_STATUSES,
        retry_after=float(retry_after) if retry_after.isdigit() else None,
    )


def _connection_reason(error: BaseException) -> str:
    text = str(error)
    for known in (
        "Connection refused",
        "Name or service not known",
        "Temporary failure in name resolution",
        "No route to host",
        "Connection reset by peer",
        "Network is unreachable",
        "RemoteDisconnected",
    ):
        if known in text:
            return known
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]
