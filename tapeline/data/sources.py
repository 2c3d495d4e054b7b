"""The data's shape before any stage (a stand-in until every source says its own)."""

from __future__ import annotations

from tapeline.data.registry import DATASETS
from tapeline.data.shape import DataShape


def data_shape(config) -> DataShape:
    classes = DATASETS[config.dataset].classes if config.dataset in DATASETS else tuple(str(label) for label in range(10))
    return DataShape((28, 28, 1), classes)
