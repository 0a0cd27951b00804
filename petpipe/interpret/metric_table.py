"""evaluate's headline metrics, written once: each one's name in metrics.json, its words on a page, and which
way is better. evaluate computes them (with `tta_` and `test_` twins), `tracking.promote` may elect a
champion on any of them (params.PromoteMetric), and the registry compares a challenger with the champion by
their direction. Torch-free: params.py imports it."""

from __future__ import annotations

from dataclasses import dataclass

# fastai's top_k_accuracy default and the tutorial's second metric; also the classes a prediction lists
# (predict, serve, the MLflow model).
TOP_K = 5
TTA = "tta_"  # the prefix of the test-time-augmentation twins in metrics.json


@dataclass(frozen=True)
class Metric:
    name: str  # in metrics.json
    title: str  # on the Results page
    lower_is_better: bool = False
    detail: str = ""  # in report.md, after the title

    @property
    def described(self) -> str:
        return f"{self.title} ({self.detail})" if self.detail else self.title


HEADLINE = (
    Metric("accuracy", "accuracy"),
    Metric("error_rate", "error rate", lower_is_better=True),
    Metric(f"top{TOP_K}_accuracy", f"top-{TOP_K} accuracy"),
    Metric("loss", "loss (cross-entropy)", lower_is_better=True),
    Metric("macro_f1", "macro F1"),
    Metric("balanced_accuracy", "balanced accuracy", detail="mean recall per class"),
)
NAMES = tuple(metric.name for metric in HEADLINE)
# What tracking.promote may name: each headline metric, plain or with test-time augmentation.
PROMOTABLE = NAMES + tuple(TTA + name for name in NAMES)
LOWER_IS_BETTER = frozenset(
    prefix + metric.name for metric in HEADLINE if metric.lower_is_better for prefix in ("", TTA)
)
