"""Seeds: one per stage from train.seed, and every global RNG seeded from it."""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def stage_seed(seed: int, stage: str) -> int:
    """train.seed made distinct per stage.

    With one seed for all, lr-find and finetune would replay train-head's exact
    batches, augmentations and dropout masks, which the head has memorised: the
    LR finder then sees a loss near zero and diverges at once.
    """
    return (seed * 1_000_003 + zlib.crc32(stage.encode())) % 2**63


def seed_everything(seed: int) -> None:
    """Seed every global RNG; the training loop also draws from its own generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
