"""The three HTML pages of `petpipe serve` (Try it, Results, Clean), rendered by Jinja2 with autoescaping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from petpipe.errors import PetpipeError
from petpipe.interpret import metric_table

HERE = Path(__file__).parent
# Autoescaping is on for .html templates (Starlette's default): class and file names are text, never markup.
templates = Jinja2Templates(directory=HERE / "templates")

# evaluate's figures the Results page shows, by file name (nothing else of that folder is served).
FIGURES = {
    "confusion.png": "Confusion matrix",
    "confusion_normalized.png": "Confusion matrix, rows normalised",
    "top_losses.png": "Top losses (prediction / actual / loss / probability of actual)",
    "test_confusion.png": "Test confusion matrix",
    "test_top_losses.png": "Test top losses",
}
TEST_FIGURES = {"test_confusion.png", "test_top_losses.png"}  # shown when there is a test split
HEADLINE = {metric.name: metric.title for metric in metric_table.HEADLINE}
SPLITS = ("valid", "train")
CLEAN_COUNT = 12  # images per class and split on the Clean page by default (fastai's cleaner: up to 50)
CLEAN_MAX = 100
# The Clean page's views: the audit stage's findings across all classes first, then fastai's cleaner by class.
VIEWS = ("suspects", "duplicates", "class")
AUDIT_COUNT = 24  # suspects or duplicate pairs shown by default


def read_evaluation(folder: Path) -> dict[str, Any]:
    """metrics.json, most_confused.csv, top_losses.csv and the figures present; {} before evaluate has run."""
    folder = Path(folder)
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    per_class = folder / "per_class.csv"  # evaluate's per-class table (an older metrics.json nests it)
    if per_class.is_file():
        rows = pd.read_csv(per_class, dtype={"class": str}, keep_default_na=False)
        metrics["per_class"] = {
            row["class"]: {key: row[key] for key in ("precision", "recall", "f1", "support")}
            for row in rows.to_dict("records")
        }
    tables = {}
    for name in ("most_confused", "top_losses"):
        path = folder / f"{name}.csv"
        tables[name] = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame()
    # The test split's numbers beside valid's (evaluate's test_ metrics), when there is a test split.
    has_test = isinstance(metrics.get("test_accuracy"), float)
    headline = [
        (title, metrics[key], metrics.get("test_" + key) if has_test else None)
        for key, title in HEADLINE.items()
        if isinstance(metrics.get(key), float)
    ]
    figures = {
        name: title
        for name, title in FIGURES.items()
        if (folder / name).is_file() and (has_test or name not in TEST_FIGURES)
    }
    return {"metrics": metrics, "headline": headline, "has_test": has_test, "figures": figures, **tables}


async def try_page(request: Request) -> Response:
    service = request.app.state.service
    settings = service.settings
    return templates.TemplateResponse(
        request,
        "try.html",
        {
            "page": "try",
            "model": settings.model,
            "classes": len(service.predictor.classes),
            "max_upload_bytes": settings.max_upload_bytes,
            "max_upload_mb": f"{settings.max_upload_bytes / 2**20:g}",
        },
    )


async def results_page(request: Request) -> Response:
    folder = request.app.state.service.settings.evaluate
    evaluation = await run_in_threadpool(read_evaluation, folder)
    return templates.TemplateResponse(
        request, "results.html", {"page": "results", "folder": folder, "evaluation": evaluation}
    )


async def clean_page(request: Request) -> Response:
    """The Clean page: the audit's Suspects (all classes, most suspect first) and Duplicates, or fastai's
    ImageClassifierCleaner (one class of one split, highest loss first); a decision per image."""
    query = request.query_params
    view = query.get("view") or ("class" if "label" in query or "split" in query else "suspects")
    if view == "class":
        return await _class_view(request)
    service = request.app.state.service
    count = _count(query.get("count", ""), default=AUDIT_COUNT)
    context: dict[str, Any] = {
        "page": "clean",
        "view": view,
        "count": count,
        "rows": [],
        "pairs": [],
        "error": None,
        "corrections_path": service.settings.corrections,
        "audit_folder": service.settings.audit,
        "audited": False,
    }
    if view not in VIEWS:
        context["error"] = f"choose a view: {', '.join(VIEWS)}"
        return templates.TemplateResponse(request, "clean.html", context, status_code=400)
    try:
        index = await run_in_threadpool(service.cleaner.index)
        corrections = await run_in_threadpool(service.corrections.read)
    except PetpipeError as error:
        context["error"] = str(error)
        return templates.TemplateResponse(request, "clean.html", context, status_code=409)
    table = await run_in_threadpool(read_audit, service.settings.audit, view)
    context["decided"] = _decided(corrections)
    if table is None:
        return templates.TemplateResponse(request, "clean.html", context)
    context["audited"] = True
    labels = dict(zip(index["path"], index["label"]))  # today's labels: the audit may predate a relabel
    if view == "suspects":
        context["issues"] = int(table["issue"].sum())
        suspects = table[table["path"].isin(labels)].head(count)
        classes = service.predictor.classes
        context["rows"] = [_suspect(row, labels[row.path], corrections, classes) for row in suspects.itertuples()]
    else:
        context.update(_duplicates(table, labels, corrections, count))
    return templates.TemplateResponse(request, "clean.html", context)


def _duplicates(table: pd.DataFrame, labels: dict[str, str], corrections: dict[str, Any], count: int) -> dict[str, Any]:
    """The Duplicates view's pairs (both photos still indexed, most similar first) and its count of leaks."""
    pairs = table[table["path_a"].isin(labels) & table["path_b"].isin(labels)].head(count)
    return {
        "leaks": int((table["split_a"] != table["split_b"]).sum()),
        "pairs": [
            {
                "similarity": row.similarity,
                "leak": row.split_a != row.split_b,
                "sides": [
                    _side(row.path_a, row.split_a, labels, corrections),
                    _side(row.path_b, row.split_b, labels, corrections),
                ],
            }
            for row in pairs.itertuples()
        ],
    }


