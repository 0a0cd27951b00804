"""fetch: real photos from a folder, archives, a local HTTP server and fsspec; hostile archives refused."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import importlib.util
import io
import logging
import os
import shutil
import socket
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import default_params, params_with, serving
from petpipe.cli import main
from petpipe.data.download import cache_name
from petpipe.data.sources import fetch_source
from petpipe.errors import PetpipeError
from petpipe.stages import fetch as fetch_stage

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro

ARCHIVE_PHOTOS = 20


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path, as dvc runs in the project: relative paths and the download cache land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PETPIPE_DOWNLOAD_DIR", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def photos(sample_images: Path) -> list[Path]:
    return sorted(sample_images.glob("*.jpg"))[:ARCHIVE_PHOTOS]


def make_tarball(photos: list[Path], mode: str = "w:gz") -> bytes:
    """A tarball of photos inside one top folder, as the Oxford-IIIT Pet images.tar.gz is laid out."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for photo in photos:
            tar.add(photo, arcname=f"images/{photo.name}")
    return buffer.getvalue()


def make_zip(photos: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for photo in photos:
            zipped.write(photo, f"images/{photo.name}")
    return buffer.getvalue()


def assert_same_photos(output: Path, photos: list[Path]) -> None:
    assert sorted(path.name for path in output.iterdir()) == sorted(photo.name for photo in photos)
    for photo in photos:
        assert (output / photo.name).read_bytes() == photo.read_bytes()


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


# --- local folders and archives ------------------------------------------------------------------


def test_local_folder_copies_every_photo_untouched(in_tmp: Path, sample_images: Path) -> None:
    before = sorted((path.name, path.stat().st_mtime_ns) for path in sample_images.iterdir())
    output = in_tmp / "stages/fetch/images"

    assert fetch_source(str(sample_images), None, output) == 370

    assert_same_photos(output, sorted(sample_images.glob("*.jpg")))
    assert sorted((path.name, path.stat().st_mtime_ns) for path in sample_images.iterdir()) == before


def test_local_folder_keeps_subfolders_skips_hidden_and_is_relative_to_cwd(in_tmp: Path, photos: list[Path]) -> None:
    source = in_tmp / "photos"
    for folder, photo in [("cat", photos[0]), ("dog", photos[1]), (".thumbnails", photos[2])]:
        (source / folder).mkdir(parents=True, exist_ok=True)
        (source / folder / photo.name).write_bytes(photo.read_bytes())
    (source / ".DS_Store").write_bytes(b"finder")

    assert fetch_source("photos", None, Path("out")) == 2

    copied = sorted(path.relative_to(in_tmp / "out").as_posix() for path in (in_tmp / "out").rglob("*"))
    assert copied == ["cat", f"cat/{photos[0].name}", "dog", f"dog/{photos[1].name}"]


@pytest.mark.parametrize(
    "name, make",
    [("pets.tar.gz", make_tarball), ("pets.tar", lambda photos: make_tarball(photos, "w")), ("pets.zip", make_zip)],
)
def test_local_archive_is_extracted_without_its_top_folder(in_tmp: Path, photos: list[Path], name, make) -> None:
    data = make(photos)
    (in_tmp / name).write_bytes(data)

    assert fetch_source(name, md5(data), in_tmp / "images") == ARCHIVE_PHOTOS

    assert_same_photos(in_tmp / "images", photos)


def test_fetch_replaces_an_earlier_output(in_tmp: Path, photos: list[Path]) -> None:
    output = in_tmp / "images"
    output.mkdir()
    (output / "stale.jpg").write_bytes(b"old")
    (in_tmp / "pets.tar.gz").write_bytes(make_tarball(photos))

    fetch_source("pets.tar.gz", None, output)

    assert_same_photos(output, photos)
    assert [path.name for path in in_tmp.iterdir() if path.name.startswith(".")] == []


def test_cli_fetches_an_archive_named_in_params_yaml(in_tmp: Path, photos: list[Path]) -> None:
    (in_tmp / "pets.tgz").write_bytes(make_tarball(photos))
    params = {**default_params(), "data": {**default_params()["data"], "source": "pets.tgz", "checksum": None}}
    params_file = in_tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = in_tmp / "stages/fetch/images"

    result = CliRunner().invoke(main, ["fetch", "--params", str(params_file), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert f"fetched {ARCHIVE_PHOTOS} images into {out}" in result.output
    assert_same_photos(out, photos)


def test_stage_run_returns_a_summary(in_tmp: Path, sample_images: Path) -> None:
    params = params_with({"data.source": str(sample_images), "data.checksum": None})
    outputs = fetch_stage.Outputs(images=Path("stages/fetch/images"))

    summary = fetch_stage.run(params, fetch_stage.Inputs(), outputs)

    assert summary == "fetched 370 images into stages/fetch/images"


@pytest.mark.parametrize("source", ["no/such/folder", "missing.tar.gz"])
def test_missing_local_source_is_refused(in_tmp: Path, source: str) -> None:
    with pytest.raises(PetpipeError, match=rf"data.source '{source}': no such file or folder"):
        fetch_source(source, None, in_tmp / "images")
    assert not (in_tmp / "images").exists()


def test_folder_without_images_is_refused(in_tmp: Path) -> None:
    (in_tmp / "empty").mkdir()
    (in_tmp / "empty" / "notes.txt").write_text("no photos here")

    with pytest.raises(PetpipeError, match="holds no image files"):
        fetch_source("empty", None, in_tmp / "images")
    assert not (in_tmp / "images").exists()


def test_output_inside_the_source_is_refused(in_tmp: Path, photos: list[Path]) -> None:
    (in_tmp / "photos").mkdir()
    (in_tmp / "photos" / photos[0].name).write_bytes(photos[0].read_bytes())

    with pytest.raises(PetpipeError, match="overlaps the output folder"):
        fetch_source("photos", None, in_tmp / "photos")
    assert (in_tmp / "photos" / photos[0].name).read_bytes() == photos[0].read_bytes()


def test_local_archive_with_wrong_checksum_is_refused_and_kept(in_tmp: Path, photos: list[Path]) -> None:
    data = make_tarball(photos)
    (in_tmp / "pets.tar.gz").write_bytes(data)

    with pytest.raises(PetpipeError, match="checksum mismatch") as error:
        fetch_source("pets.tar.gz", "md5:" + "0" * 32, in_tmp / "images")
    assert md5(data) in str(error.value)
    assert (in_tmp / "pets.tar.gz").read_bytes() == data  # never modify the source


def test_named_pipes_and_sockets_in_a_source_folder_are_skipped_with_a_warning(
    in_tmp: Path, photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    source = in_tmp / "photos"
    source.mkdir()
    for photo in photos[:3]:
        (source / photo.name).write_bytes(photo.read_bytes())
    os.mkfifo(source / "pipe.jpg")  # opening it to copy would wait for a writer for ever
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("photos/socket.jpg")  # relative: a socket's path must stay under 108 bytes
    (source / "pipe-link.jpg").symlink_to("pipe.jpg")

    try:
        with caplog.at_level(logging.WARNING):
            assert fetch_source("photos", None, in_tmp / "images") == 3
    finally:
        listener.close()

    assert_same_photos(in_tmp / "images", photos[:3])
    assert "skipping photos/pipe.jpg: a named pipe" in caplog.text
    assert "skipping photos/pipe-link.jpg: a named pipe" in caplog.text
    assert "skipping photos/socket.jpg: a socket" in caplog.text


def test_an_os_error_without_a_file_name_is_one_tidy_line(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(default_params()))
    errors = [
        OSError(errno.ENOSPC, "No space left on device"),
        shutil.SpecialFileError("`x` is a named pipe"),
        OSError(errno.EACCES, "Permission denied", "stages/fetch/images"),
    ]
    lines = []
    for error in errors:
        monkeypatch.setattr(fetch_stage, "fetch_source", lambda *args, error=error: (_ for _ in ()).throw(error))
        result = CliRunner().invoke(main, ["fetch", "--out", "stages/fetch/images"])
        assert result.exit_code == 1
        lines.append(result.output.split(";")[0])

    assert lines == [
        "Error: No space left on device",
        "Error: `x` is a named pipe",
        "Error: stages/fetch/images: Permission denied",
    ]


# --- downloads -----------------------------------------------------------------------------------


class ArchiveServer:
    """An HTTP server on 127.0.0.1 serving one file, honouring Range, optionally cutting the first transfer."""

    def __init__(
        self,
        payload: bytes,
        cut_first_after: int | None = None,
        honour_range: bool = True,
        content_type: str | None = None,
    ) -> None:
        self.payload = payload
        self.cut_first_after = cut_first_after
        self.honour_range = honour_range
        self.content_type = content_type
        self.range_headers: list[str | None] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/data/images.tar.gz"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path != "/data/images.tar.gz":
                    self.send_error(404)
                    return
                requested = self.headers.get("Range")
                owner.range_headers.append(requested)
                start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
                if requested and owner.honour_range and start >= len(owner.payload):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(owner.payload)}")
                    self.end_headers()
                    return
                if not (requested and owner.honour_range):
                    start = 0
                body = owner.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(owner.payload) - 1}/{len(owner.payload)}")
                self.send_header("Content-Length", str(len(body)))
                if owner.content_type:
                    self.send_header("Content-Type", owner.content_type)
                self.end_headers()
                if owner.cut_first_after is not None and len(owner.range_headers) == 1:
                    body = body[: owner.cut_first_after]  # then the connection closes: a transfer cut off
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    @contextlib.contextmanager
    def running(self) -> Iterator[ArchiveServer]:
        with serving(self.server):
            yield self


def test_download_from_http_is_verified_cached_and_reused(in_tmp: Path, photos: list[Path]) -> None:
    data = make_tarball(photos)
    with ArchiveServer(data).running() as server:
        assert fetch_source(server.url, md5(data), in_tmp / "images") == ARCHIVE_PHOTOS
        assert fetch_source(server.url, md5(data), in_tmp / "again") == ARCHIVE_PHOTOS

    assert_same_photos(in_tmp / "images", photos)
    assert server.range_headers == [None]  # the second fetch reused the verified download
    cached = in_tmp / ".petpipe/downloads" / cache_name(server.url)
    assert cached.read_bytes() == data
    assert cached.name.endswith("-images.tar.gz")
    assert not cached.with_name(cached.name + ".part").exists()


def test_download_dir_follows_the_environment(
    in_tmp: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PETPIPE_DOWNLOAD_DIR", str(in_tmp / "cache"))
    data = make_tarball(photos)
    with ArchiveServer(data).running() as server:
        fetch_source(server.url, None, in_tmp / "images")

    assert (in_tmp / "cache" / cache_name(server.url)).read_bytes() == data


def test_cut_off_download_resumes_with_a_range_request(in_tmp: Path, photos: list[Path]) -> None:
    data = make_tarball(photos)
    half = len(data) // 2
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    with ArchiveServer(data, cut_first_after=half).running() as server:
        with pytest.raises(PetpipeError, match="Run again to resume"):
            fetch_source(server.url, checksum, in_tmp / "images")
        part = in_tmp / ".petpipe/downloads" / (cache_name(server.url) + ".part")
        partial = part.stat().st_size
        assert 0 < partial <= half  # at most the chunk being read when the connection broke is lost
        assert not (in_tmp / "images").exists()

        assert fetch_source(server.url, checksum, in_tmp / "images") == ARCHIVE_PHOTOS

    assert server.range_headers == [None, f"bytes={partial}-"]
    assert_same_photos(in_tmp / "images", photos)
    assert not part.exists()


def test_server_ignoring_range_restarts_the_download(in_tmp: Path, photos: list[Path]) -> None:
    data = make_tarball(photos)
    with ArchiveServer(data, cut_first_after=len(data) // 3, honour_range=False).running() as server:
        with pytest.raises(PetpipeError):
            fetch_source(server.url, md5(data), in_tmp / "images")
        part = in_tmp / ".petpipe/downloads" / (cache_name(server.url) + ".part")
        partial = part.stat().st_size
        assert fetch_source(server.url, md5(data), in_tmp / "images") == ARCHIVE_PHOTOS

    assert partial > 0 and server.range_headers == [None, f"bytes={partial}-"]
    assert_same_photos(in_tmp / "images", photos)


def test_complete_partial_file_is_finished_by_a_416_answer(in_tmp: Path, photos: list[Path]) -> None:
    data = make_tarball(photos)
    with ArchiveServer(data).running() as server:
        part = in_tmp / ".petpipe/downloads" / (cache_name(server.url) + ".part")
        part.parent.mkdir(parents=True)
        part.write_bytes(data)  # killed after the last byte, before the rename

        assert fetch_source(server.url, md5(data), in_tmp / "images") == ARCHIVE_PHOTOS

    assert server.range_headers == [f"bytes={len(data)}-"]


def test_checksum_mismatch_deletes_the_download(in_tmp: Path, photos: list[Path]) -> None:
    data = make_tarball(photos)
    wrong = "md5:" + "0" * 32
    with ArchiveServer(data).running() as server, pytest.raises(PetpipeError) as error:
        fetch_source(server.url, wrong, in_tmp / "images")

    message = str(error.value)
    assert "checksum mismatch" in message and wrong in message and md5(data) in message
    assert list((in_tmp / ".petpipe/downloads").iterdir()) == []
    assert not (in_tmp / "images").exists()


def test_http_error_names_the_status(in_tmp: Path, photos: list[Path]) -> None:
    with ArchiveServer(make_tarball(photos)).running() as server:
        missing = server.url.replace("images.tar.gz", "other.tar.gz")
        with pytest.raises(PetpipeError, match=r"failed \(HTTP 404"):
            fetch_source(missing, None, in_tmp / "images")


LOGIN_PAGE = (
    b'<!DOCTYPE html>\n<html lang="en"><head><title>Sign in</title></head>\n'
    b'<body><form method="post"><input name="user"><input name="password" type="password">'
    b"</form></body></html>\n"
)
HTML_SENT = "the server sent an HTML page, not an archive (a login or error page?)"


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream", None])
def test_an_html_page_instead_of_the_archive_is_refused_plainly_and_never_cached(
    in_tmp: Path, content_type: str | None
) -> None:
    # Told by the Content-Type, or, where a server labels it wrongly or not at all, by its first bytes.
    downloads = in_tmp / ".petpipe/downloads"
    with ArchiveServer(LOGIN_PAGE, content_type=content_type).running() as server:
        for _ in range(2):
            with pytest.raises(PetpipeError) as refused:
                fetch_source(server.url, None, in_tmp / "images")
            assert str(refused.value).startswith(f"download of {server.url}: {HTML_SENT}. It was not kept.")
            assert list(downloads.iterdir()) == []  # neither the page nor a .part of it

    assert server.range_headers == [None, None]  # the second run asked the server again, from the start
    assert not (in_tmp / "images").exists()


def test_an_html_page_through_the_cli_is_one_error_line(in_tmp: Path) -> None:
    with ArchiveServer(LOGIN_PAGE, content_type="text/html").running() as server:
        params = {
            **default_params(),
            "data": {**default_params()["data"], "source": server.url, "checksum": "md5:" + "0" * 32},
        }
        (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
        result = CliRunner().invoke(main, ["fetch", "--out", "stages/fetch/images"])

    assert result.exit_code == 1
    # What arrived is named before the checksum is compared: "checksum mismatch" would hide the cause.
    assert result.output.startswith(f"Error: download of {server.url}: {HTML_SENT}.")
    assert result.output.count("\n") == 1 and "tarfile" not in result.output and "checksum" not in result.output


def test_a_download_that_is_no_archive_is_refused_naming_its_first_bytes(in_tmp: Path) -> None:
    with ArchiveServer(b'{"error": "quota exceeded"}', content_type="application/json").running() as server:
        with pytest.raises(
            PetpipeError,
            match=r"what arrived is not an archive \(it begins b'\{\"error\": \"quota'; "
            r"petpipe reads tar, gzip, bzip2, xz and zip\)\. It was not kept\.",
        ):
            fetch_source(server.url, None, in_tmp / "images")

    assert list((in_tmp / ".petpipe/downloads").iterdir()) == []


def test_a_page_an_older_petpipe_cached_is_downloaded_again(
    in_tmp: Path, photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = make_tarball(photos)
    with ArchiveServer(data).running() as server:
        cached = in_tmp / ".petpipe/downloads" / cache_name(server.url)
        cached.parent.mkdir(parents=True)
        cached.write_bytes(LOGIN_PAGE)

        assert fetch_source(server.url, None, in_tmp / "images") == ARCHIVE_PHOTOS

    assert server.range_headers == [None]
    assert cached.read_bytes() == data
    assert f"{cached} (cached download of {server.url}) is not an archive; downloading again" in caplog.text


def test_a_local_html_page_named_like_an_archive_is_refused_plainly(in_tmp: Path) -> None:
    (in_tmp / "images.tar.gz").write_bytes(LOGIN_PAGE)  # what "Save link as" gives behind a login
    with pytest.raises(
        PetpipeError,
        match=r"^data.source images.tar.gz is an HTML page, not an archive \(a login or "
        r"error page saved in its place\?\)",
    ):
        fetch_source("images.tar.gz", None, in_tmp / "images")


def test_a_damaged_archive_is_reported_in_one_line(in_tmp: Path) -> None:
    (in_tmp / "images.tar.gz").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(PetpipeError) as damaged:
        fetch_source("images.tar.gz", None, in_tmp / "images")
    assert str(damaged.value) == (
        "archive images.tar.gz is damaged (not a tar archive, compressed or not); delete it and fetch again"
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_network_tells_how_to_use_local_photos(in_tmp: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/x.tar.gz"
    params = {**default_params(), "data": {**default_params()["data"], "source": url, "checksum": None}}
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))

    result = CliRunner().invoke(main, ["fetch", "--out", "stages/fetch/images"])

    assert result.exit_code == 1
    assert f"download of {url} failed (" in result.output
    assert "Connection refused" in result.output
    assert "dvc exp run -S data.source=/path/to/images" in result.output
    assert "Traceback" not in result.output
    assert not (in_tmp / "stages/fetch/images").exists()


def test_fsspec_url_is_downloaded_and_resumed(in_tmp: Path, photos: list[Path]) -> None:
    import fsspec

    data = make_tarball(photos)
    url = "memory://bucket/pets/images.tar.gz"
    with fsspec.open(url, "wb") as remote:
        remote.write(data)
    part = in_tmp / ".petpipe/downloads" / (cache_name(url) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])

    assert fetch_source(url, md5(data), in_tmp / "images") == ARCHIVE_PHOTOS

    assert_same_photos(in_tmp / "images", photos)


@pytest.mark.parametrize("url, package", [("s3://bucket/pets.tar.gz", "s3fs"), ("gs://bucket/pets.tar.gz", "gcsfs")])
def test_cloud_url_without_its_package_says_what_to_install(in_tmp: Path, url: str, package: str) -> None:
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    with pytest.raises(PetpipeError, match=f"pip install {package}"):
        fetch_source(url, None, in_tmp / "images")


# --- hostile archives ----------------------------------------------------------------------------


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"evil") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def write_tar(path: Path, members: list[tuple]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


HOSTILE_TARS = {
    "parent traversal": ([tar_member("images/ok.jpg"), tar_member("../evil.txt")], "../evil.txt"),
    "nested traversal": ([tar_member("images/../../evil.txt")], "images/../../evil.txt"),
    "absolute path": ([tar_member("/abs/evil.txt")], "/abs/evil.txt"),
    "symlink to /etc/passwd": ([tar_member("images/passwd.jpg", tarfile.SYMTYPE, "/etc/passwd")], "passwd.jpg"),
    "symlink to ../..": ([tar_member("images/up", tarfile.SYMTYPE, "../..")], "images/up"),
    "hardlink outside": ([tar_member("images/link.jpg", tarfile.LNKTYPE, "../../outside.txt")], "link.jpg"),
    "hardlink to /etc/passwd": ([tar_member("images/pw.jpg", tarfile.LNKTYPE, "/etc/passwd")], "pw.jpg"),
    "symlink made unsafe by a later one": (
        [tar_member("a", tarfile.SYMTYPE, "q/.."), tar_member("q", tarfile.SYMTYPE, ".")],
        "a",
    ),
    "fifo": ([tar_member("images/pipe", tarfile.FIFOTYPE)], "images/pipe"),
    "device": ([tar_member("images/disk", tarfile.BLKTYPE)], "images/disk"),
}


def only_files_are(root: Path, expected: set[Path]) -> bool:
    return {path for path in root.rglob("*") if not path.is_dir()} == expected


@pytest.mark.parametrize("members, member_named", HOSTILE_TARS.values(), ids=HOSTILE_TARS.keys())
def test_hostile_tar_is_refused_and_writes_nothing(in_tmp: Path, members: list, member_named: str) -> None:
    archive = in_tmp / "hostile.tar.gz"
    write_tar(archive, members)
    output = in_tmp / "work/stages/fetch/images"

    with pytest.raises(PetpipeError, match="refusing to extract") as error:
        fetch_source(str(archive), None, output)

    assert member_named in str(error.value)
    assert not output.exists()
    assert only_files_are(in_tmp, {archive})
    assert not Path("/abs/evil.txt").exists()


def test_hostile_zip_is_refused_and_writes_nothing(in_tmp: Path) -> None:
    archive = in_tmp / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("images/ok.jpg", b"fine")
        zipped.writestr("../evil.txt", b"evil")
    output = in_tmp / "work/stages/fetch/images"

    with pytest.raises(PetpipeError, match=r"member '\.\./evil\.txt' climbs out"):
        fetch_source(str(archive), None, output)

    assert not output.exists()
    assert only_files_are(in_tmp, {archive})


def test_refused_archive_keeps_the_previous_output(in_tmp: Path) -> None:
    output = in_tmp / "images"
    output.mkdir()
    (output / "kept.jpg").write_bytes(b"previous run")
    write_tar(in_tmp / "hostile.tar", [tar_member("images/ok.jpg"), tar_member("../evil.txt")])

    with pytest.raises(PetpipeError):
        fetch_source("hostile.tar", None, output)

    assert [path.name for path in output.iterdir()] == ["kept.jpg"]


def test_symlink_inside_the_archive_is_kept(in_tmp: Path, photos: list[Path]) -> None:
    archive = in_tmp / "pets.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(photos[0], arcname=f"images/{photos[0].name}")
        link = tarfile.TarInfo("images/alias.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, photos[0].name
        tar.addfile(link)

    assert fetch_source(str(archive), None, in_tmp / "images") == 2

    assert (in_tmp / "images/alias.jpg").read_bytes() == photos[0].read_bytes()
