"""train-head, lr-find and finetune on the real sample photos with the offline EfficientNet-Lite0.

Small images (64 px) and few epochs keep this to a couple of minutes on two cores; the head most tests
start from is the session's (conftest's `trained_head`). The assertions are about outcomes: accuracy,
files, resume, determinism.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import PROJECT_ROOT, TRAINING, params_with, train_head_command, train_head_outputs
from petpipe.errors import PetpipeError
from petpipe.model.backbones import finetune_fixes_bn_stats
from petpipe.model.checkpoint import load_checkpoint
from petpipe.stages import finetune, lr_find, train_head
from petpipe.utils.file_formats import file_digest


def run_train_head(folder: Path, index: Path, images: Path, **overrides) -> train_head.Outputs:
    outputs = train_head_outputs(folder)
    train_head.run(params_with({**TRAINING, **overrides}), train_head.Inputs(images=images, index=index), outputs)
    return outputs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Stages write resume files under ./.petpipe: run them in a scratch folder."""
    folder = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder


@pytest.fixture(scope="module")
def head(trained_head) -> train_head.Outputs:
    """The session's head: `petpipe train-head` at 64 px for 3 epochs (helpers.HEAD_TRAINING)."""
    return trained_head.outputs


def test_train_head_learns_well_above_chance(head, trained_head):
    metrics = json.loads(head.metrics.read_text())
    chance = 1 / 37
    assert metrics["accuracy"] >= 3 * chance, metrics
    history = pd.read_csv(head.history)
    assert list(history.columns) == [
        "epoch",
        "train_loss",
        "valid_loss",
        "accuracy",
        "error_rate",
        "lr",
        "seconds",
        "images_per_second",
        "precision",
        "memory_format",
        "threads",
    ]
    assert set(history["precision"]) <= {"float32", "bfloat16"} and history["threads"].min() >= 1
    assert list(history["epoch"]) == [1, 2, 3]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert head.plot.read_bytes().startswith(b"\x89PNG")
    assert not list((trained_head.folder / ".petpipe/resume").glob("train-head-*.pt")), "resume file left after success"


