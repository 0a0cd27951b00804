"""fetch: put the raw photos named by data.source (URL, archive or folder) into one folder.

    petpipe fetch --out stages/fetch/images
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe import tracking
from petpipe.fetch import fetch_source
from petpipe.params import Params
from petpipe.stages import path_option

STAGE = "fetch"
PARAMS = ("data",)


@dataclass(frozen=True)
class Inputs:
    """fetch reads nothing from earlier stages: data.source says where the photos are."""


@dataclass(frozen=True)
class Outputs:
    images: Path = path_option("Folder to fill with the raw images.", option="--out")


def run(params: Params, inputs: Inputs, outputs: Outputs) -> str:
    with tracking.stage_run(STAGE, params=params.select(PARAMS), settings=params) as run_log:
        count = fetch_source(params.data.source, params.data.checksum, outputs.images)
        run_log.log_metrics({"images": count})
    return f"fetched {count} images into {outputs.images}"
