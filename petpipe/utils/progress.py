"""What a person watching a stage sees: a progress bar per epoch, on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

Progress = Callable[[Iterator[Any], int], Iterator[Any]]


def progress_bar(description: str) -> Progress:
    """A tqdm bar per epoch, on stderr so stage summaries stay clean on stdout."""
    from tqdm import tqdm

    def wrap(iterator: Iterator[Any], total: int) -> Iterator[Any]:
        return iter(tqdm(iterator, total=total, desc=description, unit="batch", leave=False))

    return wrap


class EpochTable:
    """fastai's per-epoch table: a line per epoch that stays on screen (stderr), beside the bar that vanishes."""

    def __init__(self, stage: str, epochs: int):
        self.stage, self.epochs = stage, epochs
        self.width = len(str(epochs))

    def header(self) -> str:
        return f"{self.stage}: {'epoch':>{2 * self.width + 1}}  train_loss  valid_loss  accuracy    time"

    def line(self, row: dict[str, Any]) -> str:
        def number(key: str, width: int) -> str:
            value = row.get(key)
            return f"{value:{width}.4f}" if isinstance(value, float) else f"{'-':>{width}}"

        epoch = f"{int(row['epoch']):>{self.width}}/{self.epochs}"
        return (
            f"{self.stage}: {epoch}  {number('train_loss', 10)}  {number('valid_loss', 10)}  "
            f"{number('accuracy', 8)}  {row['seconds']:5.1f}s"
        )

    def show(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)
