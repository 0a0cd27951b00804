"""What counts in a folder of photos: one rule for the junk beside them (hidden files, macOS's __MACOSX),
used by fetch (copying a folder, extracting an archive) and index-labels (scanning the images), and the
count of image files fetch reports."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

# Folders that macOS zips add beside the photos (resource forks, not pictures).
JUNK_NAMES = frozenset({"__MACOSX"})
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_junk(name: str) -> bool:
    """A hidden file or folder (.DS_Store, .git, ._IMG_1.jpg) or a folder macOS adds to zips: never a photo."""
    return name.startswith(".") or name in JUNK_NAMES


def in_junk(relative: PurePosixPath) -> bool:
    """Whether a relative path is junk or lies inside a junk folder (an empty path: nothing to keep).

    '..' counts as hidden, so refuse a path that climbs out before asking this of it.
    """
    return not relative.parts or any(is_junk(part) for part in relative.parts)


def visible_files(root: Path) -> list[Path]:
    """The files under root, relative to it and sorted by posix path, leaving out junk and everything in junk
    folders (os.walk: a symlinked folder is listed, never followed)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not is_junk(name)]
        found.extend((Path(folder) / name).relative_to(root) for name in files if not is_junk(name))
    return sorted(found, key=lambda path: path.as_posix())


def count_images(root: Path) -> int:
    """Image files under root, by extension (os.walk: never loops through a symlinked folder)."""
    return sum(
        1
        for folder, _, files in os.walk(root)
        for name in files
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(folder) / name).is_file()
    )
