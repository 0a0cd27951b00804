"""Reproducible by construction: code and photos are DVC dependencies, caches are shared by queued
experiments, and the same params give the same bytes.

Most tests work on a copy of the session's reproduced pipeline (conftest.pipeline_project), so that
only the stages a change makes stale run again.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pandas as pd
import pytest
import torch

from helpers import (
    PIPELINE_SMALL,
    QUEUED,
    RERAN,
    copy_project,
    locked_outputs,
    make_project,
    params_with,
    ran,
    run_as_a_user,
    run_command,
    stale_stages,
    write_params,
)
from petpipe.data import image_index
from petpipe.train.hardware import cpu_runs_bfloat16

TRAINED = ("train-head", "lr-find", "finetune", "evaluate")  # the stages that train or read a model's weights


def test_editing_a_module_reruns_exactly_the_stages_that_run_it(pipeline_project, tmp_path):
    project = copy_project(pipeline_project.folder, tmp_path / "project")
    assert stale_stages(project) == set()
    augment = project / "petpipe/data/augment.py"
    original = augment.read_text()
    augment.write_text(original + "\n# a change to the augmentation\n")
    # Every stage that reads a model runs it (the audit and the export build their network's views); index-labels,
    # which draws nothing through it since show_batch.png is train-head's, and fetch run none of it.
    assert stale_stages(project) == {*TRAINED, "audit", "export"}
    augment.write_text(original)
    assert stale_stages(project) == set()

    fetch = project / "petpipe/data/sources.py"
    fetch.write_text(fetch.read_text() + "\n# a change to fetch\n")
    assert stale_stages(project) == {"fetch"}
    log = run_command(["dvc", "repro"], project).stdout
    assert ran(log) == ["fetch"]  # the same photos came out: nothing downstream reruns


def test_photos_in_a_local_source_are_a_dependency(sample_images, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(sample_images.glob("*.jpg"))[:12]:
        shutil.copy(path, photos / path.name)
    project = make_project(tmp_path / "project", {**PIPELINE_SMALL, "data.source": str(photos)})
    assert ran(run_command(["dvc", "repro", "fetch"], project).stdout) == ["fetch"]
    assert ran(run_command(["dvc", "repro", "fetch"], project).stdout) == []  # unchanged photos: nothing runs
    assert "fetch" not in stale_stages(project)

    shutil.copy(sorted(sample_images.glob("*.jpg"))[20], photos / "added_1.jpg")  # added
    assert "fetch" in stale_stages(project)
    run_command(["dvc", "repro", "fetch"], project)
    (photos / "added_1.jpg").unlink()  # removed
    assert "fetch" in stale_stages(project)
    run_command(["dvc", "repro", "fetch"], project)
    first = sorted(photos.iterdir())[0]
    first.write_bytes(first.read_bytes()[:-10] + b"0123456789")  # changed in place
    assert "fetch" in stale_stages(project)
    run_command(["dvc", "repro", "fetch"], project)
    assert (project / "stages/fetch/images" / first.name).read_bytes() == first.read_bytes()


def test_a_setting_that_changes_no_output_reruns_nothing(pipeline_project, tmp_path):
    """train.decode_workers (petpipe/params.py: OUTPUT_NEUTRAL) is declared by no stage: another machine's
    number of decoding processes leaves the pipeline up to date, while any other train key makes the stages
    that train stale."""
    project = copy_project(pipeline_project.folder, tmp_path / "project")
    params = project / "params.yaml"
    original = params.read_text()
    assert original.count("decode_workers: 0") == 1 and original.count("weight_decay: 0.01") == 1
    params.write_text(original.replace("decode_workers: 0", "decode_workers: 3"))
    assert stale_stages(project) == set()
    params.write_text(original.replace("weight_decay: 0.01", "weight_decay: 0.02"))
    assert stale_stages(project) == set(TRAINED) - {"evaluate"}


def test_code_reruns_the_stages_whose_outputs_it_can_change_and_no_other(pipeline_project, tmp_path):
    """dvc.yaml's code deps are exact (petpipe dvc-yaml): rewording an error of petpipe/params.py (how
    params.yaml is read: DVC hashes the values themselves) or of the atomic writes reruns nothing; an edit to the
    augmentation makes every stage that trains or draws through it stale, and neither fetch nor index-labels."""
    project = copy_project(pipeline_project.folder, tmp_path / "project")
    for plumbing, before, after in (
        ("params.py", "must be '<md5|sha1|sha256>:<hex digest>' or null", "is not '<algorithm>:<hex digest>' or null"),
        ("utils/atomic.py", '"no space left on device"', '"the disk is full"'),
    ):
        source = project / "petpipe" / plumbing
        text = source.read_text()
        assert text.count(before) == 1, plumbing
        source.write_text(text.replace(before, after))
    assert stale_stages(project) == set()
    augment = project / "petpipe" / "data" / "augment.py"
    augment.write_text(augment.read_text().replace("def augment_batch(", "def augment_batch(  # edited\n", 1))
    stale = stale_stages(project)
    assert {"train-head", "audit", "lr-find", "finetune", "evaluate"} <= stale
    assert not {"fetch", "index-labels"} & stale  # labelling runs no model code: show_batch.png is train-head's


def test_a_fixed_finetune_lr_does_not_need_a_changed_sweep(pipeline_project, tmp_path):
    """DVC cannot make finetune's dependency on lr-find's result conditional on finetune.lr being auto: after
    a change to lr_find.* with a number for finetune.lr, `dvc repro -s lr-find` then `dvc commit -f finetune`
    (the command in docs/reproducibility.md) reruns the sweep alone and keeps finetune's and evaluate's outputs."""
    project = copy_project(pipeline_project.folder, tmp_path / "project")
    before = {stage: (project / f"stages/{stage}/metrics.json").read_bytes() for stage in ("finetune", "evaluate")}
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("num_it: 20", "num_it: 15"))
    assert stale_stages(project) == {"lr-find"}
    assert ran(run_command(["dvc", "repro", "-s", "lr-find"], project).stdout) == ["lr-find"]
    assert stale_stages(project) == {"finetune"}  # its dependency changed, though finetune.lr does not read it
    run_command(["dvc", "commit", "-f", "finetune"], project)
    assert stale_stages(project) == set()
    after = {stage: (project / f"stages/{stage}/metrics.json").read_bytes() for stage in ("finetune", "evaluate")}
    assert after == before


# What records wall-clock time: history.csv's seconds and images/s, the checkpoint's copy of that history, and
# the bundle's digest of the checkpoint. Everything else an output holds is compared byte for byte.
TIMED = ("seconds", "images_per_second")
TIMED_OUTPUTS = {
    f"stages/{stage}/{name}" for stage in ("train-head", "finetune") for name in ("history.csv", "model.pt")
}


def test_same_params_and_seed_give_byte_identical_outputs_in_a_fresh_project(served, server_killed):
    """Two fresh projects with the same params.yaml (the session pipeline's: float32 at 64 px on the sample) and
    the same caches, so the same timed levers: one tracked to a live MLflow server (`served`), one whose server
    was killed after index-labels (`server_killed`). Every output DVC records has the same bytes, but for the
    time each epoch took: where MLflow logs, and whether it can, changes nothing that was computed."""
    first, second = served.project, server_killed.project
    digests = [locked_outputs(project) for project in (first, second)]
    assert digests[0].keys() == digests[1].keys() and len(digests[0]) >= 30
    differ = {path for path in digests[0] if digests[0][path] != digests[1][path]}
    assert differ <= {*TIMED_OUTPUTS, "stages/export/bundle"}, differ
    for stage in ("train-head", "finetune"):
        histories = [
            pd.read_csv(project / f"stages/{stage}/history.csv").drop(columns=list(TIMED))
            for project in (first, second)
        ]
        pd.testing.assert_frame_equal(*histories)
        checkpoints = [
            torch.load(project / f"stages/{stage}/model.pt", weights_only=False) for project in (first, second)
        ]
        assert checkpoints[0].keys() == checkpoints[1].keys()
        for key in checkpoints[0].keys() - {"state_dict", "history"}:
            assert checkpoints[0][key] == checkpoints[1][key], key
        untimed = [
            [{key: value for key, value in row.items() if key not in TIMED} for row in c["history"]]
            for c in checkpoints
        ]
        assert untimed[0] == untimed[1] and len(untimed[0]) >= 1
        for name, tensor in checkpoints[0]["state_dict"].items():
            assert torch.equal(tensor, checkpoints[1]["state_dict"][name]), name
    bundles = [project / "stages/export/bundle" for project in (first, second)]
    assert (bundles[0] / "model.onnx").read_bytes() == (bundles[1] / "model.onnx").read_bytes()
    manifests = [json.loads((bundle / "bundle.json").read_text()) for bundle in bundles]
    for manifest in manifests:
        manifest["source"].pop("sha256")  # the checkpoint's digest: its history differs in seconds
    assert manifests[0] == manifests[1]


@pytest.mark.skipif(not cpu_runs_bfloat16(), reason="this CPU has no native bfloat16 (AMX or AVX-512 BF16)")
def test_bfloat16_training_is_byte_identical_too(indexed_sample, sample_images, tmp_path):
    """train-head then finetune in bfloat16 (PIPELINE_SMALL on the sample), twice, each stage a fresh `petpipe`
    process in a folder of its own, as dvc runs them (finetune.lr is a number: lr-find's result is not read)."""
    write_params(tmp_path / "params.yaml", {**PIPELINE_SMALL, "train.precision": "bfloat16", "finetune.lr": 1e-3})
    (tmp_path / "lr_find.json").write_text("{}\n")
    metrics = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        for stage, inputs in (
            ("train-head", []),
            ("finetune", ["--checkpoint", folder / "train-head/model.pt", "--lr-find", tmp_path / "lr_find.json"]),
        ):
            outputs = [
                "--model",
                folder / stage / "model.pt",
                "--metrics",
                folder / stage / "metrics.json",
                "--history",
                folder / stage / "history.csv",
                "--plot",
                folder / stage / "training.png",
            ]
            run_command(
                [
                    "petpipe",
                    stage,
                    "--params",
                    str(tmp_path / "params.yaml"),
                    "--images",
                    str(sample_images),
                    "--index",
                    str(indexed_sample),
                    *map(str, inputs + outputs),
                ],
                folder,
            )
        metrics.append([(folder / f"{stage}/metrics.json").read_bytes() for stage in ("train-head", "finetune")])
    assert metrics[0] == metrics[1]


def test_the_split_depends_only_on_names_and_the_seed():
    """The same on any machine: per class, files ordered by a hash of `seed:path`, no RNG, no file order
    (values of this version: valid the first fifth of each class, test the last)."""
    names = [f"Abyssinian_{number}.jpg" for number in range(1, 6)] + [f"pug_{number}.jpg" for number in range(52, 57)]
    labels = {name: name.rsplit("_", 1)[0] for name in names}
    expected = {
        42: ["valid", "test", "train", "train", "train", "test", "train", "train", "train", "valid"],
        7: ["train", "valid", "train", "train", "test", "train", "train", "test", "valid", "train"],
    }
    for seed, splits in expected.items():
        shuffled = dict(reversed(labels.items()))
        assert image_index.stratified_split(shuffled, valid_pct=0.2, test_pct=0.2, seed=seed) == dict(
            zip(names, splits)
        )


def test_deterministic_algorithms_are_one_switch(indexed_sample, sample_images, tmp_path, monkeypatch):
    """train.deterministic: torch.use_deterministic_algorithms(True) for the stage (what makes GPU runs
    repeatable; CPU runs already are), with the same result on the CPU."""
    from petpipe.stages import train_head

    monkeypatch.chdir(tmp_path)
    overrides = {**PIPELINE_SMALL, "train_head.epochs": 1}
    results = []
    for deterministic in (True, False):
        folder = tmp_path / str(deterministic)
        outputs = train_head.Outputs(
            model=folder / "model.pt",
            metrics=folder / "metrics.json",
            history=folder / "history.csv",
            plot=folder / "training.png",
        )
        train_head.run(
            params_with({**overrides, "train.deterministic": deterministic}),
            train_head.Inputs(images=sample_images, index=indexed_sample),
            outputs,
        )
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        results.append(outputs.metrics.read_bytes())
    assert results[0] == results[1]
    torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- queued experiments share the caches


def test_queued_experiments_reuse_the_caches_at_the_project_root(pipeline_project, experimented, tmp_path):
    """conftest's `experimented`: on a copy of the session's `dvc repro` (tracked, caches at its root), one
    queued experiment retrains (finetune.lr: finetune, export and evaluate run) and one only scores again
    (evaluate.top_losses); each reads the pixels the baseline decoded."""
    project, experiments = experimented.project, QUEUED
    assert "decoding" in pipeline_project.stderr and experimented.cache
    for name, log in experimented.logs.items():
        assert ran(log) == RERAN[name], log[-3000:]
        assert "decoding" not in log, f"{name} decoded images again:\n{log[-3000:]}"
    assert sorted(path.name for path in (project / ".petpipe/cache").iterdir()) == experimented.cache  # none new
    assert not (project / ".petpipe/downloads").exists()  # a local source: nothing downloaded, ever

    shown = json.loads(run_as_a_user(["dvc", "exp", "show", "--json"], project).stdout)
    revs = {rev["name"]: rev for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]}
    assert set(experiments) <= set(revs)
    for name, (section, key, value) in experiments.items():
        assert revs[name]["data"]["params"]["params.yaml"]["data"][section][key] == value
        assert 0 <= revs[name]["data"]["metrics"]["stages/evaluate/metrics.json"]["data"]["accuracy"] <= 1

    applied_to = copy_project(project, tmp_path / "applied")  # the session's project stays the baseline
    run_as_a_user(["dvc", "exp", "apply", "lr-low"], applied_to)
    assert "lr: 0.0003" in (applied_to / "params.yaml").read_text()
    applied = json.loads((applied_to / "stages/evaluate/metrics.json").read_text())
    assert applied["accuracy"] == revs["lr-low"]["data"]["metrics"]["stages/evaluate/metrics.json"]["data"]["accuracy"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("petpipe").experiment_id])
    pipelines: dict[Any, list[str]] = {}
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            pipelines.setdefault(run.data.tags.get("dvc.exp_name"), [])
    for run in runs:
        parent = next(
            (candidate for candidate in runs if candidate.info.run_id == run.data.tags.get("mlflow.parentRunId")), None
        )
        if parent is not None:
            pipelines[parent.data.tags.get("dvc.exp_name")].append(run.data.tags["petpipe.stage"])
    assert {name: sorted(pipelines[name]) for name in experiments} == {name: sorted(RERAN[name]) for name in RERAN}
    assert set(pipelines) == {None, *experiments}  # the baseline's run, and one pipeline run per experiment
