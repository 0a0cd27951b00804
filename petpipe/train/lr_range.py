"""The learning rate finder (Smith 2015, arXiv:1506.01186) and fastai's four suggestion rules.

`lr_sweep` trains on batches while the learning rate grows exponentially and
returns the curve; it works on the model it is given, so callers pass a copy
when the weights must not change. The stop rule and the suggestion rules are pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from petpipe.data.dataset import ImageSet
from petpipe.data.views import Views
from petpipe.model.backbones import Classifier
from petpipe.params import LrFindParams, Params
from petpipe.train.fit_loop import Criterion, batch_indices, training_step
from petpipe.train.optim import make_optimizer
from petpipe.utils import timing
from petpipe.utils.progress import Progress

SMOOTHING = 0.98  # fastai's Recorder smooths the loss with this exponential moving average


def sweep_lrs(start_lr: float, end_lr: float, num_it: int) -> np.ndarray:
    """num_it learning rates growing exponentially from start_lr towards end_lr.

    As fastai's LRFinder (SchedExp at train_iter / num_it), the last one stops a step short of end_lr.
    """
    return start_lr * (end_lr / start_lr) ** (np.arange(num_it) / num_it)


def smooth(losses: Sequence[float]) -> list[float]:
    """fastai's smoothed loss: the debiased exponential moving average of the raw losses."""
    average, smoothed = 0.0, []
    for iteration, value in enumerate(losses):
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed.append(average / (1 - SMOOTHING ** (iteration + 1)))
    return smoothed


@dataclass(frozen=True)
class StopRule:
    """When the sweep has seen the loss diverge: fastai's rule (smoothed loss above stop_div x its minimum),
    made to tell a rise from batch noise.

    fastai's minimum is taken from the first batch on, where the debiased average is one or two batches: on
    a model that already fits its photos (at 224 px loss 0.30, spread 0.18 with batches of 16, single
    batches from 0.03 to 0.7: most batches near zero, a few with one hard photo) that minimum is a lucky
    batch, stop_div x it lies below the loss's own level, and the sweep stopped after 6 batches at 2.5e-7
    (issue "The tutorial's loop works by default"). So:
    - the first noise_window batches (learning rates too small to change the model) measure the noise, the
      standard deviation of their raw losses, and are never a divergence;
    - the minimum is that of the smoothed loss from the end of the window on, an average of enough batches;
    - a divergence must also exceed that minimum by noise_sigmas x the noise. That term decides only where
      the noise exceeds the minimum (stop_div - 1) / noise_sigmas times over: on losses near zero.
    """

    stop_div: float
    noise_window: int
    noise_sigmas: float

    @classmethod
    def of(cls, sweep: LrFindParams) -> StopRule:
        # The window measures the noise where the learning rate is too small to change the model: at most the
        # sweep's first fifth (1e-7 to 4e-6 of fastai's 1e-7 to 10), however few its steps. 20 batches of a
        # 30-step sweep reach 2e-2, where the loss already rose: a noise of 1.5 on a loss of 1.4, and an edge
        # at 4e-2 from which finetune diverged (tests/test_lr_find_sweep.py has that curve).
        return cls(
            stop_div=sweep.stop_div,
            noise_window=min(sweep.noise_window, sweep.num_it // 5),
            noise_sigmas=sweep.noise_sigmas,
        )

    def noise(self, losses: Sequence[float]) -> float | None:
        """The standard deviation of the raw losses of the window (0 for a window of 0 or 1 batch, which has
        no spread: fastai's rule); None until the window is complete."""
        if self.noise_window <= 1:
            return 0.0
        if len(losses) < self.noise_window:
            return None
        return float(np.std(np.asarray(losses[: self.noise_window], dtype=np.float64), ddof=1))

    def threshold(self, losses: Sequence[float], smoothed: Sequence[float]) -> float:
        """The smoothed loss above which the curve has diverged; inf while the window lasts."""
        noise = self.noise(losses)
        if noise is None or len(smoothed) <= self.noise_window:
            return math.inf
        best = float(min(smoothed[max(self.noise_window - 1, 0) :]))
        return max(self.stop_div * best, best + self.noise_sigmas * noise)

    def edge(self, lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float]) -> float:
        """The end of the flat stretch: the largest learning rate the sweep tried before the smoothed loss rose
        for good above its minimum (from the window's end on) by more than noise_sigmas x its own noise.

        On a head that already fits its photos the curve has no descent for fastai's rules to find: it is
        flat (batch noise) until the learning rate is large enough to change the model, then rises. Its
        valley, slide and minimum lie in the noise (2e-5 on the sample, where finetune gained nothing); the
        edge is the onset of the rise, Smith's largest learning rate that still trains (arXiv:1803.09820).
        The smoothed loss's noise is the raw noise x sqrt((1 - 0.98) / (1 + 0.98)), an exponential moving
        average's spread of independent batches; with no noise measured (fastai's rule) the edge is the
        minimum's learning rate itself.
        """
        start = max(self.noise_window - 1, 0)
        if start >= len(smoothed):
            start = 0
        best = start + int(np.argmin(np.asarray(smoothed[start:], dtype=np.float64)))
        noise = self.noise(losses) or 0.0
        margin = self.noise_sigmas * noise * math.sqrt((1 - SMOOTHING) / (1 + SMOOTHING))
        within = [i for i in range(best, len(smoothed)) if smoothed[i] <= smoothed[best] + margin]
        return float(lrs[within[-1]])  # the last one: past it the loss never came back

    def diverged(self, losses: Sequence[float], smoothed: Sequence[float]) -> bool:
        """Whether the curve's last point is a divergence (a loss that is not finite always is)."""
        return bool(not math.isfinite(smoothed[-1]) or smoothed[-1] > self.threshold(losses, smoothed))


