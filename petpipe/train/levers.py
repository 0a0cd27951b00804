"""Speed levers chosen by the machine: training precision, memory format and threads.

bfloat16, channels_last and the thread count help on some CPUs and hurt on
others (bfloat16 without AMX or AVX-512 BF16 is emulated and slow; even with
AMX it lost at 64 px). `auto` decides from what the device supports and, where
that leaves a choice, from a few timed training steps at the run's own image
size, once per machine, model and size: the choice is kept in
`<pixel cache>/levers.json` and reused by every later stage and run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from petpipe.data.dataset import ImageSet
from petpipe.data.pixels import default_cache_dir
from petpipe.data.views import Views
from petpipe.model.backbones import Classifier
from petpipe.params import TrainParams
from petpipe.train.hardware import (
    MEMORY_FORMATS,
    Levers,
    Runtime,
    autocast,
    available_cores,
    cpu_flags,
    cpu_name,
    cpu_runs_bfloat16,
)
from petpipe.utils import timing
from petpipe.utils.file_formats import write_json

log = logging.getLogger(__name__)

PROBE_IMAGES = 8  # a small batch at the run's image size: seconds, not minutes
PROBE_STEPS = 2  # timed, after one untimed warm-up step
ORDER = ("threads", "memory_format", "precision")  # greedy: each lever timed with the best of the ones before


def candidates(runtime: Runtime, settings: TrainParams) -> dict[str, list]:
    """Each lever's options, the first the baseline; one option where params or the hardware decide."""
    cuda = runtime.device.type == "cuda"
    cores = available_cores(runtime.world)
    # Half the logical cores can beat all of them where two hyperthreads share a core; on 2 or 3 cores
    # every core has always won, so nothing is timed.
    threads = [settings.threads] if settings.threads else [cores] if cuda or cores < 4 else [cores, cores // 2]
    if settings.memory_format != "auto":
        formats = [settings.memory_format]
    else:  # tensor cores want NHWC; CPUs differ
        formats = ["channels_last"] if cuda else ["contiguous", "channels_last"]
    if settings.precision != "auto":
        precisions = [settings.precision]
    else:  # no loss scaling needed for bfloat16 on GPUs; on CPUs only where it runs natively
        precisions = ["bfloat16"] if cuda else ["float32", "bfloat16"] if cpu_runs_bfloat16() else ["float32"]
    return {"threads": threads, "memory_format": formats, "precision": precisions}


@timing.timed("levers")
def choose_levers(
    runtime: Runtime, model: Classifier, images: ImageSet, views: Views, settings: TrainParams
) -> Runtime:
    """The runtime with its levers resolved (and its thread count set) for training `model` on `images`."""
    options = candidates(runtime, settings)
    baseline = {lever: choices[0] for lever, choices in options.items()}
    if all(len(choices) == 1 for choices in options.values()):
        levers = Levers(**baseline, chosen_by="params" if _all_set(settings) else "hardware")
    else:
        key = _key(runtime, model, views, settings)
        known = _known()
        entry = known.get(key)
        if entry is not None and not _is_choice(entry, options):
            log.warning(
                "warning: %s holds %s for this machine, not one of the choices %s; timing the levers again",
                _levers_file(),
                entry,
                options,
            )
            entry = None
        if entry is not None:
            levers = Levers(**entry, chosen_by="timed earlier")
        else:
            levers = Levers(**_probe(model, images, views, options), chosen_by="timed")
            _remember(known, key, levers)
    torch.set_num_threads(levers.threads)
    log.info("levers: %s", levers.describe())
    return dataclasses.replace(runtime, levers=levers)


def _all_set(settings: TrainParams) -> bool:
    return settings.precision != "auto" and settings.memory_format != "auto" and settings.threads > 0


def _key(runtime: Runtime, model: Classifier, views: Views, settings: TrainParams) -> str:
    """What the timing depends on: the machine, torch, the model's size, the image and batch sizes."""
    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else cpu_name()
    flags = ",".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return (
        f"{device} [{flags}] torch {torch.__version__} cores {available_cores(runtime.world)} | "
        f"{type(model.body).__name__} {parameters} parameters | {views.train_size or views.size} px, "
        f"batch {settings.batch_size}"
    )


def _levers_file() -> Path:
    return default_cache_dir() / "levers.json"


def _known() -> dict[str, dict]:
    """The levers timed earlier, by _key. A file that is not what _remember writes is ignored whole, in one
    warning, and rewritten by the next timing: nothing of a damaged file is used."""
    path = _levers_file()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # cut short, extended, a zeroed page: not JSON, or not UTF-8
        problem = f"is unreadable ({type(error).__name__}: {error})"
    else:
        bad = [key for key, entry in known.items() if not _is_levers(entry)] if isinstance(known, dict) else [""]
        if not bad:
            return known
        problem = f"holds {bad[0]!r}, not levers" if bad[0] else "is not a mapping of machines to levers"
    log.warning("warning: ignoring %s: it %s; timing the levers again", path, problem)
    return {}


def _is_levers(entry: object) -> bool:
    """An entry as _remember writes it."""
    return (
        isinstance(entry, dict)
        and set(entry) == {"precision", "memory_format", "threads"}
        and entry["precision"] in ("float32", "bfloat16")
        and entry["memory_format"] in MEMORY_FORMATS
        and type(entry["threads"]) is int
        and entry["threads"] > 0
    )


def _is_choice(entry: dict, options: dict[str, list]) -> bool:
    """Whether each lever of a kept entry is among this run's choices (a file from elsewhere may not be)."""
    return all(entry[lever] in choices for lever, choices in options.items())


def _remember(known: dict[str, dict], key: str, levers: Levers) -> None:
    known = {
        **known,
        key: {"precision": levers.precision, "memory_format": levers.memory_format, "threads": levers.threads},
    }
    try:
        write_json(_levers_file(), known)
    except OSError as error:  # a read-only cache folder costs a re-timing next time, nothing else
        log.warning("could not keep the timed levers in %s (%s)", _levers_file(), error)


def _probe(model: Classifier, images: ImageSet, views: Views, options: dict[str, list]) -> dict:
    """Time training steps of a copy of the model for each option, lever by lever, keeping the fastest.

    The copy keeps the stage's model untouched (its BatchNorm statistics too), and the global RNG
    state is restored so that timing or not leaves the run's random draws the same.
    """
    rng_state = torch.get_rng_state()
    probe = copy.deepcopy(model).train()
    rows = torch.arange(min(PROBE_IMAGES, len(images)))
    batch = views.train(images.pixels[rows], torch.Generator().manual_seed(0), images.geometry_of(rows)).contiguous()
    targets = images.targets[:PROBE_IMAGES]
    chosen = {lever: choices[0] for lever, choices in options.items()}
    timings = {}
    for lever in ORDER:
        if len(options[lever]) == 1:
            continue
        seconds = {
            option: _seconds(lambda: _step(probe, batch, targets, {**chosen, lever: option}))
            for option in options[lever]
        }
        chosen[lever] = min(seconds, key=seconds.get)
        timings[lever] = {str(option): round(value, 4) for option, value in seconds.items()}
    torch.set_rng_state(rng_state)
    log.info("timed %d-image training steps: %s", len(targets), timings)
    return chosen


def _step(model: Classifier, batch: torch.Tensor, targets: torch.Tensor, levers: dict) -> None:
    torch.set_num_threads(levers["threads"])
    memory_format = MEMORY_FORMATS[levers["memory_format"]]
    model.to(memory_format=memory_format)
    inputs = batch.contiguous(memory_format=memory_format)
    with autocast(inputs.device, levers["precision"], training=True):
        loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _seconds(step: Callable[[], None]) -> float:
    step()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(PROBE_STEPS):
        started = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
