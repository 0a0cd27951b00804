"""audit: find likely label errors and near-duplicates of every indexed image, test included, from train-head's
frozen body features (k-fold heads ranked by cleanlab; petpipe/interpret/data_audit.py).

    petpipe audit --images stages/fetch/images --index stages/index-labels/index.csv \\
        --checkpoint stages/train-head/model.pt --label-issues stages/audit/label_issues.csv \\
        --duplicates stages/audit/duplicates.csv --metrics stages/audit/metrics.json --report stages/audit/report.md
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from petpipe.data.dataset import Dataset
from petpipe.data.views import Views
from petpipe.errors import PetpipeError
from petpipe.interpret import data_audit
from petpipe.model.checkpoint import Checkpoint, load_checkpoint
from petpipe.pipeline import path_option, stage_path
from petpipe.runner import Context, Stage
from petpipe.train.compute import one_process
from petpipe.train.fit_loop import with_features
from petpipe.train.hardware import to_device
from petpipe.utils import timing
from petpipe.utils.file_formats import write_csv, write_json, write_text

STAGE = Stage(
    "audit", params=("train.device", "train.batch_size", "train.seed", "train.augment", "audit"), compute=one_process
)
REPORT_SUSPECTS = 10


@dataclass(frozen=True)
class Inputs:
    images: Path = path_option("fetch's images folder.", at=stage_path("fetch", "images"))
    index: Path = path_option("index-labels' index.csv.", at=stage_path("index-labels", "index.csv"))
    checkpoint: Path = path_option(
        "train-head's model.pt (its frozen body's features: no label has touched them).",
        at=stage_path("train-head", "model.pt"),
    )


@dataclass(frozen=True)
class Outputs:
    label_issues: Path = path_option(
        "label_issues.csv to write: every image's label quality and suggested class, most suspect first.",
        file="label_issues.csv",
        note="the data audit: every image's label quality and suggested class; near-duplicate pairs and leaks",
    )
    duplicates: Path = path_option(
        "duplicates.csv to write: near-duplicate pairs, most similar first.", file="duplicates.csv"
    )
    metrics: Path = path_option(
        "metrics.json to write: the audit's counts (images, label issues, pairs, leaks).",
        file="metrics.json",
        kind="metrics",
    )
    report: Path = path_option(
        "report.md to write: the counts, the most suspect labels and the leaks.", file="report.md"
    )


@dataclass(frozen=True)
class DataAudit:
    """The audit's two tables (label_issues.csv, duplicates.csv) and its counts for metrics.json."""

    label_issues: pd.DataFrame
    duplicates: pd.DataFrame
    counts: dict[str, int]
    similarity: float  # the duplicate threshold
    seconds: float


@STAGE.runs
def run(context: Context, inputs: Inputs, outputs: Outputs) -> str:
    settings = context.params.audit
    audited = None
    if settings.enabled:
        head = load_checkpoint(inputs.checkpoint)
        data = context.dataset(inputs, head.spec, training=False, with_test=True)
        audited = audit_data(head, data, inputs=inputs, context=context)
    write_audit(audited, outputs)
    write_text(outputs.report, "\n".join(render_audit(audited)) + "\n")
    write_json(outputs.metrics, audited.counts if audited else {})
    if audited is not None:  # the time only in MLflow and the summary: metrics.json stays reproducible
        context.log.log_metrics({**audited.counts, "audit_seconds": audited.seconds})
    context.log.log_artifacts([outputs.label_issues, outputs.duplicates, outputs.report, outputs.metrics])
    return _summary(audited) + f" -> {outputs.label_issues}, {outputs.duplicates}"


def _summary(audited: DataAudit | None) -> str:
    if audited is None:
        return "audit: off (audit.enabled: false), its tables hold their header row only"
    counts = audited.counts
    return (
        f"audit of {counts['audit_images']} images in {audited.seconds:.1f} s: "
        f"{counts['audit_label_issues']} likely label issues, {counts['audit_duplicate_pairs']} "
        f"duplicate pairs ({counts['audit_leaks']} across splits, {counts['audit_test_leaks']} of them "
        "test leaks)"
    )


