"""Write outputs atomically: to a temporary name beside the target, then rename (and hash files).

A killed stage therefore never leaves a half-written file that DVC would cache,
and a failed write never destroys the previous version of the file. The temporary
name carries the writer's host and process id, so the next write of the same
target removes what a killed writer left behind (never a live writer's file).

A write the disk or the permissions refuse (a full disk, a quota, `ulimit -f`, a
read-only folder) becomes one `WriteFailed`: the file, why, the free space left, and
what was kept. This is the one place that says so; callers only add what they kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from petpipe.errors import PetpipeError

# errno -> what it means for a write, in words a user acts on
WRITE_REFUSALS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached (ulimit -f, or the file system's largest file)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NEARLY_FULL = 1 << 20  # bytes: a writer that failed with less than this left has met a full disk


class WriteFailed(PetpipeError):
    """A write the disk or the permissions refused, in one line: the file, why, the free space, what was kept
    and the fix. `kept` starts as the atomic writer's promise; a caller that knows more (a stage's last
    completed epoch) replaces it with `keeping`."""

    def __init__(self, path: Path, code: int, free: int | None, kept: str | None = None):
        self.path, self.code, self.free = Path(path), code, free
        self.kept = kept or f"the previous {self.path.name}, if there was one, is unchanged"
        super().__init__(str(self))

    @property
    def out_of_space(self) -> bool:
        return self.code in SPACE

    def keeping(self, kept: str) -> WriteFailed:
        return WriteFailed(self.path, self.code, self.free, kept)

    def __str__(self) -> str:
        free = f" ({megabytes(self.free)} free)" if self.free is not None else ""
        fix = (
            "free space and rerun dvc repro"
            if self.out_of_space
            else f"make {display(self.path.parent)} writable and rerun dvc repro"
        )
        return f"{WRITE_REFUSALS[self.code]} writing {display(self.path)}{free}; {self.kept}; {fix}"


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count < 1e10 else f"{count / 1e9:.1f} GB"


def display(path: Path) -> str:
    """The path as the user would type it: relative to the working folder when inside it."""
    path = Path(path)
    with contextlib.suppress(ValueError, OSError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path)


def free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write under folder (the nearest existing ancestor), as df shows them."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail  # root may use the reserved blocks
    return blocks * stats.f_frsize


def write_refusal(
    error: BaseException, target: Path, *, free: int | None = None, temporary: Path | None = None
) -> WriteFailed | None:
    """The WriteFailed that `error` means for writing `target`, or None when it is something else.

    An OSError counts when its errno is a refusal and it names no file or the file being written (an
    error reading an input inside the block is that error, not a failed write). Writers that turn the
    OS error into their own (torch's `basic_ios::clear: iostream error`, onnx's) count when the disk
    is full where they were writing: `free` was measured before their temporary file was removed.
    """
    if isinstance(error, OSError) and error.errno in WRITE_REFUSALS:
        named = error.filename
        ours = (
            named is None
            or temporary is None
            or Path(named) == target
            or Path(named).is_relative_to(temporary)
            or Path(named) == temporary.parent
        )
        if ours:
            return WriteFailed(target, error.errno, free_bytes(target.parent))
        return None
    if isinstance(error, (RuntimeError, ValueError)) and free is not None and free < NEARLY_FULL:
        return WriteFailed(target, errno.ENOSPC, free_bytes(target.parent))
    return None


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in target's folder; rename it onto target only if the block succeeds."""
    target = Path(target)
    with _refusals_said(target, None):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        handle, name = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(handle)
    temporary = Path(name)
    try:
        with _refusals_said(target, temporary):
            yield temporary
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _refusals_said(target: Path, temporary: Path | None) -> Iterator[None]:
    """Turn a refused write of target into WriteFailed (once: an inner writer's WriteFailed passes as it is)."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as error:
        free = free_bytes(target.parent) if temporary is not None else None  # before the temporary goes
        refusal = write_refusal(error, target, free=free, temporary=temporary)
        if refusal is None:
            raise
        if temporary is not None:
            _remove(temporary)
            refusal.free = free_bytes(target.parent)  # what the user has now, the temporary's blocks given back
        raise refusal from error


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside target; it replaces target only if the block succeeds."""
    target = Path(target)
    with _refusals_said(target, None):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        temporary = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _refusals_said(target, temporary):
            yield temporary
        if target.exists():
            # Move the old folder aside first so the swap is two renames, never a half-deleted tree.
            retired = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".old", dir=target.parent))
            os.replace(target, retired / "old")
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temporary_prefix(target: Path) -> str:
    """.<name>.<host>-<pid>. : whose temporary file this is, so a later run can tell a dead writer's."""
    return f".{target.name}.{_host_tag()}-{os.getpid()}."


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(target: Path | str) -> list[Path]:
    """Delete the temporary files and folders of target left by killed writers on this host; return them.

    Only names this module makes (`.<name>.<host>-<pid>.<random>.tmp` or `.old`) whose host is this
    one and whose process is gone: a writer still running, or on another machine sharing the
    folder, keeps its file.
    """
    target = Path(target)
    pattern = re.compile(re.escape(f".{target.name}.") + r"([0-9a-f]{8})-(\d+)\.[^/]*\.(?:tmp|old)")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(1) != _host_tag() or _process_alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def reserve(path: Path | str) -> None:
    """Allocate the disk blocks of a file created at its full size (a numpy memmap's, which is sparse).

    A page written through a memory map onto a full disk kills the process with SIGBUS, with no message
    and no chance to clean up; reserving the blocks first turns that into ENOSPC here, before any work.
    """
    with open(path, "r+b") as file:
        size = os.fstat(file.fileno()).st_size
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(file.fileno(), 0, size)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
