"""Where petpipe keeps what runs share: the project root and its .petpipe/ folder (caches, resume files).

DVC sets DVC_ROOT for every stage command: the user's repository, also for queued experiments
(`dvc exp run --queue`), whose commands run in a temporary copy. Keeping caches there lets every
experiment reuse the decoded pixels, downloads and timed levers of the others.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """DVC_ROOT when a stage runs under DVC, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def petpipe_folder() -> Path:
    """<project root>/.petpipe: shared caches and resume files, never a DVC output."""
    return project_root() / ".petpipe"
