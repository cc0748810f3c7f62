"""Training items: padding with an ignore index past 255 stays the ignore index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segsvc.data.datasets import build_dataset
from segsvc.data.spec import spec_from_dict
from segsvc.data.transforms import train_transform


def test_synthetic_masks_are_padded_with_an_ignore_index_over_255() -> None:
    # generated labels were uint8: padding them with 300 saturated to 255, neither a class nor ignored,
    # so the loss met a target out of range
    spec = spec_from_dict({"format": "synthetic", "classes": ["background", "circle"], "ignore_index": 300,
                           "splits": {"train": {"count": 2, "seed": 0}}, "options": {"size": [32, 32]}}, Path("."))
    dataset = build_dataset(spec, "train", train_transform("none", crop_hw=(48, 48), ignore_index=300, seed=0))
    _, labels = dataset[0]
    assert set(labels.unique().tolist()) <= {0, 1, 300} and 300 in labels.unique().tolist()
    assert dataset.read(0)[1].dtype == np.uint16
