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

HERE = Path(__file__).parent
# Autoescaping is on for .html templates (Starlette's default): class and file names are text, never markup.
templates = Jinja2Templates(directory=HERE / "templates")

# evaluate's figures the Results page shows, by file name (nothing else of that folder is served).
FIGURES = {"confusion.png": "Confusion matrix", "confusion_normalized.png": "Confusion matrix, rows normalised",
           "top_losses.png": "Top losses (prediction / actual / loss / probability of actual)"}
HEADLINE = {"accuracy": "accuracy", "error_rate": "error rate", "top5_accuracy": "top-5 accuracy",
            "loss": "loss (cross-entropy)", "macro_f1": "macro F1"}
SPLITS = ("valid", "train")
CLEAN_COUNT = 12  # images per class and split on the Clean page by default (fastai's cleaner: up to 50)
CLEAN_MAX = 100


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
        metrics["per_class"] = {row["class"]: {key: row[key] for key in ("precision", "recall", "f1", "support")}
                                for row in rows.to_dict("records")}
    tables = {}
    for name in ("most_confused", "top_losses"):
        path = folder / f"{name}.csv"
        tables[name] = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame()
    headline = [(title, metrics[key]) for key, title in HEADLINE.items() if isinstance(metrics.get(key), float)]
    return {"metrics": metrics, "headline": headline, "figures": {name: title for name, title in FIGURES.items()
                                                                  if (folder / name).is_file()}, **tables}


async def try_page(request: Request) -> Response:
    service = request.app.state.service
    settings = service.settings
    return templates.TemplateResponse(request, "try.html", {
        "page": "try", "model": settings.model, "classes": len(service.predictor.classes),
        "max_upload_bytes": settings.max_upload_bytes, "max_upload_mb": f"{settings.max_upload_bytes / 2**20:g}",
    })


async def results_page(request: Request) -> Response:
    folder = request.app.state.service.settings.evaluate
    evaluation = await run_in_threadpool(read_evaluation, folder)
    return templates.TemplateResponse(request, "results.html", {"page": "results", "folder": folder,
                                                                "evaluation": evaluation})


async def clean_page(request: Request) -> Response:
    """fastai's ImageClassifierCleaner: one class of one split, highest loss first, a decision per image."""
    service = request.app.state.service
    classes = service.predictor.classes
    split = request.query_params.get("split", "valid")
    label = request.query_params.get("label", classes[0])
    count = _count(request.query_params.get("count", ""))
    context: dict[str, Any] = {"page": "clean", "classes": classes, "splits": SPLITS, "split": split,
                               "label": label, "count": count, "corrections_path": service.settings.corrections,
                               "rows": [], "error": None}
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
    context["decided"] = {action: sum(c.action == action for c in corrections.values())
                          for action in ("relabel", "exclude")}
    return templates.TemplateResponse(request, "clean.html", context)


def _count(text: str) -> int:
    return min(int(text), CLEAN_MAX) if text.isdigit() and int(text) > 0 else CLEAN_COUNT


def _row(row: Any, corrections: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """One image of the Clean page: what the model says, the decision recorded, the choices offered."""
    correction = corrections.get(row.path)
    if correction is None:
        chosen = "keep"
    else:
        chosen = "exclude" if correction.action == "exclude" else f"relabel:{correction.label}"
    # Relabelling as its current label is no correction, unless a recorded one made it that label.
    targets = [name for name in classes if name != row.label or chosen == f"relabel:{name}"]
    return {"path": row.path, "label": row.label, "predicted": row.predicted, "probability": row.probability,
            "loss": row.loss, "chosen": chosen, "targets": targets}