@timing.timed("audit")
def audit_data(head: Checkpoint, data: Dataset, *, inputs: Inputs, context: Context) -> DataAudit:
    """Every indexed image (train, valid, then test) through train-head's frozen body at its evaluation view (features
    no label has touched), then petpipe/interpret/data_audit.py: k-fold heads and cleanlab, and near-duplicate pairs."""
    started = time.perf_counter()
    params, runtime = context.params, context.runtime
    body = to_device(head.model(), runtime.device).eval()
    views = Views.of(head.spec, params.train.augment)
    sets = {"train": data.train, "valid": data.valid, **({"test": data.test} if data.test is not None else {})}
    features = np.concatenate(
        [
            with_features(body, images, batch_size=params.train.batch_size, views=views, precision="float32")
            .features[0]
            .cpu()
            .numpy()
            for images in sets.values()
        ]
    )  # (N, 2C)
    rows = pd.concat([data.rows(split) for split in sets], ignore_index=True)
    labels = torch.cat([images.targets for images in sets.values()]).cpu().numpy()
    if np.bincount(labels).max() < 2:
        raise PetpipeError(
            f"the data audit needs a class with at least 2 images and every class of {inputs.index} "
            "has one; add photos or set audit.enabled: false"
        )
    settings = params.audit
    probabilities = data_audit.out_of_sample_probabilities(
        features, labels, num_classes=len(data.classes), folds=settings.folds, seed=params.train.seed
    )
    issues = data_audit.label_issues_table(rows, data_audit.label_audit(probabilities, labels), list(data.classes))
    duplicates = data_audit.duplicates_table(
        rows, data_audit.near_duplicates(features, threshold=settings.duplicate_similarity)
    )
    return DataAudit(
        issues,
        duplicates,
        data_audit.summary(issues, duplicates),
        settings.duplicate_similarity,
        time.perf_counter() - started,
    )


def write_audit(audited: DataAudit | None, outputs: Outputs) -> None:
    """The audit's tables; with the audit off, their header row alone (DVC expects every declared output)."""
    write_csv(
        outputs.label_issues, audited.label_issues if audited else pd.DataFrame(columns=data_audit.LABEL_ISSUE_COLUMNS)
    )
    write_csv(outputs.duplicates, audited.duplicates if audited else pd.DataFrame(columns=data_audit.DUPLICATE_COLUMNS))


def render_audit(audited: DataAudit | None) -> list[str]:
    """report.md: the counts, the most suspect labels and the leaks."""
    lines = ["# Data audit", ""]
    if audited is None:
        return lines + ["Off (audit.enabled: false)."]
    counts, issues, duplicates = audited.counts, audited.label_issues, audited.duplicates
    lines += [
        f"Every indexed image ({counts['audit_images']}, every split) scored by k-fold heads on "
        "train-head's frozen body features (out-of-sample probabilities, ranked by cleanlab):",
        "",
        f"- {counts['audit_label_issues']} likely label issues (cleanlab's find_label_issues); "
        "`petpipe serve`'s Clean page shows them first, each with its suggested class",
        f"- {counts['audit_duplicate_pairs']} near-duplicate pairs at similarity >= "
        f"{audited.similarity:g}, of which {counts['audit_leaks']} across splits "
        "(leaks: the same photo scored in validation or test after training on it)",
        "",
        f"Most suspect labels (top {REPORT_SUSPECTS}):",
        "",
        "| path | split | label | suggested | quality |",
        "|---|---|---|---|---:|",
    ]
    lines += [
        f"| {row.path} | {row.split} | {row.label} | {row.suggested} | {row.quality:.3f} |"
        for row in issues.head(REPORT_SUSPECTS).itertuples()
    ]
    leaks = duplicates[duplicates["split_a"] != duplicates["split_b"]]
    if len(leaks):
        lines += ["", f"Leaks (top {REPORT_SUSPECTS}):", "", "| path a | path b | similarity |", "|---|---|---:|"]
        lines += [
            f"| {row.path_a} | {row.path_b} | {row.similarity:.3f} |"
            for row in leaks.head(REPORT_SUSPECTS).itertuples()
        ]
    return lines