def stop_index(losses: Sequence[float], rule: StopRule) -> int | None:
    """The batch after which a sweep with these raw losses stops; None if it runs through them all."""
    smoothed = smooth(losses)
    for iteration in range(len(losses)):
        if rule.diverged(losses[: iteration + 1], smoothed[: iteration + 1]):
            return iteration
    return None


@timing.timed("sweep")
def lr_sweep(
    model: Classifier,
    images: ImageSet,
    *,
    views: Views,
    params: Params,
    precision: str,
    generator: torch.Generator,
    criterion: Criterion = Criterion("none"),
    progress: Progress | None = None,
) -> dict[str, list[float]]:
    """Train one batch per learning rate from lr_find.start_lr to lr_find.end_lr; stop when `StopRule` sees the
    smoothed loss diverge. Its batch size is lr_find.batch_size (0: train.batch_size), its weight decay
    train.weight_decay (both from `params`), its loss `criterion` (the finetune's); the model trains in the mode
    it is given (`models.set_train_mode`: BatchNorm statistics updated or fixed) on augmented batches, as the
    finetune it precedes.

    Returns {"lr", "loss", "smoothed_loss"}, one entry per batch trained.
    """
    sweep, settings = params.lr_find, params.train
    device = images.pixels.device
    batch_size = min(sweep.batch_size or settings.batch_size, len(images))
    # The optimiser training uses (fastai's lr_find uses the Learner's): no decay on BatchNorm and biases.
    optimizer = make_optimizer(
        model, group_lrs=dict.fromkeys(model.layer_groups(), sweep.start_lr), weight_decay=settings.weight_decay
    )
    rule = StopRule.of(sweep)
    record: dict[str, list[float]] = {"lr": [], "loss": [], "smoothed_loss": []}
    average = 0.0
    batches: list[torch.Tensor] = []
    lrs = sweep_lrs(sweep.start_lr, sweep.end_lr, sweep.num_it)
    for iteration, lr in enumerate(progress(iter(lrs), len(lrs)) if progress else lrs):
        if not batches:  # as many epochs as num_it needs
            batches = batch_indices(len(images), batch_size, shuffle=True, drop_last=True, generator=generator)
        rows = batches.pop(0).to(device)
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        inputs = views.train(images.pixels[rows], generator, images.geometry_of(rows))
        value = training_step(model, optimizer, inputs, images.targets[rows], criterion=criterion, precision=precision)
        average = SMOOTHING * average + (1 - SMOOTHING) * value  # as `smooth`, one batch at a time
        record["lr"].append(float(lr))
        record["loss"].append(value)
        record["smoothed_loss"].append(average / (1 - SMOOTHING ** (iteration + 1)))
        if rule.diverged(record["loss"], record["smoothed_loss"]):
            break
    return record


# ---------------------------------------------------------------- suggestions (fastai's rules)


def trim_for_suggestions(lrs: np.ndarray, losses: np.ndarray, num_it: int) -> tuple[np.ndarray, np.ndarray]:
    """fastai skips the first tenth (noisy start) and last five points (divergence) of the curve."""
    start, end = num_it // 10, len(losses) - 5
    if end - start < 3:  # a short curve: keep it whole rather than suggest from nothing
        return lrs, losses
    return lrs[start:end], losses[start:end]


def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """A tenth of the learning rate with the lowest loss, no lower than the curve's first: a suggestion is a
    learning rate the sweep tried (fastai's tenth of a minimum at the start lies below the sweep)."""
    return float(max(lrs[int(np.argmin(losses))] / 10, lrs[0]))


def suggest_steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """Where the loss falls fastest against log(lr)."""
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(slopes))])


def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's valley: inside the longest decreasing stretch of the curve, a bit past its first third."""
    count = len(losses)
    lengths = [1] * count
    max_start, max_end = 0, 0
    for i in range(1, count):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
        if lengths[max_end] < lengths[i]:
            max_end = i
            max_start = max(max_end - lengths[max_end], 0)
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def suggest_slide(lrs: np.ndarray, losses: np.ndarray, *, lr_diff: int = 15, threshold: float = 0.005) -> float:
    """fastai's slide: walk left from the end until the gradient flattens out."""
    gradient = np.gradient(losses)
    lr_diff = min(lr_diff, len(losses) - 1)
    right, left = -1, -1 - lr_diff
    suggestion = lrs[left]
    while left >= -len(losses) and abs(gradient[right] - gradient[left]) > threshold:
        suggestion = lrs[left]
        right -= 1
        left -= 1
    return float(suggestion)


SUGGESTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "valley": suggest_valley,
    "slide": suggest_slide,
    "minimum": suggest_minimum,
    "steep": suggest_steep,
}


def suggest(lrs: list[float], smoothed_losses: list[float], *, num_it: int) -> dict[str, float]:
    """Every suggestion rule on the trimmed curve."""
    trimmed_lrs, trimmed_losses = trim_for_suggestions(np.asarray(lrs), np.asarray(smoothed_losses), num_it)
    return {name: rule(trimmed_lrs, trimmed_losses) for name, rule in SUGGESTIONS.items()}
