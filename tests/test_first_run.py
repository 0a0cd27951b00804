"""The first run without network, through `dvc repro` itself: DVC hashes the default source's .url file, not
the URL, so petpipe's fetch runs and says in one line what to do. A changed URL or checksum still reruns
fetch, and a local folder's photos are still DVC dependencies."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import pytest
import yaml

from helpers import copy_subset, make_project, run_command, serving
from petpipe.data.sources import fetch_source, read_url_file
from petpipe.errors import PetpipeError

DEFAULT_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dvc(arguments: list[str], folder: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    """Run dvc in folder with the venv first on PATH; the result whatever its status."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        **environment,
    }
    return subprocess.run(["dvc", *arguments], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def fetch_status(folder: Path) -> dict:
    return json.loads(run_command(["dvc", "status", "fetch", "--json"], folder).stdout or "{}")


def test_dvc_repro_without_network_says_in_one_line_what_to_do(tmp_path):
    project = make_project(tmp_path / "offline", {})  # the default params: the Oxford-IIIT Pet archive
    # No network, and fast wherever the test runs: every request goes to a proxy port nobody listens on, so
    # nothing waits on DNS (the machines that run the tests have no internet anyway).
    proxy = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = dvc(["repro"], project, HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'fetch'" in output, "DVC stopped before petpipe ran:\n" + output
    [line] = [line for line in output.splitlines() if f"download of {DEFAULT_URL} failed" in line]
    assert "the network or the server is unreachable" in line
    assert "dvc exp run -S data.source=/path/to/images" in line
    assert "does not exist" not in output and "Traceback" not in output
    assert seconds < 60, f"{seconds:.0f} s to say there is no network"


def test_dvc_status_of_the_default_source_needs_no_network(tmp_path):
    project = make_project(tmp_path / "status", {})
    proxy = f"http://127.0.0.1:{closed_port()}"
    result = dvc(["status", "fetch", "--json"], project, HTTPS_PROXY=proxy, https_proxy=proxy)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert "fetch" in status  # never run: stale, and said so without asking any server
    assert "does not exist" not in result.stderr


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


def _tarball(photos: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for photo in sorted(photos.iterdir()):
            archive.add(photo, arcname=f"images/{photo.name}")
    return buffer.getvalue()


def test_a_changed_url_or_checksum_reruns_fetch_and_local_photos_stay_dependencies(tmp_path, sample_images):
    photos = tmp_path / "photos"
    copy_subset(sample_images, photos, breeds=2, per_breed=3)
    served = tmp_path / "served"
    served.mkdir()
    archive = _tarball(photos)
    (served / "images.tar.gz").write_bytes(archive)
    checksum = f"md5:{hashlib.md5(archive).hexdigest()}"
    project = make_project(tmp_path / "urls", {"data.checksum": checksum})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(served)))
    url = f"http://127.0.0.1:{server.server_address[1]}/images.tar.gz"
    (project / "data" / "oxford-iiit-pet.url").write_text(f"# a mirror\n{url}\n")
    with serving(server):
        run_command(["dvc", "repro", "fetch"], project)
    assert len(list((project / "stages/fetch/images").rglob("*.jpg"))) == 6
    assert fetch_status(project) == {}, "dvc status asked the (stopped) server or the URL file changed"

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["checksum"] = "md5:" + "0" * 32
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "fetch" in fetch_status(project), "a changed checksum must rerun fetch"
    params["data"]["checksum"] = checksum
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert fetch_status(project) == {}

    (project / "data" / "oxford-iiit-pet.url").write_text(f"{url}?v=2\n")
    assert "fetch" in fetch_status(project), "a changed URL must rerun fetch"

    params["data"]["source"] = str(photos)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_command(["dvc", "repro", "fetch"], project)
    assert fetch_status(project) == {}
    (photos / "extra.jpg").write_bytes(next(photos.glob("*.jpg")).read_bytes())
    assert "fetch" in fetch_status(project), "a local folder's photos must stay dependencies of fetch"


def test_a_url_file_holds_exactly_one_url(tmp_path):
    source = tmp_path / "mirror.url"
    source.write_text("# a comment\n\n  https://example.invalid/images.tar.gz  \n")
    assert read_url_file(source) == "https://example.invalid/images.tar.gz"
    for text in ("# only a comment\n", "https://a.invalid/x.tar.gz\nhttps://b.invalid/y.tar.gz\n", "/local/path\n"):
        source.write_text(text)
        with pytest.raises(PetpipeError, match=r"a \.url file holds one http\(s\)/s3/gs URL on a line of its own"):
            fetch_source(str(source), None, tmp_path / "images")
    assert not (tmp_path / "images").exists()
