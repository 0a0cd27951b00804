"""petpipe: the fastai Oxford-IIIT Pet tutorial as a reproducible, tracked DVC pipeline.

From Python (docs/api.md): load_model, results, show_batch, top_losses, confusion, most_confused. They live in
petpipe/api.py and load on first use (PEP 562), so `import petpipe` stays cheap: neither torch, pandas nor
MLflow (tests/test_layers.py).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Model",
    "Picture",
    "StageResults",
    "confusion",
    "load_model",
    "most_confused",
    "results",
    "show_batch",
    "top_losses",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from petpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'petpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
