"""train.class_weights: scikit-learn's balanced weights, counted on the training split, are the loss of train-head
(cached features), lr-find and finetune, and the valid_loss they report.

The stages run on an unbalanced subset of the sample (three breeds of 10 photos, three of 5) at 64 px; the
reported valid_loss is recomputed from the saved model with the weights of the formula, so a stage that trained
or validated on another loss fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from helpers import OFFLINE_TRAINING, outputs_in, params_with, sample_by_breed, train_head_outputs
from petpipe.data.views import Views
from petpipe.model.checkpoint import load_checkpoint
from petpipe.params import ParamsError
from petpipe.stages import finetune, index_labels, lr_find, train_head
from petpipe.train.compute import one_process
from petpipe.train.fit_loop import Criterion, balanced_class_weights, predict

# float32: the recomputed loss must be the stage's to the last bits that matter; no levers timed.
BALANCED = {
    **OFFLINE_TRAINING,
    "train.precision": "float32",
    "train.memory_format": "contiguous",
    "train.class_weights": "balanced",
    "train_head.epochs": 2,
    "train_head.lr": 0.01,
    "lr_find.num_it": 10,
    "finetune.epochs": 1,
    "finetune.lr": 1e-3,
}


def test_balanced_weights_are_scikit_learns_on_an_unbalanced_label_list():
    labels = [0] * 40 + [1] * 7 + [2] * 3 + [3] * 1 + [4] * 12
    expected = compute_class_weight("balanced", classes=np.arange(5), y=labels)
    assert torch.allclose(balanced_class_weights(torch.tensor(labels), 5), torch.tensor(expected, dtype=torch.float32))
    # A class with no training photo (scikit-learn refuses it) weighs as one with a single photo.
    assert balanced_class_weights(torch.tensor(labels), 6)[5] == pytest.approx(len(labels) / 6)


def test_the_weighted_loss_is_the_weighted_mean_and_none_is_plain_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(9, 3, generator=generator), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])
    weight = balanced_class_weights(targets, 3)
    criterion = Criterion("balanced", weight)
    per_photo = F.cross_entropy(logits, targets, reduction="none")
    weighted = (weight[targets] * per_photo).sum() / weight[targets].sum()
    assert criterion(logits, targets).item() == pytest.approx(weighted.item())
    total, weights = criterion.sums(logits, targets)
    assert total / weights == pytest.approx(weighted.item())
    assert Criterion("none")(logits, targets).item() == pytest.approx(per_photo.mean().item())
    assert "balanced: 0.50 to 3.00" in criterion.describe()


def test_an_unknown_class_weights_is_refused_with_the_allowed_values():
    with pytest.raises(ParamsError) as refused:
        params_with({"train.class_weights": "inverse"})
    message = str(refused.value)
    assert "train.class_weights = 'inverse'" in message and "'none'" in message and "'balanced'" in message


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory, sample_images) -> dict:
    """Three breeds of 10 photos and three of 5 (a stratified split gives each a validation photo), indexed;
    then train-head (cached features), lr-find and finetune with train.class_weights balanced."""
    root = tmp_path_factory.mktemp("class-weights")
    images = root / "images"
    images.mkdir()
    for position, photos in enumerate(list(sample_by_breed(sample_images).values())[:6]):
        for photo in photos[: 10 if position < 3 else 5]:
            shutil.copy(photo, images / photo.name)
    params = params_with(BALANCED)
    indexed = outputs_in(root / "index")
    head, tuned = train_head_outputs(root / "head"), train_head_outputs(root / "finetune")
    sweep = lr_find.Outputs(
        result=root / "lr/lr_find.json", curve=root / "lr/lr_find.csv", plot=root / "lr/lr_find.png"
    )
    with pytest.MonkeyPatch.context() as patch:  # resume files in root; the session's pixel cache
        patch.chdir(root)
        index_labels.run(params, index_labels.Inputs(images=images), indexed)
        summaries = {"train-head": train_head.run(params, train_head.Inputs(images=images, index=indexed.index), head)}
        summaries["lr-find"] = lr_find.run(
            params, lr_find.Inputs(images=images, index=indexed.index, checkpoint=head.model), sweep
        )
        summaries["finetune"] = finetune.run(
            params,
            finetune.Inputs(images=images, index=indexed.index, checkpoint=head.model, lr_find=sweep.result),
            tuned,
        )
    return {
        "root": root,
        "images": images,
        "index": indexed.index,
        "params": params,
        "head": head,
        "finetune": tuned,
        "lr_find": sweep,
        "summaries": summaries,
    }


def formula_weights(index_path: Path) -> torch.Tensor:
    """n_train / (n_classes x the class's training photos), from index.csv, classes in sorted order."""
    index = pd.read_csv(index_path, dtype=str, keep_default_na=False)
    counts = index[index["split"] == "train"]["label"].value_counts().reindex(sorted(index["label"].unique()))
    return torch.tensor((counts.sum() / (len(counts) * counts)).to_numpy(), dtype=torch.float32)


def valid_losses(run: dict, model: Path) -> tuple[float, float]:
    """The saved model's weighted and plain cross-entropy on the validation photos, recomputed here."""
    checkpoint = load_checkpoint(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run["root"])
        inputs = train_head.Inputs(images=run["images"], index=run["index"])
        with one_process(run["params"], "class-weights-test") as context:
            data = context.dataset(inputs, checkpoint.spec, training=False)
        logits = predict(
            checkpoint.model(), data.valid, batch_size=64, views=Views.of(checkpoint.spec, run["params"].train.augment)
        )
    targets = data.valid.targets.cpu()
    return (
        F.cross_entropy(logits, targets, weight=formula_weights(run["index"])).item(),
        F.cross_entropy(logits, targets).item(),
    )


@pytest.mark.parametrize("stage", ["head", "finetune"])
def test_train_head_and_finetune_report_the_weighted_valid_loss_of_the_formula(unbalanced, stage):
    outputs = unbalanced[stage]
    weights = formula_weights(unbalanced["index"])
    assert weights.max() / weights.min() > 1.5  # the subset is unbalanced
    metrics = json.loads(outputs.metrics.read_text())
    assert metrics["accuracy"] > 1 / 6, metrics
    assert load_checkpoint(outputs.model).params["train"]["class_weights"] == "balanced"
    weighted, plain = valid_losses(unbalanced, outputs.model)
    assert abs(weighted - plain) > 0.01, "the validation photos cannot tell the weighted loss from the plain one"
    assert metrics["valid_loss"] == pytest.approx(weighted, rel=1e-3), (metrics["valid_loss"], weighted, plain)
    name = "train-head" if stage == "head" else "finetune"
    assert "losses weighted by class (balanced)" in unbalanced["summaries"][name]


def test_lr_find_sweeps_on_the_weighted_loss(unbalanced):
    result = json.loads(unbalanced["lr_find"].result.read_text())
    assert result["class_weights"] == "balanced" and result["iterations"] >= 5
    assert "loss weighted by class: balanced" in unbalanced["summaries"]["lr-find"]