def read_audit(folder: Path, view: str) -> pd.DataFrame | None:
    """The audit stage's label_issues.csv (suspects) or duplicates.csv, in its order; None before the audit ran."""
    path = Path(folder) / ("label_issues.csv" if view == "suspects" else "duplicates.csv")
    if not path.is_file():
        return None
    table = pd.read_csv(
        path,
        keep_default_na=False,
        dtype={name: str for name in ("path", "split", "label", "suggested", "path_a", "path_b", "split_a", "split_b")},
    )
    if view == "suspects":
        table["issue"] = table["issue"].astype(str).str.lower() == "true"
    return table


def _decided(corrections: dict[str, Any]) -> dict[str, int]:
    return {action: sum(c.action == action for c in corrections.values()) for action in ("relabel", "exclude")}


def _chosen(path: str, corrections: dict[str, Any]) -> str:
    """The decision recorded for an image, as the decision select spells it."""
    correction = corrections.get(path)
    if correction is None:
        return "keep"
    return "exclude" if correction.action == "exclude" else f"relabel:{correction.label}"


def _suspect(row: Any, label: str, corrections: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """One suspect: its label today, the audit's suggestion (offered first, one click to accept)."""
    chosen = _chosen(row.path, corrections)
    suggested = row.suggested if row.suggested != label and row.suggested in classes else None
    others = [name for name in classes if name not in (label, suggested) or chosen == f"relabel:{name}"]
    return {
        "path": row.path,
        "split": row.split,
        "label": label,
        "suggested": suggested,
        "quality": float(row.quality),
        "issue": bool(row.issue),
        "chosen": chosen,
        "targets": ([suggested] if suggested else []) + others,
    }


def _side(path: str, split: str, labels: dict[str, str], corrections: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, "split": split, "label": labels[path], "chosen": _chosen(path, corrections)}


async def _class_view(request: Request) -> Response:
    """fastai's ImageClassifierCleaner: one class of one split, highest loss first, a decision per image."""
    service = request.app.state.service
    classes = service.predictor.classes
    split = request.query_params.get("split", "valid")
    label = request.query_params.get("label", classes[0])
    count = _count(request.query_params.get("count", ""))
    context: dict[str, Any] = {
        "page": "clean",
        "view": "class",
        "classes": classes,
        "splits": SPLITS,
        "split": split,
        "label": label,
        "count": count,
        "corrections_path": service.settings.corrections,
        "rows": [],
        "error": None,
    }
    if split not in SPLITS or label not in classes:
        context["error"] = f"choose a split ({', '.join(SPLITS)}) and a class of the model"
        return templates.TemplateResponse(request, "clean.html", context, status_code=400)
    try:
        losses = await run_in_threadpool(service.cleaner.losses, split)
        corrections = await run_in_threadpool(service.corrections.read)
    except PetpipeError as error:
        context["error"] = str(error)
        return templates.TemplateResponse(request, "clean.html", context, status_code=409)
    chosen = losses[losses["label"] == label].head(count)
    context["rows"] = [_row(row, corrections, classes) for row in chosen.itertuples()]
    context["class_sizes"] = losses["label"].value_counts().to_dict()
    context["decided"] = _decided(corrections)
    return templates.TemplateResponse(request, "clean.html", context)


def _count(text: str, default: int = CLEAN_COUNT) -> int:
    return min(int(text), CLEAN_MAX) if text.isdigit() and int(text) > 0 else default


def _row(row: Any, corrections: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """One image of the Clean page: what the model says, the decision recorded, the choices offered."""
    chosen = _chosen(row.path, corrections)
    # Relabelling as its current label is no correction, unless a recorded one made it that label.
    targets = [name for name in classes if name != row.label or chosen == f"relabel:{name}"]
    return {
        "path": row.path,
        "label": row.label,
        "predicted": row.predicted,
        "probability": row.probability,
        "loss": row.loss,
        "chosen": chosen,
        "targets": targets,
    }
