"""Backbones (torchvision or timm, with their weights), fastai's head, freezing and layer groups."""

from __future__ import annotations

import difflib
import functools


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
