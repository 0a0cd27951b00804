"""Resume files: the last completed epoch of an interrupted training stage, outside DVC's outputs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from petpipe.atomic import file_digest
from petpipe.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from petpipe.errors import PetpipeError
from petpipe.paths import petpipe_folder

log = logging.getLogger(__name__)


class ResumeFile:
    """A checkpoint with the fit's state after its last completed epoch.

    DVC deletes a stage's outputs before rerunning it, so resume state lives in
    `.petpipe/resume/` at the project root, keyed by everything the result depends on: a rerun with
    other params or inputs starts over instead of resuming a different run.
    """

    def __init__(self, stage: str, *, params: dict[str, Any], inputs: list[Path], root: Path | None = None):
        root = root or petpipe_folder() / "resume"
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
        for path in inputs:
            digest.update(file_digest(path).encode())
        self.path = root / f"{stage}-{digest.hexdigest()[:20]}.pt"

    def load(self) -> Checkpoint | None:
        if not self.path.is_file():
            return None
        try:
            checkpoint = load_checkpoint(self.path)
        except PetpipeError as error:
            log.warning("ignoring unreadable resume file %s (%s)", self.path, error)
            return None
        if checkpoint.resume is None:
            log.warning("ignoring resume file %s: it holds no fit state", self.path)
            return None
        log.info("resuming from %s (epoch %d done)", self.path, checkpoint.resume["epoch"])
        return checkpoint

    def save(self, checkpoint: Checkpoint) -> None:
        save_checkpoint(self.path, checkpoint)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
