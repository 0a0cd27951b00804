"""The web app of `petpipe serve` (Starlette): its routes, the upload checks and the server's socket."""

from __future__ import annotations

import io
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from petpipe.data.pixels import refuse_decompression_bomb
from petpipe.errors import PetpipeError
from petpipe.inference.predict import Predictor, classify, decode_pixels, load_predictor
from petpipe.interpret.metric_table import TOP_K
from petpipe.serve import pages
from petpipe.serve.cleaner import DECISIONS, Cleaner, CorrectionsFile, counts

HERE = Path(__file__).parent
MB = 2**20
THUMBNAIL = 224  # px, the long side of the Clean page's images


@dataclass(frozen=True)
class ServeSettings:
    """What `petpipe serve` reads and writes; paths as the CLI options give them."""

    model: Path
    index: Path
    images: Path
    evaluate: Path
    audit: Path  # the audit stage's folder: label_issues.csv and duplicates.csv (the Clean page's Suspects, Duplicates)
    corrections: Path
    max_upload_bytes: int


class UploadError(Exception):
    """A photo the page refuses, with the HTTP status and the message shown beside it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Service:
    """The loaded model and the files the pages read; one instance per server."""

    def __init__(self, settings: ServeSettings, predictor: Predictor):
        self.settings = settings
        self.predictor = predictor
        lock = threading.Lock()
        self.lock = lock
        self.cleaner = Cleaner(predictor, index=settings.index, images=settings.images, lock=lock)
        self.corrections = CorrectionsFile(settings.corrections)

    def predict_bytes(self, body: bytes, name: str) -> list[dict[str, Any]]:
        """Top-5 (label, probability) of one uploaded photo, decoded exactly as `petpipe predict` does."""
        try:
            pixels = decode_pixels(body, self.predictor.presize)  # (3, P, P)
        except UnidentifiedImageError:
            raise UploadError(415, f"{name}: not an image (no image format recognised)") from None
        except Image.DecompressionBombError:
            raise UploadError(413, f"{name}: too many pixels (over {Image.MAX_IMAGE_PIXELS:,})") from None
        except Exception as error:  # noqa: BLE001  (any decoder failure: say so, keep serving)
            raise UploadError(415, f"{name}: cannot read image ({type(error).__name__}: {error})") from None
        with self.lock:
            (labels,) = classify(self.predictor, [pixels], top_k=TOP_K)
        return [{"label": label, "probability": probability} for label, probability in labels]

    def thumbnail(self, relative: str) -> bytes | None:
        """A JPEG of an indexed image, from inside the images folder only; None for anything else."""
        if relative not in set(self.cleaner.index()["path"]):
            return None
        folder = self.settings.images.resolve()
        target = (folder / relative).resolve()
        if not target.is_relative_to(folder) or not target.is_file():  # a link out of the folder, or gone
            return None
        with Image.open(target) as image:
            refuse_decompression_bomb(image)
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))
            picture = ImageOps.exif_transpose(image).convert("RGB")
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=85)
        return out.getvalue()


# ---------------------------------------------------------------- routes


async def read_upload(request: Request, limit: int, name: str) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (never read whole first)."""
    too_large = UploadError(413, f"{name}: larger than the {limit / MB:g} MB limit (petpipe serve --max-upload-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body:
        raise UploadError(400, f"{name}: empty file")
    return bytes(body)


async def predict_endpoint(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    name = request.query_params.get("name", "photo")[:200]
    try:
        body = await read_upload(request, service.settings.max_upload_bytes, name)
        predictions = await run_in_threadpool(service.predict_bytes, body, name)
    except UploadError as error:
        return JSONResponse({"name": name, "error": str(error)}, status_code=error.status)
    return JSONResponse({"name": name, "predictions": predictions})


async def corrections_endpoint(request: Request) -> JSONResponse:
    """Record one Clean-page decision: {"path", "decision": keep|relabel|exclude, "label"}."""
    service: Service = request.app.state.service
    # JSON only: a cross-site form cannot send it without a CORS preflight, which this server never grants.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return JSONResponse({"error": "send the decision as application/json"}, status_code=415)
    try:
        decision = await request.json()
        path, action, label = str(decision["path"]), str(decision["decision"]), str(decision.get("label", ""))
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": 'expected {"path": ..., "decision": ..., "label": ...}'}, status_code=400)
    try:
        refusal = _refuse_decision(service, path, action, label)
        if refusal:
            return JSONResponse({"error": refusal}, status_code=400)
        corrections = await run_in_threadpool(service.corrections.decide, path, action, label)
    except PetpipeError as error:
        return JSONResponse({"error": str(error)}, status_code=409)
    done = counts(corrections)
    what = {"keep": "kept as labelled", "exclude": "excluded", "relabel": f"relabelled as {label}"}[action]
    return JSONResponse(
        {
            "path": path,
            "decision": action,
            "label": label,
            **done,
            "message": f"{path}: {what}. {service.settings.corrections} now relabels {done['relabel']} "
            f"and excludes {done['exclude']} image(s); commit it and run dvc repro to retrain.",
        }
    )


def _refuse_decision(service: Service, path: str, action: str, label: str) -> str | None:
    if action not in DECISIONS:
        return f"decision must be one of {', '.join(DECISIONS)}, got {action!r}"
    if action == "relabel" and label not in service.predictor.classes:
        return f"{label!r} is not a class of the model"
    if path not in set(service.cleaner.index()["path"]):
        return f"{path!r} is not an image of {service.settings.index}"
    return None


async def image_endpoint(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        picture = await run_in_threadpool(service.thumbnail, request.path_params["path"])
    except (PetpipeError, OSError, Image.DecompressionBombError):
        picture = None
    if picture is None:
        return Response("not an image of the index", status_code=404, media_type="text/plain")
    return Response(picture, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})


async def figure_endpoint(request: Request) -> Response:
    name = request.path_params["name"]
    path = Path(request.app.state.service.settings.evaluate) / name
    if name not in pages.FIGURES or not path.is_file():
        return Response("no such figure", status_code=404, media_type="text/plain")
    return Response(await run_in_threadpool(path.read_bytes), media_type="image/png")


# ---------------------------------------------------------------- the app and its server


def create_app(settings: ServeSettings, *, host: str = "127.0.0.1") -> Starlette:
    """The app, with the model loaded (so a wrong --model fails before the server starts)."""
    service = Service(settings, load_predictor(settings.model))
    # Only requests addressed to this server's own name: a DNS-rebinding page cannot write corrections.
    hosts = ["*"] if host in ("0.0.0.0", "::", "") else [host, "127.0.0.1", "localhost", "[::1]"]
    routes = [
        Route("/", pages.try_page),
        Route("/results", pages.results_page),
        Route("/clean", pages.clean_page),
        Route("/api/predict", predict_endpoint, methods=["POST"]),
        Route("/api/corrections", corrections_endpoint, methods=["POST"]),
        Route("/image/{path:path}", image_endpoint),
        Route("/figure/{name}", figure_endpoint),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
    app.state.service = service
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: any free one), so a port in use is one clear error and the
    address printed before uvicorn starts already takes connections (they wait in the backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog; uvicorn listens on it again, which changes nothing
    except OSError as error:
        sock.close()
        raise PetpipeError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); pass another --port (or --host)"
        ) from None
    return sock


def run_server(app: Starlette, sock: socket.socket) -> None:
    """Serve until Ctrl-C (or SIGTERM); uvicorn logs only warnings and errors."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
