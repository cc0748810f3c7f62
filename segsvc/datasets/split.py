"""A deterministic val split for a dataset that comes without one.

Which split gives its samples (``source_split``): the only split of a dataset
with one labelled split (``all``, ``train``, or a list's name), which becomes
``train`` and ``val``; else ``train``, when the dataset has a labelled ``train``
and no ``val`` (its other splits, such as ``test``, stay as they are). Training
reads ``train`` and ``val``.

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


def source_split(spec: DatasetSpec) -> str | None:
    """The split ``val`` is assigned from: the only split (when labelled), else ``train`` when there is no ``val``."""
    if len(spec.splits) == 1:
        name, split = next(iter(spec.splits.items()))
        return name if split.labelled else None
    train = spec.splits.get("train")
    return "train" if "val" not in spec.splits and train is not None and train.labelled else None


def needs_split(spec: DatasetSpec) -> bool:
    """True when the dataset has no val split to train with but a split to take one from (``source_split``)."""
    return source_split(spec) is not None


def assign_splits(spec: DatasetSpec, val_fraction: float = VAL_FRACTION) -> DatasetSpec:
    """The spec with its ``source_split`` replaced by ``train`` and ``val`` listing their sample ids.

    The other splits stay as they are, in their place. Returns ``spec`` unchanged when
    it needs no split (``needs_split``) or its source split has fewer than two samples.
    """
    name = source_split(spec)
    if name is None or not 0.0 < val_fraction < 1.0:
        return spec
    split = spec.splits[name]
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
    assigned = {
        "train": SplitSpec(**layout, ids=tuple(sorted(train, key=natural_key))),
        "val": SplitSpec(**layout, ids=tuple(sorted(val, key=natural_key))),
    }
    splits: dict[str, SplitSpec] = {}
    for other, kept in spec.splits.items():
        splits.update(assigned if other == name else {other: kept})
    return replace(spec, splits=splits)
