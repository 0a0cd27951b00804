"""How outputs are written: JSON, CSV, text and figures (each atomically, petpipe/utils/atomic.py), and file
digests. Unlike the rest of utils/ this module shapes outputs' bytes, so it is a code dependency of the stages
that write with it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from petpipe.utils.atomic import atomic_path


def write_text(target: Path | str, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(target: Path | str, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_csv(target: Path | str, frame: Any) -> None:
    """Write a pandas DataFrame as CSV without its index."""
    with atomic_path(target) as temporary:
        frame.to_csv(temporary, index=False)


def save_figure(target: Path | str, figure: Any, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(target) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (archives and checkpoints are large)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
