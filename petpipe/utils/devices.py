"""The device names petpipe accepts (params.yaml's train.device, `petpipe predict --device`), checked without
torch so that params.yaml loads without it; hardware.choose_device turns a name into a torch.device."""

from __future__ import annotations

import re

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda, cuda:<index> or mps, exactly (no spaces, no other backend)."""
    return DEVICE_NAME.fullmatch(name) is not None
