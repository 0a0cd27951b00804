"""fetch: put the raw photos named by data.source (URL, archive, folder or a list of image URLs) into one folder.

petpipe fetch --out stages/fetch/images --downloads stages/fetch/downloads.csv
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petpipe.data.image_downloads import Settings
from petpipe.data.sources import fetch_source, fetch_url_list, write_report
from petpipe.data.url_lists import is_url_list
from petpipe.errors import PetpipeError
from petpipe.pipeline import Dep, path_option
from petpipe.runner import Context, Stage

STAGE = Stage(
    "fetch",
    params=("data",),
    deps=(
        Dep(
            "${data.source}",
            note="the photos of a local data.source, the URL list (the file or folder itself: editing it reruns "
            "fetch, the URLs are never asked), or the .url file naming the default archive (hashed locally: no "
            "network needed; data.checksum pins the bytes); for a URL as data.source, DVC asks for its ETag",
        ),
    ),
)


@dataclass(frozen=True)
class Inputs:
    """fetch reads nothing from earlier stages: data.source says where the photos are."""


@dataclass(frozen=True)
class Outputs:
    images: Path = path_option("Folder to fill with the raw images.", option="--out", file="images")
    downloads: Path | None = path_option(
        "CSV of a URL list's downloads: url,label,status,file,reason, a row per "
        "URL (a header alone for any other data.source).",
        optional=True,
        file="downloads.csv",
        note="a URL list's report: a row per URL (downloaded, present, duplicate or failed, and why)",
    )


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    data = context.params.data
    if not is_url_list(data.source):
        count = fetch_source(data.source, data.checksum, outputs.images)
        if outputs.downloads is not None:
            write_report(outputs.downloads, [])
        context.log.log_metrics({"images": count})
        return f"fetched {count} images into {outputs.images}"
    if outputs.downloads is None:
        raise PetpipeError(
            f"data.source {data.source} is a URL list: pass --downloads <file.csv> for the report of "
            "its downloads (dvc.yaml passes stages/fetch/downloads.csv)"
        )
    settings = Settings(
        workers=data.download_workers, timeout=data.download_timeout, max_bytes=int(data.download_max_mb * 1024 * 1024)
    )
    tally = fetch_url_list(data.source, settings, outputs.images, outputs.downloads)
    context.log.log_metrics(tally.metrics())
    context.log.log_artifacts([outputs.downloads])
    return (
        f"fetched {tally.kept} images into {outputs.images} from {len(tally.rows)} URLs: {tally.summary()}; "
        f"each URL's outcome in {outputs.downloads}"
    )
