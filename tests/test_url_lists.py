"""A list of image URLs as data.source: real photos served from 127.0.0.1 next to every failure a real image
search list holds, through `dvc repro` to a trained head; reruns that download only what is missing; bad lists
refused in one line."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    OFFLINE_TRAINING,
    QUIET_MLFLOW,
    free_port,
    make_project,
    params_with,
    ran,
    run_command,
    sample_by_breed,
    serving,
    stale_stages,
    write_params,
)
from petpipe.data.image_downloads import Settings
from petpipe.data.sources import fetch_url_list
from petpipe.data.url_lists import is_url_list, read_url_list
from petpipe.errors import PetpipeError
from petpipe.track.identity import STAGE_TAG

TIMEOUT_S = 1.0  # data.download_timeout of these tests: the silent and trickling routes cost it, twice
MAX_BYTES = 1 << 20  # data.download_max_mb 1: every sample photo is under 250 kB


class PhotoServer:
    """An http.server on 127.0.0.1 (a port of its own, threads, bounded waits) serving sample photos and every
    failure of a real image-search list; it records each request's path."""

    def __init__(self, photos: dict[str, Path]) -> None:
        self.photos = {name: path.read_bytes() for name, path in photos.items()}
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.release = threading.Event()
        self.flaky_served: set[str] = set()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def requested(self, since: int = 0) -> list[str]:
        return sorted(self.requests[since:])

    @contextlib.contextmanager
    def running(self) -> Iterator[PhotoServer]:
        def stop() -> None:
            self.stop.set()
            self.release.set()

        with serving(self.server, before_shutdown=stop):
            yield self

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send(self, status: int, body: bytes, content_type: str = "image/jpeg", **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests.append(self.path)
                route, _, name = self.path.lstrip("/").partition("/")
                if route == "misnamed":  # /misnamed/<stem>.png serves the JPEG <stem>.jpg
                    route, name = "photo", name.removesuffix(".png") + ".jpg"
                photo = owner.photos.get(name, b"")
                if route == "photo" and photo:
                    self.send(200, photo)
                elif route == "as-html" and photo:  # a JPEG the server calls a web page: decoded, so kept
                    self.send(200, photo, "text/html")
                elif route == "copy" and photo:  # the same photo under another URL
                    self.send(200, photo)
                elif route == "flaky" and photo:  # 503 once, then the photo: the retry gets it
                    if name in owner.flaky_served:
                        self.send(200, photo)
                    else:
                        owner.flaky_served.add(name)
                        self.send(503, b"busy", "text/plain")
                elif route == "hold" and photo:  # answers only once the test releases it
                    if owner.release.wait(30):
                        self.send(200, photo)
                elif route == "announced":  # says it is huge, and is refused before its body
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(50 * MAX_BYTES))
                    self.end_headers()
                elif route == "text":
                    self.send(200, b"GIF87a? no: a plain text file", "image/gif")
                elif route == "empty":
                    self.send(200, b"")
                elif route == "forbidden":
                    self.send(403, b"no", "text/plain")
                elif route == "page":  # an HTML page claiming to be a JPEG
                    self.send(200, b"<!DOCTYPE html><html><body>Sign in to see this image</body></html>")
                elif route == "truncated":
                    first = next(iter(owner.photos.values()))
                    self.send(200, first[: len(first) * 2 // 3])
                elif route == "loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif route == "silent":  # accepts, never answers
                    owner.stop.wait(30)
                elif route == "trickle":  # answers, then a byte at a time, forever
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.end_headers()
                    while not owner.stop.wait(0.05):
                        try:
                            self.wfile.write(b"\xff")
                            self.wfile.flush()
                        except OSError:
                            return
                elif route == "slow-headers":  # a status line, then its headers a byte at a time, forever
                    self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                    while not owner.stop.wait(0.05):
                        try:
                            self.wfile.write(b"a")
                            self.wfile.flush()
                        except OSError:
                            return
                elif route == "huge":  # no Content-Length: only the byte cap stops it
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.end_headers()
                    try:
                        for _ in range(4 * MAX_BYTES // 65536):
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        return
                else:
                    self.send(404, b"not found", "text/plain")

        return Handler


@pytest.fixture()
def breeds(sample_images: Path) -> dict[str, list[Path]]:
    """Three breeds of five photos each: four on the lists, the fifth of the first breed the line added later."""
    return {breed: photos[:5] for breed, photos in list(sample_by_breed(sample_images).items())[:3]}


def write_lists(folder: Path, server: PhotoServer, breeds: dict[str, list[Path]]) -> dict[str, str]:
    """fastai's layout, one <breed>.txt per class: four good photos of each breed beside the failures; returns
    the expected reason of each failing URL."""
    (first, a), (second, b), (third, c) = ((breed, [p.name for p in photos]) for breed, photos in breeds.items())
    dead = f"http://127.0.0.1:{free_port()}/gone.jpg"
    failures = {
        server.url("/missing/x.jpg"): "http-404",
        server.url("/forbidden/x.jpg"): "http-403",
        server.url("/page/x.jpg"): "html-page",
        server.url("/truncated/x.jpg"): "truncated",
        server.url("/loop/x.jpg"): "too-many-redirects",
        server.url("/silent/x.jpg"): "timeout",
        server.url("/trickle/x.jpg"): "timeout",
        server.url("/huge/x.jpg"): "too-large",
        dead: "connection",
        "ftp://127.0.0.1/x.jpg": "refused",
        "file:///etc/passwd": "refused",
    }
    lines = {
        first: [
            server.url(f"/photo/{a[0]}"),
            server.url(f"/photo/{a[1]}"),
            server.url(f"/as-html/{a[2]}"),
            server.url(f"/photo/{a[3]}"),
            server.url(f"/copy/{a[0]}"),
            server.url(f"/photo/{a[0]}"),
            *list(failures)[:4],
        ],
        second: [
            server.url(f"/photo/{b[0]}"),
            server.url(f"/flaky/{b[1]}"),
            server.url(f"/photo/{b[2]}"),
            server.url(f"/photo/{b[3]}"),
            "# a comment",
            "",
            *list(failures)[4:8],
        ],
        third: [server.url(f"/photo/{name}") for name in c[:4]] + list(failures)[8:],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for breed, urls in lines.items():
        (folder / f"{breed}.txt").write_text("\n".join(urls) + "\n")
    return failures


def read_report(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dvc_repro_trains_on_exactly_the_good_photos_and_reruns_download_only_what_is_missing(tmp_path, breeds):
    photos = {path.name: path for paths in breeds.values() for path in paths}
    server = PhotoServer(photos)
    with server.running():
        project = make_project(
            tmp_path / "project",
            {
                **OFFLINE_TRAINING,
                "train.precision": "float32",
                "train_head.epochs": 1,
                "data.checksum": None,
                "data.source": "urls/",
                "labels.method": "folder",
                "data.download_timeout": TIMEOUT_S,
                "data.download_max_mb": MAX_BYTES / 2**20,
                # The file names hold the URLs' hashes, and so the server's port: half the photos are held out
                # so that no draw of the split leaves one side empty.
                "split.valid_pct": 0.5,
            },
        )
        failures = write_lists(project / "urls", server, breeds)
        log = run_command(["dvc", "repro", "train-head"], project).stdout
        assert ran(log) == ["fetch", "index-labels", "train-head"]

        report = read_report(project / "stages/fetch/downloads.csv")
        by_url = {(row["url"], row["status"]): row for row in report}
        assert len(report) == 25  # one row per line of the lists (comments and blank lines aside)
        for url, reason in failures.items():
            assert by_url[(url, "failed")]["reason"].startswith(f"{reason}: "), by_url[(url, "failed")]
        assert "scheme ftp" in by_url[("ftp://127.0.0.1/x.jpg", "failed")]["reason"]
        assert "scheme file" in by_url[("file:///etc/passwd", "failed")]["reason"]
        first, a = next(iter(breeds.items()))
        duplicates = [row for row in report if row["status"] == "duplicate"]
        kept = server.url(f"/photo/{a[0].name}")
        assert {row["url"] for row in duplicates} == {server.url(f"/copy/{a[0].name}"), kept}
        assert all(row["file"] == by_url[(kept, "downloaded")]["file"] for row in duplicates)
        assert [row["status"] for row in report].count("downloaded") == 12
        summary = [line for line in log.splitlines() if line.startswith("fetched ")]
        assert summary and "12 downloaded, 0 already present, 2 duplicate, 11 failed (" in summary[0], log

        # index-labels and train-head saw exactly the twelve good photos, each under its breed.
        with (project / "stages/index-labels/index.csv").open(newline="") as file:
            index = list(csv.DictReader(file))
        expected = sorted((breed, sha256(path)) for breed, paths in breeds.items() for path in paths[:4])
        assert sorted((row["label"], row["hash"]) for row in index) == expected
        assert json.loads((project / "stages/index-labels/classes.json").read_text())["classes"] == sorted(breeds)
        assert (project / "stages/train-head/model.pt").is_file()

        # An unchanged list reruns nothing, and nothing is requested.
        asked = len(server.requests)
        assert ran(run_command(["dvc", "repro", "train-head"], project).stdout) == []
        assert len(server.requests) == asked
        assert stale_stages(project) == {"audit", "lr-find", "finetune", "export", "evaluate"}  # never run

        # One line added: fetch reruns, and what follows it is stale; fetch asks for that URL alone (and again for
        # the failures: they are not cached).
        new = server.url(f"/photo/{a[4].name}")
        with (project / "urls" / f"{first}.txt").open("a") as file:
            file.write(new + "\n")
        assert stale_stages(project) == {"fetch", "audit", "lr-find", "finetune", "export", "evaluate"}
        log = run_command(["dvc", "repro", "fetch"], project).stdout
        assert ran(log) == ["fetch"]
        assert stale_stages(project) == {
            "index-labels",
            "train-head",
            "audit",
            "lr-find",
            "finetune",
            "export",
            "evaluate",
        }
        photo_requests = [
            path for path in server.requested(asked) if path.startswith(("/photo/", "/as-html/", "/copy/", "/flaky/"))
        ]
        assert photo_requests == [f"/photo/{a[4].name}"]
        report = read_report(project / "stages/fetch/downloads.csv")
        assert [row["url"] for row in report if row["status"] == "downloaded"] == [new]
        assert [row["status"] for row in report].count("present") == 12
        assert "1 downloaded, 12 already present, 2 duplicate, 11 failed" in log


# --- in-process: the list's forms, names, resumption and refusals ------------------------------------------


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The download cache of the in-process tests (PETPIPE_DOWNLOAD_DIR)."""
    monkeypatch.setenv("PETPIPE_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    return tmp_path / "downloads" / "url-images"


SETTINGS = Settings(workers=4, timeout=TIMEOUT_S, max_bytes=MAX_BYTES)


def test_a_csv_list_names_each_photo_by_its_url_and_real_format(tmp_path, cache, sample_images):
    photos = sorted(sample_images.glob("*.jpg"))[:2]
    server = PhotoServer({photo.name: photo for photo in photos})
    source = tmp_path / "search.csv"
    # a JPEG at a URL ending .png gets .jpg; columns in any order, others ignored
    urls = [server.url(f"/photo/{photos[0].name}"), server.url(f"/misnamed/{photos[1].stem}.png")]
    source.write_text(f"Title,LABEL,Url\na,great pyrenees,{urls[0]}\nb,samoyed,{urls[1]}\n")
    assert is_url_list(str(source))
    with server.running():
        tally = fetch_url_list(str(source), SETTINGS, tmp_path / "images", tmp_path / "downloads.csv")
    keys = [hashlib.sha256(url.encode()).hexdigest()[:16] for url in urls]
    assert read_report(tmp_path / "downloads.csv") == [
        {
            "url": urls[0],
            "label": "great pyrenees",
            "status": "downloaded",
            "file": f"great pyrenees/{keys[0]}.jpg",
            "reason": "",
        },
        {"url": urls[1], "label": "samoyed", "status": "downloaded", "file": f"samoyed/{keys[1]}.jpg", "reason": ""},
    ]
    assert (tmp_path / "images" / "samoyed" / f"{keys[1]}.jpg").read_bytes() == photos[1].read_bytes()
    assert tally.summary() == "2 downloaded, 0 already present, 0 duplicate, 0 failed"
    assert sorted(path.name for path in cache.rglob("*") if path.is_file()) == sorted(f"{key}.jpg" for key in keys)


def test_a_killed_fetch_resumes_without_asking_again_for_what_it_has(tmp_path, cache, breeds):
    photos = {path.name: path for path in next(iter(breeds.values()))}
    names = list(photos)
    server = PhotoServer(photos)
    lists = tmp_path / "urls"
    lists.mkdir()
    good = [server.url(f"/photo/{name}") for name in names[:4]]
    (lists / "cats.txt").write_text("\n".join([*good, server.url(f"/hold/{names[4]}")]) + "\n")
    write_params(tmp_path / "params.yaml", {"data.source": str(lists), "data.download_timeout": 60})
    command = [
        str(Path(sys.executable).parent / "petpipe"),
        "fetch",
        "--params",
        str(tmp_path / "params.yaml"),
        "--out",
        str(tmp_path / "images"),
        "--downloads",
        str(tmp_path / "downloads.csv"),
    ]
    with server.running():
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, "PETPIPE_DOWNLOAD_DIR": str(cache.parent)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while len(list(cache.glob("??/*.jpg"))) < 4 or "/hold/" not in "".join(server.requests):
                assert process.poll() is None and time.monotonic() < deadline, "fetch ended or never got there"
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        assert not (tmp_path / "images").exists() and not (tmp_path / "downloads.csv").exists()
        asked = len(server.requests)
        server.release.set()
        tally = fetch_url_list(str(lists), SETTINGS, tmp_path / "images", tmp_path / "downloads.csv")
        assert server.requested(asked) == [f"/hold/{names[4]}"]
    assert tally.counts == {"present": 4, "downloaded": 1}
    assert sorted(sha256(path) for path in (tmp_path / "images" / "cats").iterdir()) == sorted(
        sha256(path) for path in photos.values()
    )


def test_a_list_where_nothing_downloads_says_so_and_keeps_the_report(tmp_path, cache):
    server = PhotoServer({})
    source = tmp_path / "urls.csv"
    routes = ["/missing/a.jpg", "/page/b.jpg", "/announced/c.jpg", "/text/d.gif", "/empty/e.jpg", "/slow-headers/f.jpg"]
    source.write_text("url,label\n" + "".join(f"{server.url(route)},cat\n" for route in routes))
    with server.running(), pytest.raises(PetpipeError) as raised:
        fetch_url_list(str(source), SETTINGS, tmp_path / "images", tmp_path / "downloads.csv")
    assert str(raised.value) == (
        f"data.source {source}: none of its 6 URLs gave a photo (0 downloaded, 0 already present, 0 duplicate, "
        f"6 failed (http-404 1, html-page 1, too-large 1, not-an-image 1, empty 1, timeout 1)); "
        f"see {tmp_path / 'downloads.csv'} for each URL's reason"
    )
    reasons = [row["reason"] for row in read_report(tmp_path / "downloads.csv")]
    assert reasons[-1].startswith(f"timeout: not complete within {TIMEOUT_S:g} s")  # cut in its headers
    assert reasons[:-1] == [
        "http-404: Not Found",
        "html-page: the server sent an HTML page, not an image",
        f"too-large: {50 * MAX_BYTES} bytes announced, over data.download_max_mb",
        "not-an-image: cannot identify an image in it (image/gif, begins b'GIF87a? ')",
        "empty: the server sent no bytes",
    ]
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize(
    ("label", "why"),
    [
        ("../x", "would climb out|holds /"),
        ("a/b", "holds /"),
        ("con", "a name Windows keeps for a device"),
        ("", "is empty"),
        (".cache", "starts with '.'"),
        ("cats.", "ends with a space or a dot"),
    ],
)
def test_a_label_that_cannot_be_a_folder_is_refused_in_one_line(tmp_path, label, why):
    source = tmp_path / "urls.csv"
    source.write_text(f"url,label\nhttps://example.invalid/a.jpg,cat\nhttps://example.invalid/b.jpg,{label}\n")
    with pytest.raises(PetpipeError) as raised:
        read_url_list(str(source))
    message = str(raised.value)
    assert "\n" not in message and f"{label!r} (urls.csv:3)" in message and "nothing was downloaded" in message
    assert re.search(why, message), message


def test_a_class_file_whose_name_is_no_folder_name_is_refused(tmp_path):
    (tmp_path / "urls").mkdir()
    (tmp_path / "urls" / "cat.txt").write_text("https://example.invalid/a.jpg\n")
    (tmp_path / "urls" / "CON.txt").write_text("https://example.invalid/b.jpg\n")
    with pytest.raises(PetpipeError, match=r"'CON' \(CON.txt:1\) is a name Windows keeps for a device"):
        read_url_list(str(tmp_path / "urls"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("link,label\nhttps://example.invalid/a.jpg,cat\n", r"a header row with the columns url,label; no url column"),
        ("url\nhttps://example.invalid/a.jpg\n", r"no label column"),
        (
            "url,label\nftp://example.invalid/a.jpg,cat\nfile:///etc/passwd,cat\nwww.example.com/b.jpg,cat\n",
            r"no http\(s\) URL in the list \(3 entries; first: 'ftp://example.invalid/a.jpg'",
        ),
        ("url,label\n", r"no http\(s\) URL in the list \(0 entries"),
    ],
)
def test_a_csv_petpipe_cannot_use_is_refused_in_one_line(tmp_path, text, message):
    source = tmp_path / "urls.csv"
    source.write_text(text)
    with pytest.raises(PetpipeError, match=message) as raised:
        read_url_list(str(source))
    assert "\n" not in str(raised.value)


def test_what_counts_as_a_url_list(tmp_path, sample_images):
    assert not is_url_list(str(sample_images))  # photos, even beside a stray .txt
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("https://example.invalid/a.jpg\n")
    (tmp_path / "mixed" / "a.jpg").write_bytes(next(sample_images.glob("*.jpg")).read_bytes())
    assert not is_url_list(str(tmp_path / "mixed"))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cat.csv").write_text("url\nhttps://example.invalid/a.jpg\n")
    (tmp_path / "lists" / "dog.txt").write_text("# dogs\nhttps://example.invalid/b.jpg\n\n")
    assert is_url_list(str(tmp_path / "lists")) and is_url_list(str(tmp_path / "lists") + "/")
    assert [(entry.label, entry.url, entry.where) for entry in read_url_list(str(tmp_path / "lists"))] == [
        ("cat", "https://example.invalid/a.jpg", "cat.csv:2"),
        ("dog", "https://example.invalid/b.jpg", "dog.txt:2"),
    ]
    assert not is_url_list("https://example.invalid/list.csv") and not is_url_list(str(tmp_path / "gone.csv"))


def test_the_counts_are_fetchs_mlflow_metrics_and_the_report_its_artifact(tmp_path, cache, sample_images, monkeypatch):
    from mlflow.tracking import MlflowClient

    from petpipe.stages import fetch as fetch_stage
    from petpipe.track import mlflow_runs

    photo = next(sample_images.glob("*.jpg"))
    server = PhotoServer({photo.name: photo})
    source = tmp_path / "urls.csv"
    source.write_text(
        f"url,label\n{server.url(f'/photo/{photo.name}')},cat\n{server.url(f'/copy/{photo.name}')},cat\n"
        f"{server.url('/forbidden/a.jpg')},cat\nfile:///etc/passwd,cat\n"
    )
    monkeypatch.chdir(tmp_path)  # the embedded store, mlflow.db, lands here
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "PETPIPE_TRACKING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**QUIET_MLFLOW, **mlflow_runs.HTTP_DEFAULTS}.items():
        monkeypatch.setenv(name, value)
    outputs = fetch_stage.Outputs(images=tmp_path / "images", downloads=tmp_path / "downloads.csv")
    with server.running():
        summary = fetch_stage.run(params_with({"data.source": str(source)}), fetch_stage.Inputs(), outputs)
    assert summary == (
        f"fetched 1 images into {outputs.images} from 4 URLs: 1 downloaded, 0 already present, "
        f"1 duplicate, 2 failed (http-403 1, refused 1); each URL's outcome in {outputs.downloads}"
    )

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("petpipe").experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'fetch'"
    )
    assert run.data.metrics == {
        "urls": 4,
        "images": 1,
        "downloaded": 1,
        "present": 0,
        "duplicate": 1,
        "failed": 2,
        "failed_http_403": 1,
        "failed_refused": 1,
    }
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == ["downloads.csv"]
