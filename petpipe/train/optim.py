"""The optimiser and its schedules: AdamW over named layer groups, fastai's one-cycle, discriminative LRs.

Schedules are small pure functions of training progress (Smith 2018); `Schedule`
applies them to an optimizer step by step and resumes from its step count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petpipe.model.backbones import Classifier

# fastai's Adam defaults: mom 0.9, sqr_mom 0.99, eps 1e-5, decoupled weight decay.
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-5


def discriminative_lrs(lr: float, ratio: float, groups: int) -> list[float]:
    """fastai's slice(lr / ratio, lr): learning rates spread geometrically, last group highest."""
    if groups == 1:
        return [lr]
    return [lr / ratio ** (1 - index / (groups - 1)) for index in range(groups)]


def make_optimizer(model: Classifier, *, group_lrs: dict[str, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one param group per layer group and decay kind.

    As fastai (wd_bn_bias=False), BatchNorm weights and biases get no weight decay.
    """
    no_decay = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
        for parameter in module.parameters(recurse=False)
    }
    no_decay |= {id(parameter) for name, parameter in model.named_parameters() if name.endswith(".bias")}
    param_groups = []
    for group, parameters in model.layer_group_parameters().items():
        trainable = [parameter for parameter in parameters if parameter.requires_grad]
        for decay in (True, False):
            chosen = [parameter for parameter in trainable if (id(parameter) not in no_decay) == decay]
            if chosen:
                param_groups.append(
                    {
                        "params": chosen,
                        "lr": group_lrs[group],
                        "name": f"{group}",
                        "weight_decay": weight_decay if decay else 0.0,
                    }
                )
    # The fused kernel: one pass over every parameter (5x faster than the default for-loop on this CPU).
    fused = all(parameter.device.type in ("cpu", "cuda") for group in param_groups for parameter in group["params"])
    return torch.optim.AdamW(param_groups, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused or None)


def _cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * fraction))


def one_cycle(progress: float, *, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e5) -> float:
    """fastai's fit_one_cycle learning rate, as a fraction of the peak (Smith 2018, arXiv:1803.09820).

    Cosine warm-up from peak/div over the first pct_start of training, then
    cosine annealing to peak/final_div (fastai's combined_cos(pct_start,
    lr_max/div, lr_max, lr_max/div_final)).
    """
    if progress < pct_start:
        return _cosine(1 / div, 1.0, progress / pct_start)
    return _cosine(1.0, 1 / final_div, (progress - pct_start) / (1 - pct_start))


def one_cycle_momentum(progress: float, *, pct_start: float = 0.25, high: float = 0.95, low: float = 0.85) -> float:
    """Momentum moves opposite to the learning rate: 0.95 -> 0.85 -> 0.95 (fastai's moms)."""
    if progress < pct_start:
        return _cosine(high, low, progress / pct_start)
    return _cosine(low, high, (progress - pct_start) / (1 - pct_start))


class Schedule:
    """Sets every param group's lr (and Adam's beta1) for the current step; resumable by its step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int):
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(total_steps, 1)
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        progress = min(self.step_count / self.total_steps, 1.0)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            if self.kind == "one_cycle":
                group["lr"] = peak * one_cycle(progress)
                group["betas"] = (one_cycle_momentum(progress), group["betas"][1])
            else:  # constant: fastai's fit
                group["lr"] = peak

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "peak_lrs": self.peak_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.peak_lrs = list(state["peak_lrs"])
        self._apply()


def make_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int) -> Schedule:
    """one_cycle: fastai's fit_one_cycle; constant: fastai's fit."""
    return Schedule(optimizer, kind=schedule, total_steps=total_steps)
