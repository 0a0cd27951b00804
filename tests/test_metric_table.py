"""evaluate's metrics are named once (petpipe/interpret/metric_table.py): what evaluate computes, what tracking.promote
accepts and which way the registry compares are all that table."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from petpipe.interpret import interpretation, metric_table
from petpipe.params import PromoteMetric
from petpipe.track import registry

pytestmark = pytest.mark.fast  # `make test-fast`: no training, no dvc repro


def test_evaluate_computes_the_tables_metrics_and_promote_accepts_each_plain_or_with_tta():
    log_probabilities = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]))
    computed = interpretation.classification_metrics(log_probabilities, np.array([0, 1, 0]), ["a", "b", "c"])
    assert tuple(computed) == metric_table.NAMES
    assert typing.get_args(PromoteMetric) == metric_table.PROMOTABLE
    assert set(metric_table.PROMOTABLE) == {*metric_table.NAMES, *(f"tta_{name}" for name in metric_table.NAMES)}


def test_the_registry_compares_each_metric_in_its_direction():
    assert {"error_rate", "loss", "tta_error_rate", "tta_loss"} == metric_table.LOWER_IS_BETTER
    for name in metric_table.PROMOTABLE:
        lower = name in metric_table.LOWER_IS_BETTER
        assert registry.better(name, 0.1, 0.2) is lower and registry.better(name, 0.2, 0.1) is not lower
        assert not registry.better(name, 0.2, 0.2)  # a tie keeps the champion
