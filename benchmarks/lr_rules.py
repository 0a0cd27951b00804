"""Which learning rate should finetune take: lr-find's suggestions against the fixed default, per seed.

    python benchmarks/lr_rules.py --seeds 1 2 3 --out benchmarks/lr_rules.json --plot docs/screenshots/lr_rules.png

For each seed: train-head and lr-find once with the project's params.yaml (the offline Lite0 weights, the
sample photos), then finetune from that same head once per candidate: each of lr-find's four suggestions
(valley, slide, minimum, steep), what `finetune.lr: auto` chose (the suggestion named by `lr_find.suggestion`,
or `lr_find.fallback_lr` on an untrusted curve) and the fixed rates given by --fixed. Every finetune starts
from the same head and seed, so the accuracy differences are the learning rate's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

from compare_fastai import describe_machine, machine, make_index, params_for  # noqa: E402

RULES = ("valley", "slide", "minimum", "steep", "edge")


def one_seed(args: argparse.Namespace, seed: int, index: Path) -> dict[str, Any]:
    from petpipe.params import parse_params
    from petpipe.stages import finetune, lr_find, train_head

    workdir = Path(tempfile.mkdtemp(prefix=f"lr-rules-{seed}-"))
    os.environ["PETPIPE_CACHE_DIR"] = str(args.cache)
    os.environ["PETPIPE_TRACKING"] = "off"
    params = parse_params(params_for(args, seed, {}))
    head = train_head.Outputs(
        model=workdir / "head/model.pt",
        metrics=workdir / "head/metrics.json",
        history=workdir / "head/history.csv",
        plot=workdir / "head/training.png",
    )
    sweep = lr_find.Outputs(
        result=workdir / "lr/lr_find.json", curve=workdir / "lr/lr_find.csv", plot=workdir / "lr/lr_find.png"
    )
    train_head.run(params, train_head.Inputs(images=args.images, index=index), head)
    started = time.perf_counter()
    lr_find.run(params, lr_find.Inputs(images=args.images, index=index, checkpoint=head.model), sweep)
    sweep_seconds = time.perf_counter() - started
    result = json.loads(sweep.result.read_text())
    candidates = {f"fixed {lr:g}": lr for lr in args.fixed}
    candidates.update({rule: result["suggestions"][rule] for rule in RULES})
    candidates["auto (chosen)"] = result["chosen"]["lr"]
    accuracy: dict[str, float] = {}
    for name, lr in candidates.items():
        same = next((other for other, value in candidates.items() if other in accuracy and value == lr), None)
        if same is not None:  # the same learning rate from the same head and seed: the same run
            accuracy[name] = accuracy[same]
            continue
        tuned = finetune.Outputs(
            model=workdir / f"ft-{len(accuracy)}/model.pt",
            metrics=workdir / f"ft-{len(accuracy)}/metrics.json",
            history=workdir / f"ft-{len(accuracy)}/history.csv",
            plot=workdir / f"ft-{len(accuracy)}/training.png",
        )
        ft_params = parse_params(params_for(args, seed, {"finetune.lr": lr}))
        finetune.run(
            ft_params,
            finetune.Inputs(images=args.images, index=index, checkpoint=head.model, lr_find=sweep.result),
            tuned,
        )
        accuracy[name] = json.loads(tuned.metrics.read_text())["accuracy"]
        print(f"seed {seed}: {name:14s} lr {lr:.2e}: accuracy {accuracy[name]:.4f}", flush=True)
    curve = [line.split(",") for line in sweep.curve.read_text().splitlines()]
    return {
        "seed": seed,
        "head_accuracy": json.loads(head.metrics.read_text())["accuracy"],
        "lr_find": {key: result[key] for key in ("chosen", "suggestions", "trusted", "verdict", "iterations")},
        "lr_find_seconds": sweep_seconds,
        "lrs": candidates,
        "accuracy": accuracy,
        "curve": {name: [float(row[i]) for row in curve[1:]] for i, name in enumerate(curve[0])},
    }


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["accuracy"])
    lines = ["| finetune lr | lr per seed | final accuracy (mean ± sd) | vs the fixed default |", "|---|---|---|---|"]
    base = statistics.mean(row["accuracy"][names[0]] for row in rows)
    for name in names:
        values = [row["accuracy"][name] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lrs = ", ".join(f"{row['lrs'][name]:.1e}" for row in rows)
        label = f"auto, lr_find.suggestion {rows[0]['lr_find']['chosen']['rule']}" if name == "auto (chosen)" else name
        lines.append(
            f"| {label} | {lrs} | {statistics.mean(values):.3f} ± {spread:.3f} "
            f"| {100 * (statistics.mean(values) - base):+.1f} points |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for axis, row in zip(axes[0], rows):
        axis.plot(row["curve"]["lr"], row["curve"]["loss"], color="0.8", linewidth=0.8, label="batch loss")
        axis.plot(row["curve"]["lr"], row["curve"]["smoothed_loss"], label="smoothed loss")
        top = 1.6 * max(row["curve"]["smoothed_loss"])
        axis.set_ylim(0, top)
        for position, (name, lr) in enumerate(sorted(row["lrs"].items(), key=lambda item: item[1])):
            axis.axvline(lr, linestyle=":", color="C3" if name.startswith("fixed") else "C2")
            axis.text(
                lr,
                top * (0.98 - 0.16 * (position % 3)),
                f"{name} {row['accuracy'][name]:.2f}",
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
            )
        axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_title(
            f"seed {row['seed']}: {row['lr_find']['iterations']} steps, "
            f"{'trusted' if row['lr_find']['trusted'] else 'untrusted'}"
        )
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--fixed", type=float, nargs="*", default=[1e-3], help="fixed finetune.lr values to compare")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--summarise", type=Path, default=None, metavar="RESULTS_JSON")
    args = parser.parse_args()
    if args.summarise:
        rows = json.loads(args.summarise.read_text())["results"]
        print(table(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    args.images = args.images.resolve()
    args.cache = Path(tempfile.mkdtemp(prefix="lr-rules-cache-"))
    index, train_images = make_index(args, Path(tempfile.mkdtemp(prefix="lr-rules-index-")))
    info = machine()
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(args, seed, index))
        if args.out:
            args.out.write_text(
                json.dumps(
                    {
                        "settings": f"{args.size} px, batch {args.batch_size}, {args.head_epochs} head + "
                        f"{args.ft_epochs} finetune epochs, {train_images} train images; {describe_machine(info)}",
                        "machine": info,
                        "results": rows,
                    },
                    indent=1,
                )
            )
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