def test_train_head_draws_show_batch_as_the_tool_does_with_its_params(
    head, trained_head, indexed_sample, sample_images, tmp_path
):
    """show_batch.png is train-head's (index-labels needs no torch): the training split through the augmentation
    train-head trains with, the very picture `petpipe show-batch` draws from the same params.yaml."""
    from click.testing import CliRunner

    from petpipe.cli import main

    assert head.show_batch.read_bytes().startswith(b"\x89PNG")
    arguments = ["show-batch", "--params", str(trained_head.params_file), "--images", str(sample_images)]
    arguments += ["--index", str(indexed_sample), "--split", "train", "--n", "9", "--out", str(tmp_path / "b.png")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.png").read_bytes() == head.show_batch.read_bytes()


def test_checkpoint_is_a_plain_dict_loadable_without_pickle(head):
    checkpoint = torch.load(head.model, map_location="cpu", weights_only=True)
    assert checkpoint["arch"] == "tf_efficientnet_lite0"
    assert len(checkpoint["classes"]) == 37 and checkpoint["classes"][0] == "Abyssinian"
    assert checkpoint["preprocessing"] == {
        "version": 1,
        "img_size": 64,
        "presize": 74,
        "eval_crop": 1.0,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resize": {"mode": "bilinear", "align_corners": True, "antialias": False},
    }
    assert set(checkpoint["layer_groups"]) == {"body", "head"}  # fastai's split of a timm body
    assert checkpoint["params"]["train_head"]["epochs"] == 3


@pytest.fixture(scope="module")
def lr_find_outputs(head, workdir, indexed_sample, sample_images):
    def sweep(folder: Path) -> lr_find.Outputs:
        outputs = lr_find.Outputs(
            result=folder / "lr_find.json", curve=folder / "lr_find.csv", plot=folder / "lr_find.png"
        )
        lr_find.run(
            params_with(TRAINING),
            lr_find.Inputs(images=sample_images, index=indexed_sample, checkpoint=head.model),
            outputs,
        )
        return outputs

    before = file_digest(head.model)
    first, second = sweep(workdir / "lr1"), sweep(workdir / "lr2")
    assert file_digest(head.model) == before, "lr-find changed the checkpoint on disk"
    return first, second


def test_lr_find_suggestions_are_finite_inside_the_sweep_and_reproducible(lr_find_outputs):
    first, second = lr_find_outputs
    result = json.loads(first.result.read_text())
    lrs = result["curve"]["lr"]
    assert set(result["suggestions"]) == {"valley", "slide", "minimum", "steep", "edge"}
    for name, value in result["suggestions"].items():
        assert lrs[0] <= value <= lrs[-1], (name, value)  # every suggestion is a learning rate the sweep tried
    rule = params_with(TRAINING).lr_find.suggestion
    assert result["trusted"] and result["chosen"] == {"rule": rule, "lr": result["suggestions"][rule]}
    assert 5 <= result["iterations"] <= 30
    assert first.curve.read_text() == second.curve.read_text(), "same seed, different curve"
    assert first.plot.read_bytes().startswith(b"\x89PNG")


def test_finetune_starts_from_train_head_weights(head, lr_find_outputs, workdir, indexed_sample, sample_images):
    folder = workdir / "finetune"
    outputs = finetune.Outputs(
        model=folder / "model.pt",
        metrics=folder / "metrics.json",
        history=folder / "history.csv",
        plot=folder / "training.png",
    )
    inputs = finetune.Inputs(
        images=sample_images, index=indexed_sample, checkpoint=head.model, lr_find=lr_find_outputs[0].result
    )
    summary = finetune.run(params_with({**TRAINING, "finetune.epochs": 1, "finetune.lr": "auto"}), inputs, outputs)

    assert "unfrozen after model.blocks.2" in summary
    tuned, start = load_checkpoint(outputs.model), load_checkpoint(head.model)
    assert tuned.params["finetune"]["peak_lr"] == json.loads(lr_find_outputs[0].result.read_text())["chosen"]["lr"]
    weight = "head.classifier.weight"
    moved = (tuned.state_dict[weight] - start.state_dict[weight]).norm()
    assert moved < 0.5 * start.state_dict[weight].norm(), "finetune did not start from train-head's head"
    # finetune.frozen_stride 8 (the default): the stem to blocks.2 keep train-head's weights, the rest trains.
    for name in ("body.model.conv_stem.weight", "body.model.blocks.2.0.conv_pw.weight", "body.model.bn1.running_mean"):
        assert torch.equal(tuned.state_dict[name], start.state_dict[name]), f"{name} moved"
    for name in ("body.model.blocks.3.0.conv_pw.weight", "body.model.conv_head.weight"):
        assert not torch.equal(tuned.state_dict[name], start.state_dict[name]), f"{name} stayed frozen"
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["stage"] == "finetune" and metrics["accuracy"] >= 3 / 37
    assert outputs.history.exists() and outputs.plot.exists()


def test_killed_train_head_resumes_and_matches_an_uninterrupted_run(
    tmp_path, trained_head, indexed_sample, sample_images
):
    """Killed after its first epoch, resumed: the same outputs as the session's uninterrupted `petpipe train-head`
    (same params, and its cache: the same pixels and timed levers)."""
    params_file = trained_head.params_file
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PETPIPE_CACHE_DIR": str(trained_head.cache)}

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train_head_command(params_file, sample_images, indexed_sample, killed),
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / ".petpipe/resume").glob("train-head-*.pt")):
        assert process.poll() is None, "train-head ended before its first epoch was saved"
        assert time.monotonic() < deadline, "no resume file after 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the harshest interruption: no cleanup runs
    process.wait()
    assert not (killed / "model.pt").exists() and not (killed / "metrics.json").exists()

    resumed = subprocess.run(
        train_head_command(params_file, sample_images, indexed_sample, killed),
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr

    whole, uninterrupted = trained_head.outputs.model.parent, trained_head
    assert "resuming from" not in uninterrupted.stderr
    # fastai's table: one line per epoch that stays, and the levers chosen for this machine.
    assert "train-head: epoch  train_loss  valid_loss  accuracy    time" in uninterrupted.stderr
    assert all(f"train-head: {epoch}/3 " in uninterrupted.stderr for epoch in (1, 2, 3))
    assert "levers: float32" in uninterrupted.stderr or "levers: bfloat16" in uninterrupted.stderr
    # Identical metrics.json: same seed, same numbers, whether or not the run was killed half-way.
    assert (killed / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    columns = ["epoch", "train_loss", "valid_loss", "accuracy"]
    pd.testing.assert_frame_equal(
        pd.read_csv(killed / "history.csv")[columns], pd.read_csv(whole / "history.csv")[columns]
    )


# The head on features computed once, without dropout (see the compile test): compiled and eager runs compare.
CACHED_HEAD = {"train_head.epochs": 3, "train_head.cache_features": True, "model.head_dropout": 0.0}


@pytest.fixture(scope="module")
def cached_head(workdir, indexed_sample, sample_images) -> train_head.Outputs:
    return run_train_head(workdir / "cached", indexed_sample, sample_images, **CACHED_HEAD)


def test_cached_features_train_the_head_without_touching_the_body(cached_head):
    outputs = cached_head
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["accuracy"] >= 3 / 37, metrics
    checkpoint = load_checkpoint(outputs.model)
    trained = checkpoint.state_dict
    from petpipe.model.backbones import build_model

    pretrained = build_model(checkpoint.spec, pretrained=True)
    for name, tensor in pretrained.state_dict().items():
        if name.startswith("body."):  # weights and BatchNorm statistics alike: the body ran only in eval mode
            assert torch.equal(trained[name], tensor), name


def test_compiled_training_learns_as_the_eager_one_and_saves_plain_weights(
    cached_head, workdir, indexed_sample, sample_images
):
    """train.compile runs the training steps through torch.compile (here the head on cached features, which
    compiles in seconds); the saved checkpoint is the plain module's, loadable without torch.compile.
    No dropout: compiled code draws its dropout masks from another generator, which alone moves accuracy
    on 86 validation images by several points."""
    eager = cached_head
    compiled = run_train_head(
        workdir / "compiled", indexed_sample, sample_images, **CACHED_HEAD, **{"train.compile": True}
    )
    eager_accuracy = json.loads(eager.metrics.read_text())["accuracy"]
    compiled_accuracy = json.loads(compiled.metrics.read_text())["accuracy"]
    assert compiled_accuracy >= 3 / 37
    assert abs(compiled_accuracy - eager_accuracy) <= 0.05, (compiled_accuracy, eager_accuracy)
    assert load_checkpoint(compiled.model).state_dict.keys() == load_checkpoint(eager.model).state_dict.keys()


def test_compile_without_a_cpp_compiler_names_the_fix(workdir, indexed_sample, sample_images, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(PetpipeError, match=r"train.compile is true but no C\+\+ compiler"):
        run_train_head(
            workdir / "no-compiler",
            indexed_sample,
            sample_images,
            **{"train_head.epochs": 1, "train_head.cache_features": True, "train.compile": True},
        )


def test_finetune_keeps_the_batchnorm_statistics_a_cached_head_learnt_on(
    cached_head, workdir, indexed_sample, sample_images
):
    """bn_stats auto after cache_features: the body's weights train, its BatchNorm statistics stay those the
    head was trained on (with update they move to the new data and the head's inputs shift under it)."""
    head = cached_head
    start = load_checkpoint(head.model).state_dict
    statistics = [name for name in start if name.startswith("body.") and name.endswith("running_mean")]
    assert statistics
    tuned = {}
    for setting in ("auto", "update"):
        folder = workdir / f"bn-{setting}"
        outputs = finetune.Outputs(
            model=folder / "model.pt",
            metrics=folder / "metrics.json",
            history=folder / "history.csv",
            plot=folder / "training.png",
        )
        finetune.run(
            params_with(
                {
                    **TRAINING,
                    "finetune.epochs": 1,
                    "finetune.bn_stats": setting,
                    "finetune.lr": 1e-3,  # a number: no lr-find result to read
                    "finetune.frozen_stride": 0,
                }
            ),  # everything trains, the stem too
            finetune.Inputs(
                images=sample_images, index=indexed_sample, checkpoint=head.model, lr_find=workdir / "no-lr-find.json"
            ),
            outputs,
        )
        tuned[setting] = load_checkpoint(outputs.model).state_dict
    for name in statistics:
        assert torch.equal(tuned["auto"][name], start[name]), name
    assert not all(torch.equal(tuned["update"][name], start[name]) for name in statistics)
    for state in tuned.values():
        assert not torch.equal(state["body.model.conv_stem.weight"], start["body.model.conv_stem.weight"])


def test_a_size_ratio_trains_on_smaller_crops_than_it_evaluates():
    """finetune.size_ratio and lr_find.size_ratio (FixRes): training views shrink, evaluation views do not."""
    from petpipe.data.views import Views, training_size

    views = Views(
        size=64,
        presize=74,
        eval_crop=1.0,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        augment=params_with().train.augment,
        train_size=training_size(64, 0.8),
    )
    pixels = torch.randint(0, 256, (4, 3, 74, 74), dtype=torch.uint8)
    assert views.train(pixels, torch.Generator().manual_seed(0)).shape == (4, 3, 48, 48)  # 51.2 -> a multiple of 8
    assert views.evaluate(pixels).shape == (4, 3, 64, 64)
    assert training_size(224, 0.8) == 176 and training_size(224, 1.0) is None and training_size(20, 0.1) == 16


def test_bn_stats_auto_follows_how_the_head_was_trained():
    trained_on = {"model": {"train_bn": True}, "train_head": {"cache_features": False}}
    assert finetune_fixes_bn_stats("auto", trained_on) is False
    assert finetune_fixes_bn_stats("auto", {**trained_on, "train_head": {"cache_features": True}})
    assert finetune_fixes_bn_stats("auto", {**trained_on, "model": {"train_bn": False}})
    assert finetune_fixes_bn_stats("frozen", trained_on)
    assert not finetune_fixes_bn_stats("update", {**trained_on, "train_head": {"cache_features": True}})
