"""A deterministic train/val split for a dataset that comes with only one split.

Each sample goes to ``val`` when the SHA-256 of its image's path relative to
the dataset root, read as a fraction in [0, 1), is below ``val_fraction``. A
sample's split therefore depends on its own name only: the same files always
split the same way, on any machine, and adding samples never moves the old
ones. Should the hash put every sample on one side (tiny datasets), the
sample with the smallest (or largest) fraction crosses over, so both splits
are non-empty.

Example:
    >>> split_fraction("images/000001.png") < 1.0
    True
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from segsvc.data.layouts import index_split, natural_key
from segsvc.data.spec import DatasetSpec, SplitSpec

VAL_FRACTION = 0.2


def split_fraction(rel: str) -> float:
    """Where a sample's relative path hashes to, as a fraction in [0, 1)."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0**64


def needs_split(spec: DatasetSpec) -> bool:
    """True when the dataset defines a single labelled split (``all``, or only ``train``)."""
    return len(spec.splits) == 1 and next(iter(spec.splits.values())).labelled


def assign_splits(spec: DatasetSpec, val_fraction: float = VAL_FRACTION) -> DatasetSpec:
    """The spec with its single split replaced by ``train`` and ``val`` listing their sample ids.

    Returns ``spec`` unchanged when it already has several splits, or fewer than two samples.
    """
    if not needs_split(spec) or not 0.0 < val_fraction < 1.0:
        return spec
    name, split = next(iter(spec.splits.items()))
    samples = index_split(spec, name).samples
    if len(samples) < 2:
        return spec
    ranked = sorted((split_fraction(s.image.relative_to(spec.root).as_posix()), s.name) for s in samples)
    val = [n for f, n in ranked if f < val_fraction]
    train = [n for f, n in ranked if f >= val_fraction]
    if not val:
        val, train = [ranked[0][1]], train[1:]
    elif not train:
        train, val = [ranked[-1][1]], val[:-1]
    layout = {"images": split.images, "masks": split.masks}
    return replace(spec, splits={
        "train": SplitSpec(**layout, ids=tuple(sorted(train, key=natural_key))),
        "val": SplitSpec(**layout, ids=tuple(sorted(val, key=natural_key))),
    })
