"""Where a stage's seconds went: each phase timed where it happens, one line when the stage ends.

    with timing.stage("train-head") as seconds:       # petpipe/runner.py, around every stage's body
        with timing.phase("decode"):                  # anywhere below it, nothing passed down
            ...
    seconds.line()
    # train-head: 13.7 s = decode 1.0, levers 2.1, features 7.2, epochs 0.2, validation 0.1, write 0.6,
    #   other 2.5 (after 3.1 s of start-up: Python, imports, DVC)

A phase inside another counts for the inner one alone; outside a stage, `phase` times nothing. Torch-free.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class StageSeconds:
    """One stage's seconds: its phases' own time (nested phases excluded), its total, and the process's start-up
    before it (interpreter, imports and whatever launched it: DVC, torchrun)."""

    name: str
    started: float = field(default_factory=time.perf_counter)
    startup: float | None = None  # set where the process is the stage's command (petpipe/cli.py)
    seconds: dict[str, float] = field(default_factory=dict)
    _open: list[list[float]] = field(default_factory=list)  # [start, time spent in inner phases] per open phase

    def total(self) -> float:
        return time.perf_counter() - self.started

    def line(self) -> str:
        total = self.total()
        parts = [f"{name} {value:.1f}" for name, value in self.seconds.items()]
        other = total - sum(self.seconds.values())
        parts.append(f"other {max(other, 0.0):.1f}")
        after = f" (after {self.startup:.1f} s of start-up: Python, imports, DVC)" if self.startup is not None else ""
        return f"{self.name}: {total:.1f} s = {', '.join(parts)}{after}"

    def metrics(self) -> dict[str, float]:
        """For the stage's MLflow run: seconds_<phase> and seconds_total."""
        return {
            **{f"seconds_{name.replace(' ', '_')}": value for name, value in self.seconds.items()},
            "seconds_total": self.total(),
        }


_current: contextvars.ContextVar[StageSeconds | None] = contextvars.ContextVar("petpipe_stage_seconds", default=None)


@contextlib.contextmanager
def stage(name: str, *, command: bool = False) -> Iterator[StageSeconds]:
    """Time the stage `name`: the phases below it add to what this yields. command: this process was started
    to run it (`petpipe train-head`), so its age is the stage's start-up."""
    seconds = StageSeconds(name, startup=process_age() if command else None)
    token = _current.set(seconds)
    try:
        yield seconds
    finally:
        _current.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's seconds to the running stage's phase `name` (less those of phases inside it)."""
    seconds = _current.get()
    if seconds is None:
        yield
        return
    opened = [time.perf_counter(), 0.0]
    seconds._open.append(opened)
    try:
        yield
    finally:
        seconds._open.pop()
        elapsed = time.perf_counter() - opened[0]
        seconds.seconds[name] = seconds.seconds.get(name, 0.0) + elapsed - opened[1]
        if seconds._open:
            seconds._open[-1][1] += elapsed


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def timed(name: str) -> Callable[[F], F]:
    """The decorated function's calls as the phase `name`."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
