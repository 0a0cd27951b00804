"""What DVC itself does with special files in a local data.source folder, which it hashes before petpipe runs
(docs/reliability.md, "What DVC cannot survive"). These pin DVC's behaviour, not petpipe's: if a DVC upgrade
changes one, the doc's table must change with it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import copy_subset

DVC_YAML = "stages:\n  fetch:\n    cmd: echo ran\n    deps:\n      - photos\n"


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }


def dvc(folder: Path, *arguments: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run `dvc <arguments>` (after `prefix`, e.g. setpriv) in folder; the result whatever its status."""
    return subprocess.run(
        [*prefix, "dvc", *arguments], cwd=folder, env=environment(), capture_output=True, text=True, timeout=120
    )


def project_with(tmp_path: Path, sample_images: Path, make_special) -> Path:
    """A DVC project whose one stage depends on a folder of two photos and one special file."""
    folder = tmp_path / "project"
    copy_subset(sample_images, folder / "photos", breeds=1, per_breed=2)
    make_special(folder / "photos")
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    assert dvc(folder, "init", "-q").returncode == 0
    (folder / "dvc.yaml").write_text(DVC_YAML)
    return folder


def test_a_named_pipe_hangs_dvc_status(tmp_path, sample_images):
    folder = project_with(tmp_path, sample_images, lambda photos: os.mkfifo(photos / "pipe.jpg"))
    process = subprocess.Popen(
        ["dvc", "status"], cwd=folder, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=8)  # a sample folder hashes in about a second: 8 s is a hang
    finally:
        process.send_signal(signal.SIGINT)  # what a person does: Ctrl-C
        process.communicate(timeout=30)
    shutil.rmtree(folder / "photos")  # the fix the doc gives: remove the special file
    (folder / "photos").mkdir()
    assert dvc(folder, "status").returncode == 0


def test_a_dangling_symlink_stops_dvc_at_once(tmp_path, sample_images):
    folder = project_with(tmp_path, sample_images, lambda photos: (photos / "gone.jpg").symlink_to("/nonexistent.jpg"))
    result = dvc(folder, "status")
    assert result.returncode != 0
    assert "[Errno 2] No such file or directory" in result.stderr and "gone.jpg" in result.stderr


def _bind_socket(photos: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(photos / "sock"))
    server.close()  # the socket file stays


def test_a_socket_stops_dvc_at_once(tmp_path, sample_images):
    folder = project_with(tmp_path, sample_images, _bind_socket)
    result = dvc(folder, "status")
    assert result.returncode != 0
    assert "[Errno 6] No such device or address" in result.stderr and "sock" in result.stderr


def _locked_copy(photos: Path) -> None:
    locked = photos / "locked.jpg"
    shutil.copy(next(photos.glob("*.jpg")), locked)
    locked.chmod(0)


def test_an_unreadable_file_stops_dvc_unless_run_by_root(tmp_path, sample_images):
    folder = project_with(tmp_path, sample_images, _locked_copy)
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run as root without CAP_DAC_OVERRIDE, as a normal user")
    # First as a normal user (root without the capabilities that let it read any file): DVC's state database
    # would otherwise remember the hash root computed, and never open the file again.
    capabilities = "-dac_override,-dac_read_search"
    prefix = (setpriv, f"--inh-caps={capabilities}", f"--bounding-set={capabilities}") if os.geteuid() == 0 else ()
    as_a_user = dvc(folder, "status", prefix=prefix)
    assert as_a_user.returncode != 0
    assert "[Errno 13] Permission denied" in as_a_user.stderr and "locked.jpg" in as_a_user.stderr
    if os.geteuid() == 0:
        as_root = dvc(folder, "status")
        assert as_root.returncode == 0, as_root.stderr  # root reads a mode-000 file, and DVC hashes it
