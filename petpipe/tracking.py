"""MLflow tracking: the only module that imports mlflow. (Interface in place; logging lands with issue 5.)

Stages open `stage_run(stage, params=...)` and log through the returned object;
a tracking failure never stops a stage or loses its outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class StageRun:
    """Logs one stage's params, metrics, artifacts and model."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        pass

    def log_artifacts(self, paths: list[Path]) -> None:
        pass

    def log_model(self, model: Any, *, input_example: Any, registered_name: str | None = None) -> None:
        pass


@contextlib.contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any]) -> Iterator[StageRun]:
    yield StageRun()
