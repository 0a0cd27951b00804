"""What a person watching a stage sees: a progress bar per epoch, on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Progress = Callable[[Iterator[Any], int], Iterator[Any]]


def progress_bar(description: str) -> Progress:
    """A tqdm bar per epoch, on stderr so stage summaries stay clean on stdout."""
    from tqdm import tqdm

    def wrap(iterator: Iterator[Any], total: int) -> Iterator[Any]:
        return iter(tqdm(iterator, total=total, desc=description, unit="batch", leave=False))

    return wrap
