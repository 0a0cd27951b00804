"""How far an archive may inflate: each entry is checked on its declared size before it is written,
and on the bytes it actually writes.

Photos barely compress (JPEG and PNG are compressed already) and none is hundreds of megabytes, so
an entry that declares such a size, or that inflates a hundredfold, is a decompression bomb; and
all entries together must fit on the disk. PETPIPE_MAX_ENTRY_MB and PETPIPE_MAX_RATIO raise the
first two limits for an archive you trust.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from petpipe.errors import PetpipeError

DEFAULT_MAX_ENTRY_MB = 200.0
DEFAULT_MAX_RATIO = 100.0
# Below this an entry, or a whole archive, is never called a bomb whatever its ratio: a small text
# file or a tar's zero padding compresses a thousandfold and fills no disk.
RATIO_FLOOR_BYTES = 1_000_000
# What extraction leaves free on the disk: 1 GB, or a tenth of the free space when less is free.
SPARE_BYTES = 1_000_000_000
BLOCK_BYTES = 4096  # the least a file takes on disk (one filesystem block)
COPY_CHUNK_BYTES = 1 << 20


@dataclass
class Budget:
    """The limits of one archive's extraction into `folder`, and what its entries have declared so far."""

    archive: Path
    archive_bytes: int
    folder: Path
    free_bytes: int
    spare_bytes: int
    max_entry_bytes: int
    max_ratio: float
    declared_bytes: int = 0
    entries: int = 0

    @classmethod
    def for_archive(cls, archive: Path, folder: Path) -> Budget:
        """The limits from the environment, and the disk space free where `folder` is, measured now."""
        free = shutil.disk_usage(folder).free
        return cls(
            archive=archive,
            archive_bytes=archive.stat().st_size,
            folder=folder,
            free_bytes=free,
            spare_bytes=min(SPARE_BYTES, free // 10),
            max_entry_bytes=int(limit_from_environment("PETPIPE_MAX_ENTRY_MB", DEFAULT_MAX_ENTRY_MB) * 1e6),
            max_ratio=limit_from_environment("PETPIPE_MAX_RATIO", DEFAULT_MAX_RATIO, minimum=1.0),
        )

    def admit(self, name: str, size: int, compressed: int | None = None) -> None:
        """Count an entry about to be written (its declared size, and its compressed size where the
        format tells it); refuse it, before anything of it is written, if it breaks a limit."""
        if size > self.max_entry_bytes:
            self._refuse(
                name,
                f"declares {_size(size)}, more than the {_size(self.max_entry_bytes)} that "
                "PETPIPE_MAX_ENTRY_MB allows for one file",
                f"PETPIPE_MAX_ENTRY_MB={math.ceil(size / 1e6)}",
            )
        ratio = size / max(compressed or 0, 1)
        if compressed is not None and size > RATIO_FLOOR_BYTES and ratio > self.max_ratio:
            self._refuse(
                name,
                f"inflates {_size(compressed)} to {_size(size)} ({ratio:,.0f} times), more than "
                f"PETPIPE_MAX_RATIO ({self.max_ratio:g}) allows for photos, which barely compress",
                f"PETPIPE_MAX_RATIO={math.ceil(ratio)}",
            )
        self.declared_bytes += size
        self.entries += 1
        total, ratio = self.declared_bytes, self.declared_bytes / max(self.archive_bytes, 1)
        if total > RATIO_FLOOR_BYTES and ratio > self.max_ratio:
            self._refuse(
                name,
                f"brings what the archive declares to {_size(total)}, {ratio:,.0f} times its "
                f"{_size(self.archive_bytes)}, more than PETPIPE_MAX_RATIO ({self.max_ratio:g}) allows "
                "for photos, which barely compress",
                f"PETPIPE_MAX_RATIO={math.ceil(ratio)}",
            )
        needed, room = total + self.entries * BLOCK_BYTES, self.free_bytes - self.spare_bytes
        if needed > room:
            raise PetpipeError(
                f"refusing to extract {self.archive}: entry {name!r} brings what the archive declares to "
                f"{_size(needed)} on disk, more than the {_size(room)} that {self.folder.parent} can take "
                f"({_size(self.free_bytes)} free, {_size(self.spare_bytes)} kept spare). "
                "Free some space there, then fetch again. Nothing was extracted."
            )

    def copy_entry(self, name: str, source: IO[bytes], file: IO[bytes], declared: int) -> None:
        """Copy an entry's bytes, stopping as soon as it writes more than it declared."""
        written = 0
        while chunk := source.read(COPY_CHUNK_BYTES):
            written += len(chunk)
            if written > declared:
                raise PetpipeError(
                    f"refusing to extract {self.archive}: entry {name!r} inflates past the {_size(declared)} "
                    "its header declares: the archive is damaged, or crafted to hide its size. Nothing was extracted."
                )
            file.write(chunk)

    def _refuse(self, name: str, why: str, setting: str) -> None:
        raise PetpipeError(
            f"refusing to extract {self.archive}: entry {name!r} {why}. If you trust the archive, raise the "
            f"limit, e.g. `{setting} dvc repro`. Nothing was extracted."
        )


def limit_from_environment(variable: str, default: float, minimum: float = 0.0) -> float:
    """A number from the environment, or the default; PetpipeError for one that is not a number."""
    text = os.environ.get(variable, "").strip() or str(default)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value < minimum:
        wanted = f"a number of at least {minimum:g}" if minimum > 0 else "a positive number"
        raise PetpipeError(f"{variable} = {text!r} is not {wanted}; set it to a number such as {default:g}")
    return value


def _size(count: int) -> str:
    return f"{count:,} bytes" if count < 1_000_000 else f"{count / 1e6:,.1f} MB"
