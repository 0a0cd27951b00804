"""A bounded load test on loopback: `petpipe serve` and `mlflow models serve` under concurrent clients.

Run it in a project whose pipeline has run (stages/finetune/model.pt, and the model finetune registered in
MLflow): each server is started on 127.0.0.1, warmed with one request, then `--clients` threads send
`--requests` photos between them (one photo per request, the photos taken in turn). Every answer is checked
against `petpipe predict` on the same file, so a request lost, failed or answered with another image's breed
is counted, not hidden. Reports throughput, p50/p95/max latency and the server's peak memory (RSS of the
server process and its children).

    python benchmarks/load.py --project . --images stages/fetch/images --out benchmarks/load.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Expected:
    """What `petpipe predict` says of one photo: the breed and its probability."""

    photo: Path
    label: str
    probability: float


def expected_answers(model: Path, photos: list[Path]) -> dict[str, Expected]:
    from petpipe.inference.predict import load_predictor, predict_files

    predictor = load_predictor(model, device="cpu")
    answers = {}
    for prediction in predict_files(predictor, photos, top_k=1):
        label, probability = prediction.labels[0]
        answers[Path(prediction.path).name] = Expected(Path(prediction.path), label, probability)
    return answers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on 127.0.0.1; its peak RSS sampled (with its children's) while it runs."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.process.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def wait_until(self, url: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{url} not up after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self._stop.set()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_petpipe(project: Path, log: Path) -> tuple[Server, str]:
    server = Server([str(BIN / "petpipe"), "serve", "--port", "0"], project, dict(os.environ), log)
    deadline = time.monotonic() + 300
    while not (match := re.search(r"petpipe serve: (http://\S+)/", log.read_text())):
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"petpipe serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    base = match.group(1)
    server.wait_until(base + "/")
    return server, base


def start_mlflow(project: Path, model_uri: str, log: Path) -> tuple[Server, str]:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # mlflow runs `uvicorn` from the PATH
    command = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    server = Server(command, project, env, log)
    base = f"http://127.0.0.1:{port}"
    server.wait_until(base + "/ping")
    return server, base


def ask_petpipe(session: requests.Session, base: str, photo: Path) -> tuple[str, float]:
    response = session.post(
        f"{base}/api/predict",
        params={"name": photo.name},
        data=photo.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    response.raise_for_status()
    answer = response.json()
    if answer["name"] != photo.name:
        raise AssertionError(f"asked about {photo.name}, answered about {answer['name']}")
    best = answer["predictions"][0]
    return best["label"], best["probability"]


def ask_mlflow(session: requests.Session, base: str, photo: Path) -> tuple[str, float]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo.read_bytes()).decode()]]}}
    response = session.post(f"{base}/invocations", json=body, timeout=120)
    response.raise_for_status()
    row = response.json()["predictions"][0]
    if row["error"]:
        raise AssertionError(row["error"])
    return row["label"], row["probability"]


def load(ask, base: str, answers: dict[str, Expected], clients: int, total: int) -> dict:
    """`total` requests from `clients` threads, each answer checked against its own photo's prediction."""
    photos = [answers[name].photo for name in sorted(answers)]
    local = threading.local()
    failures: list[str] = []

    def one(number: int) -> float:
        photo = photos[number % len(photos)]
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        start = time.perf_counter()
        try:
            label, probability = ask(session, base, photo)
        except (requests.RequestException, AssertionError, KeyError, ValueError) as error:
            failures.append(f"{photo.name}: {type(error).__name__}: {error}")
            return time.perf_counter() - start
        seconds = time.perf_counter() - start
        want = answers[photo.name]
        if label != want.label or abs(probability - want.probability) > 1e-4:
            failures.append(
                f"{photo.name}: answered {label} {probability:.5f}, expected {want.label} {want.probability:.5f}"
            )
        return seconds

    ask(requests.Session(), base, photos[0])  # warm: the first request pays for lazy set-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(total)))
    wall = time.perf_counter() - started
    return {
        "requests": total,
        "clients": clients,
        "wall_s": round(wall, 2),
        "requests_per_s": round(total / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1),
        "max_ms": round(1000 * latencies[-1], 1),
        "failed_or_mismatched": len(failures),
        "failures": failures[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="a project whose pipeline has run")
    parser.add_argument("--images", type=Path, default=None, help="photos to send (default: fetch's images)")
    parser.add_argument("--photos", type=int, default=40, help="distinct photos, sent in turn")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--servers", nargs="+", choices=["petpipe", "mlflow"], default=["petpipe", "mlflow"])
    parser.add_argument(
        "--mlflow-model",
        default="models:/petpipe-classifier/latest",
        help="model URI for mlflow models serve (MLFLOW_TRACKING_URI, default the project's)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args()

    project = args.project.resolve()
    images = (args.images or project / "stages/fetch/images").resolve()
    photos = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = photos[:: max(1, len(photos) // args.photos)][: args.photos]
    answers = expected_answers(project / "stages/finetune/model.pt", photos)
    logs = project / ".petpipe" / "load-test"
    logs.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpu": platform.processor() or _cpu_model(), "cores": os.cpu_count()}, "photos": len(photos)}
    for name in args.servers:
        if name == "petpipe":
            server, base = start_petpipe(project, logs / "petpipe.log")
            ask = ask_petpipe
        else:
            if shutil.which("mlflow", path=str(BIN)) is None:
                raise SystemExit("mlflow is not installed in this environment")
            server, base = start_mlflow(project, args.mlflow_model, logs / "mlflow.log")
            ask = ask_mlflow
        try:
            result = load(ask, base, answers, args.clients, args.requests)
        finally:
            server.stop()
        result["server_peak_rss_mb"] = round(server.peak_rss / 2**20)
        results[name] = result
        print(
            f"{name:8s} {result['requests_per_s']:6.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
            f"p95 {result['p95_ms']:7.1f} ms  peak RSS {result['server_peak_rss_mb']} MB  "
            f"failed or mismatched {result['failed_or_mismatched']}/{result['requests']}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if any(results[name]["failed_or_mismatched"] for name in args.servers):
        raise SystemExit("some requests failed or were answered with another photo's breed (see failures)")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
