"""Resume files: the last completed epoch of an interrupted training stage, outside DVC's outputs.

Each one has a record beside it (`<name>.json`: its size and SHA-256), so a resume file
that was cut short, extended, overwritten or replaced is ignored with a warning, never resumed from:
torch.load reads a zeroed page of tensor data without complaint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from petpipe.errors import PetpipeError
from petpipe.model.checkpoint import Checkpoint, load_checkpoint, write_checkpoint
from petpipe.utils.atomic import atomic_path
from petpipe.utils.file_formats import file_digest, write_json
from petpipe.utils.paths import petpipe_folder

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
        self.stage, self.params = stage, params
        self.path = root / f"{stage}-{digest.hexdigest()[:20]}.pt"
        self.record = self.path.with_suffix(".json")

    def load(self) -> Checkpoint | None:
        if not self.path.is_file():
            return None
        problem = self._problem()
        if problem is None:
            try:
                checkpoint = load_checkpoint(self.path)
            except PetpipeError as error:
                problem = f"is unreadable ({error})"
            else:
                problem = self._mismatch(checkpoint)
        if problem is not None:
            log.warning("warning: ignoring resume file %s: it %s; training from the first epoch", self.path, problem)
            return None
        log.info("resuming from %s (epoch %d done)", self.path, checkpoint.resume["epoch"])
        return checkpoint

    def _problem(self) -> str | None:
        """What is wrong with the file's bytes against its record, in words; None when they match."""
        try:
            record = json.loads(self.record.read_text())
            size, sha256 = record["bytes"], record["sha256"]
        except FileNotFoundError:
            return "has no record of what was written (cut off while being saved, or saved by an older petpipe)"
        except (OSError, ValueError, TypeError, KeyError) as error:
            return f"has an unreadable record {self.record.name} ({type(error).__name__}: {error})"
        actual = self.path.stat().st_size
        if actual != size:
            return f"is {actual} bytes, its record says {size}"
        if file_digest(self.path) != sha256:
            return "differs from the bytes saved (SHA-256 mismatch)"
        return None

    def _mismatch(self, checkpoint: Checkpoint) -> str | None:
        if checkpoint.resume is None or not isinstance(checkpoint.resume.get("epoch"), int):
            return "holds no fit state"
        if checkpoint.stage != self.stage:
            return f"was saved by {checkpoint.stage}, not {self.stage}"
        if _normalised(checkpoint.params) != _normalised(self.params):
            return "was saved with other params"
        return None

    def save(self, checkpoint: Checkpoint) -> None:
        # The record of the new file is written before the file takes its name: a kill in between leaves the
        # previous file with a record that does not match, so it is ignored, never half-trusted.
        with atomic_path(self.path) as temporary:
            write_checkpoint(temporary, checkpoint)
            write_json(self.record, {"bytes": temporary.stat().st_size, "sha256": file_digest(temporary)})

    def note_stop(self, why: str) -> None:
        """Say in the record why the run stopped (best effort): a record without it was killed by a signal."""
        try:
            record = json.loads(self.record.read_text())
            write_json(self.record, {**record, "stopped": why})
        except (OSError, ValueError, PetpipeError):
            pass

    def stopped_silently(self) -> bool:
        """Whether the run that saved this file ended without a word (a signal: the OOM killer, kill -9)."""
        try:
            return "stopped" not in json.loads(self.record.read_text())
        except (OSError, ValueError):
            return False

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)


def _normalised(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)
