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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import OFFLINE_TRAINING, free_port, make_project, ran, run_command, sample_by_breed, serving, write_params

from petpipe.errors import PetpipeError
from petpipe.fetch import fetch_url_list
from petpipe.image_downloads import Settings
from petpipe.url_lists import is_url_list, read_url_list

TIMEOUT_S = 1.0  # data.download_timeout of these tests: the silent and trickling routes cost it, twice
MAX_BYTES = 1 << 20  # data.download_max_mb 1: every sample photo is under 250 kB


class PhotoServer:
    """An http.server on 127.0.0.1 (a port of its own, threads, bounded waits) serving sample photos and every
    failure of a real image-search list; it records each request's path."""

    def __init__(self, photos: dict[str, Path]) -> None:
        self.photos = {name: path.read_bytes() for name, path in photos.items()}
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.flaky_served: set[str] = set()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def requested(self, since: int = 0) -> list[str]:
        return sorted(self.requests[since:])

    @contextlib.contextmanager
    def running(self) -> Iterator[PhotoServer]:
        with serving(self.server, before_shutdown=self.stop.set):
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
    """Three breeds of four photos each (the fourth of the first breed is the line added later)."""
    return {breed: photos[:4] for breed, photos in list(sample_by_breed(sample_images).items())[:3]}


def write_lists(folder: Path, server: PhotoServer, breeds: dict[str, list[Path]]) -> dict[str, str]:
    """fastai's layout, one <breed>.txt per class: three good photos of each breed beside the failures; returns
    the expected reason of each failing URL."""
    (first, a), (second, b), (third, c) = ((breed, [p.name for p in photos]) for breed, photos in breeds.items())
    dead = f"http://127.0.0.1:{free_port()}/gone.jpg"
    failures = {
        server.url("/missing/x.jpg"): "http-404", server.url("/forbidden/x.jpg"): "http-403",
        server.url("/page/x.jpg"): "html-page", server.url("/truncated/x.jpg"): "truncated",
        server.url("/loop/x.jpg"): "too-many-redirects", server.url("/silent/x.jpg"): "timeout",
        server.url("/trickle/x.jpg"): "timeout", server.url("/huge/x.jpg"): "too-large", dead: "connection",
        "ftp://127.0.0.1/x.jpg": "refused", "file:///etc/passwd": "refused",
    }
    lines = {
        first: [server.url(f"/photo/{a[0]}"), server.url(f"/photo/{a[1]}"), server.url(f"/as-html/{a[2]}"),
                server.url(f"/copy/{a[0]}"), server.url(f"/photo/{a[0]}"), *list(failures)[:4]],
        second: [server.url(f"/photo/{b[0]}"), server.url(f"/flaky/{b[1]}"), server.url(f"/photo/{b[2]}"),
                 "# a comment", "", *list(failures)[4:8]],
        third: [server.url(f"/photo/{name}") for name in c[:3]] + list(failures)[8:],
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
        project = make_project(tmp_path / "project", {
            **OFFLINE_TRAINING, "train.precision": "float32", "train_head.epochs": 1, "data.checksum": None,
            "data.source": "urls/", "labels.method": "folder", "data.download_timeout": TIMEOUT_S,
            "data.download_max_mb": MAX_BYTES / 2**20})
        failures = write_lists(project / "urls", server, breeds)
        log = run_command(["dvc", "repro", "train-head"], project).stdout
        assert ran(log) == ["fetch", "index-labels", "train-head"]

        report = read_report(project / "stages/fetch/downloads.csv")
        by_url = {(row["url"], row["status"]): row for row in report}
        assert len(report) == 22  # one row per line of the lists (comments and blank lines aside)
        for url, reason in failures.items():
            assert by_url[(url, "failed")]["reason"].startswith(f"{reason}: "), by_url[(url, "failed")]
        assert "scheme ftp" in by_url[("ftp://127.0.0.1/x.jpg", "failed")]["reason"]
        assert "scheme file" in by_url[("file:///etc/passwd", "failed")]["reason"]
        first, a = next(iter(breeds.items()))
        duplicates = [row for row in report if row["status"] == "duplicate"]
        assert {row["url"] for row in duplicates} == {server.url(f"/copy/{a[0].name}"), server.url(f"/photo/{a[0].name}")}
        assert all(row["file"] == by_url[(server.url(f"/photo/{a[0].name}"), "downloaded")]["file"] for row in duplicates)
        assert [row["status"] for row in report].count("downloaded") == 9
        summary = [line for line in log.splitlines() if line.startswith("fetched ")]
        assert summary and "9 downloaded, 0 already present, 2 duplicate, 11 failed (" in summary[0], log

        # index-labels and train-head saw exactly the nine good photos, each under its breed.
        with (project / "stages/index-labels/index.csv").open(newline="") as file:
            index = list(csv.DictReader(file))
        expected = sorted((breed, sha256(path)) for breed, paths in breeds.items() for path in paths[:3])
        assert sorted((row["label"], row["hash"]) for row in index) == expected
        assert json.loads((project / "stages/index-labels/classes.json").read_text())["classes"] == sorted(breeds)
        assert (project / "stages/train-head/model.pt").is_file()

        # An unchanged list reruns nothing, and nothing is requested.
        asked = len(server.requests)
        assert ran(run_command(["dvc", "repro", "train-head"], project).stdout) == []
        assert len(server.requests) == asked

        # One line added: fetch asks for that URL alone (and again for the failures: they are not cached).
        new = server.url(f"/photo/{a[3].name}")
        with (project / "urls" / f"{first}.txt").open("a") as file:
            file.write(new + "\n")
        log = run_command(["dvc", "repro", "train-head"], project).stdout
        assert ran(log) == ["fetch", "index-labels", "train-head"]
        photo_requests = [path for path in server.requested(asked) if path.startswith(("/photo/", "/as-html/", "/copy/", "/flaky/"))]
        assert photo_requests == [f"/photo/{a[3].name}"]
        report = read_report(project / "stages/fetch/downloads.csv")
        assert [row["url"] for row in report if row["status"] == "downloaded"] == [new]
        assert [row["status"] for row in report].count("present") == 9
        assert "1 downloaded, 9 already present, 2 duplicate, 11 failed" in log
