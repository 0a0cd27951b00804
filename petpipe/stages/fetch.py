"""fetch: put the raw photos named by data.source (URL, archive or folder) into one folder.

    petpipe fetch --out stages/fetch/images
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe.fetch import fetch_source
from petpipe.pipeline import path_option
from petpipe.runner import Context, Stage

STAGE = Stage("fetch", params=("data",))


@dataclass(frozen=True)
class Inputs:
    """fetch reads nothing from earlier stages: data.source says where the photos are."""


@dataclass(frozen=True)
class Outputs:
    images: Path = path_option("Folder to fill with the raw images.", option="--out")


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    count = fetch_source(context.params.data.source, context.params.data.checksum, outputs.images)
    context.log.log_metrics({"images": count})
    return f"fetched {count} images into {outputs.images}"
