"""Benchmark: fetch of a URL list of 1,000 small photos served on 127.0.0.1, on 2 CPU cores.

The photos are the sample's, resized to --size px and each made distinct (a pixel changed per copy, so that
none is a duplicate by content); an http.server in a process of its own serves them. fetch's own path runs
(petpipe.data.sources.fetch_url_list: the download workers, decoding each photo to check it, the content hashes,
the label folders and downloads.csv), first into an empty download cache, then again with every photo in
the cache (a rerun after a line was added asks only for what is missing). Both the server and fetch are
pinned to --cores cores. The CPU time of each is reported beside the wall time: on a machine shared with
other work the wall time grows with the load, the CPU time hardly.

    python benchmarks/downloads.py --out benchmarks/downloads.json
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "pets-sample" / "images"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve(folder: str, port: multiprocessing.Queue, cores: set[int]) -> None:
    os.sched_setaffinity(0, cores)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    port.put(server.server_address[1])
    server.serve_forever()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def make_photos(folder: Path, count: int, size: int) -> list[str]:
    """count distinct JPEGs of size px made from the sample's photos; their names."""
    from PIL import Image

    sources = sorted(SAMPLE.glob("*.jpg"))
    names = []
    for number in range(count):
        with Image.open(sources[number % len(sources)]) as photo:
            small = photo.convert("RGB").resize((size, size))
        small.putpixel((0, 0), (number % 256, number // 256 % 256, 7))  # distinct content, not a duplicate
        name = f"{number:05d}.jpg"
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=90)
        (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def write_lists(folder: Path, base: str, names: list[str], classes: int) -> None:
    """fastai's layout: one <class>.txt per class, a URL a line."""
    folder.mkdir()
    for label in range(classes):
        urls = [f"{base}/{name}" for name in names[label::classes]]
        (folder / f"class{label}.txt").write_text("\n".join(urls) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="side of the served photos, in px")
    parser.add_argument("--workers", type=int, default=16, help="data.download_workers (params.yaml's default)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from petpipe.data.image_downloads import Settings
    from petpipe.data.sources import fetch_url_list

    cores = set(sorted(os.sched_getaffinity(0))[: args.cores])
    os.sched_setaffinity(0, cores)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        served = scratch / "served"
        served.mkdir()
        names = make_photos(served, args.count, args.size)
        ports: multiprocessing.Queue = multiprocessing.Queue()
        server = multiprocessing.Process(target=serve, args=(str(served), ports, cores), daemon=True)
        server.start()
        try:
            base = f"http://127.0.0.1:{ports.get(timeout=30)}"
            write_lists(scratch / "urls", base, names, classes=4)
            os.environ["PETPIPE_DOWNLOAD_DIR"] = str(scratch / "downloads")
            settings = Settings(workers=args.workers, timeout=30, max_bytes=20 << 20)
            timings, cpu = {}, {}
            serving = psutil.Process(server.pid)
            for run in ("cold", "warm"):
                started, fetch_cpu, server_cpu = time.perf_counter(), time.process_time(), _cpu(serving)
                tally = fetch_url_list(
                    str(scratch / "urls"), settings, scratch / run / "images", scratch / run / "downloads.csv"
                )
                timings[run] = time.perf_counter() - started
                cpu[run] = (time.process_time() - fetch_cpu, _cpu(serving) - server_cpu)
                expected = "downloaded" if run == "cold" else "present"
                assert tally.counts[expected] == args.count, tally.summary()
        finally:
            server.terminate()
    result = {
        "photos": args.count,
        "size_px": args.size,
        "workers": args.workers,
        "cores": sorted(cores),
        "cold_seconds": round(timings["cold"], 2),
        "photos_per_second": round(args.count / timings["cold"], 1),
        "warm_seconds": round(timings["warm"], 2),
        # CPU time (user + system) of fetch's process and of the server's: what the wall time is made of when
        # the cores are not shared with other work.
        "cold_cpu_seconds": {"fetch": round(cpu["cold"][0], 2), "server": round(cpu["cold"][1], 2)},
        "warm_cpu_seconds": {"fetch": round(cpu["warm"][0], 2), "server": round(cpu["warm"][1], 2)},
        "load_average_after": [round(load, 2) for load in os.getloadavg()],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus_online": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
