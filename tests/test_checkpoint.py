"""The checkpoint on disk: a plain dict in the layout earlier versions wrote too; the model rebuilt from its spec."""

from __future__ import annotations

import pytest
import torch

from helpers import model_spec
from petpipe.errors import PetpipeError
from petpipe.model.backbones import build_model
from petpipe.model.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = model_spec("resnet18", "none", num_classes=3, head_hidden=8, img_size=32, presize=36)
    model = build_model(spec, pretrained=False).eval()
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(
        path,
        Checkpoint.of(
            model,
            spec,
            stage="train-head",
            params={"model": {"train_bn": True}},
            history=[{"epoch": 1, "accuracy": 0.5}],
        ),
    )
    return path, spec, model


def test_a_checkpoint_round_trips_its_spec_and_rebuilds_the_same_network(tiny):
    path, spec, model = tiny
    loaded = load_checkpoint(path)
    assert loaded.spec == spec and loaded.stage == "train-head" and loaded.history == [{"epoch": 1, "accuracy": 0.5}]
    images = torch.rand(2, 3, spec.img_size, spec.img_size)
    with torch.inference_mode():
        assert torch.equal(loaded.model().eval()(images), model(images))


def test_the_layout_earlier_versions_wrote_still_loads(tiny):
    """petpipe-checkpoint/1 as written before the ModelSpec existed: spec fields at the top level."""
    path, spec, model = tiny
    raw = {
        "format": FORMAT,
        "stage": "finetune",
        "arch": "resnet18",
        "weights": "none",
        "classes": ["a", "b", "c"],
        "head": {"hidden": 8, "dropout": 0.5},
        "preprocessing": {"img_size": 32, "presize": 36, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "layer_groups": model.layer_groups(),
        "state_dict": model.state_dict(),
        "params": {},
        "history": [],
        "resume": None,
    }
    torch.save(raw, path.parent / "old.pt")
    loaded = load_checkpoint(path.parent / "old.pt")
    assert loaded.spec.classes == ("a", "b", "c") and loaded.spec.img_size == 32 and loaded.spec.head.hidden == 8
    assert loaded.model().state_dict().keys() == model.state_dict().keys()


def test_a_checkpoint_missing_what_the_spec_needs_says_to_rerun_train_head(tiny, tmp_path):
    path, _, _ = tiny
    raw = torch.load(path, weights_only=True)
    del raw["preprocessing"]
    torch.save(raw, tmp_path / "partial.pt")
    with pytest.raises(PetpipeError, match=r"lacks what this petpipe needs .*rerun train-head") as refused:
        load_checkpoint(tmp_path / "partial.pt")
    assert "\n" not in str(refused.value)
