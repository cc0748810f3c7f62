"""Torch datasets over a ``DatasetSpec``: ``build_dataset(spec, split, transform)``.

Every item is ``(image, mask)``: the image a float ``C x H x W`` tensor made by
``preprocess`` (the same function serving uses), the mask a ``LongTensor``
``H x W`` of class ids with ``ignore_index`` for void and padding. The optional
``transform`` is an albumentations pipeline applied to the uint8 image and the
mask together before ``preprocess``; evaluation passes none.

``read(i)`` gives the raw pair (uint8 image, integer mask) for checks,
visualisation and batch jobs; ``names`` gives the sample ids.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from segsvc.config import InputSpec
from segsvc.data.io import read_image, read_label_file
from segsvc.data.labels import LabelMapper
from segsvc.data.layouts import Sample, index_split
from segsvc.data.spec import DatasetSpec
from segsvc.data.synthetic import SyntheticConfig, generate_sample
from segsvc.data.transforms import preprocess, reseed
from segsvc.errors import DatasetError

Transform = Callable[..., dict[str, Any]]


class SegmentationDataset(Dataset, ABC):
    """Base class: turns ``read(i)`` into training items; subclasses say how to read.

    Args:
        spec: the dataset description (classes, ignore index, channels...).
        transform: albumentations ``Compose`` called as ``transform(image=..., mask=...)``.
        input_spec: normalisation; defaults to ``spec.input_spec()``.
    """

    def __init__(self, spec: DatasetSpec, transform: Transform | None = None, input_spec: InputSpec | None = None):
        if spec.num_classes == 0:
            where = spec.source or spec.root
            raise DatasetError(f"{where}: the dataset names no classes; describe it in a dataset.yaml")
        self.spec = spec
        self.transform = transform
        self.input_spec = input_spec or spec.input_spec()
        if self.input_spec.channels != spec.channels:
            raise DatasetError(
                f"input spec has {self.input_spec.channels} channels but dataset {spec.name!r} has {spec.channels}"
            )
        self.names: list[str] = []
        self._seeded_for: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    @abstractmethod
    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw sample: uint8 image (``H x W x 3`` or ``H x W``) and integer labels ``H x W``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, mask = self.read(index)
        if self.transform is not None:
            self._reseed_in_worker()
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return preprocess(image, self.input_spec), torch.from_numpy(np.asarray(mask, dtype=np.int64))


    def _reseed_in_worker(self) -> None:
        """Give each DataLoader worker (and each epoch's workers) its own augmentation stream.

        albumentations' ``Compose`` owns its random generator; forked workers
        would otherwise all copy the same state and apply identical augmentations.
        """
        info = get_worker_info()
        if info is None or not hasattr(self.transform, "set_random_state"):
            return
        key = (os.getpid(), info.seed)
        if self._seeded_for != key:
            reseed(self.transform, info.seed % 2**32)
            self._seeded_for = key


class FileDataset(SegmentationDataset):
    """Image/mask files of one split of a folder, CamVid, membrane or VOC dataset.

    The split is indexed when the dataset is built; a split with missing
    partners or a broken layout is refused then, with the first problems listed
    (``segsvc data check`` lists them all). Unlabelled splits (``masks: null``)
    give masks that are ``ignore_index`` everywhere.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        transform: Transform | None = None,
        input_spec: InputSpec | None = None,
    ):
        super().__init__(spec, transform, input_spec)
        index = index_split(spec, split)
        if index.problems:
            shown = "\n  ".join(str(p) for p in index.problems[:5])
            more = f"\n  ... and {len(index.problems) - 5} more" if len(index.problems) > 5 else ""
            raise DatasetError(
                f"dataset {spec.name!r} split {split!r} has {len(index.problems)} problem(s); "
                f"run `segsvc data check` for the full list:\n  {shown}{more}"
            )
        if not index.samples:
            raise DatasetError(f"dataset {spec.name!r} split {split!r} has no samples under {spec.root}")
        self.split = split
        self.samples: tuple[Sample, ...] = index.samples
        self.names = [s.name for s in index.samples]
        self.mapper = LabelMapper(spec)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = read_image(sample.image, channels=self.spec.channels)
        if sample.mask is None:
            fill = self.spec.ignore_index if self.spec.ignore_index is not None else 0
            return image, np.full(image.shape[:2], fill, dtype=self.mapper.dtype)
        mapped = self.mapper.apply(read_label_file(sample.mask, self.spec.mask_encoding), sample.mask)
        if mapped.labels.shape != image.shape[:2]:
            raise DatasetError(
                f"{sample.mask}: mask is {mapped.labels.shape[1]}x{mapped.labels.shape[0]} but image "
                f"{sample.image.name} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        if mapped.unknown and (self.spec.unknown_labels == "error" or self.spec.ignore_index is None):
            raise DatasetError(
                f"{sample.mask}: {self.mapper.describe(mapped.unknown)}; fix the mask, add a label_map entry, "
                f"or set unknown_labels: ignore"
            )
        return image, mapped.labels


class SyntheticDataset(SegmentationDataset):
    """Generated samples (no files): ``count`` samples of the split's seed.

    Sample ``i`` of a split is ``generate_sample(split.seed, i)``, so two
    datasets built from the same spec hold the same data.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        transform: Transform | None = None,
        input_spec: InputSpec | None = None,
    ):
        super().__init__(spec, transform, input_spec)
        split_spec = spec.split(split)
        if split_spec.count is None or split_spec.count < 1 or split_spec.seed is None:
            raise DatasetError(f"synthetic split {split!r} needs a positive count and a seed")
        self.split = split
        self.seed = split_spec.seed
        self.config = SyntheticConfig.from_spec(spec)
        self.names = [f"{split}-{i:06d}" for i in range(split_spec.count)]
        # wide enough for the ignore index that padding writes (uint8 would saturate 300 to 255, a non-label)
        self.label_dtype = LabelMapper(spec).dtype

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = generate_sample(self.seed, index, self.config)
        if self.spec.channels == 1:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return image, labels.astype(self.label_dtype, copy=False)


DATASETS: dict[str, type[SegmentationDataset]] = {
    "folder": FileDataset,
    "camvid": FileDataset,
    "membrane": FileDataset,
    "voc": FileDataset,
    "synthetic": SyntheticDataset,
}


def build_dataset(
    spec: DatasetSpec,
    split: str,
    transform: Transform | None = None,
    input_spec: InputSpec | None = None,
) -> SegmentationDataset:
    """The torch dataset of one split.

    Args:
        spec: from ``load_dataset_spec``.
        split: a key of ``spec.splits`` (``train``, ``val``...).
        transform: training augmentation (``train_transform(...)``); ``None`` for evaluation.
        input_spec: normalisation; defaults to the spec's (ImageNet for RGB).

    Example:
        >>> from segsvc.data.spec import load_dataset_spec
        >>> ds = build_dataset(load_dataset_spec("synthetic"), "val")
        >>> x, y = ds[0]; x.shape, y.dtype
        (torch.Size([3, 96, 96]), torch.int64)
    """
    try:
        cls = DATASETS[spec.format]
    except KeyError:
        raise DatasetError(f"no reader for dataset format {spec.format!r}; valid: {', '.join(DATASETS)}") from None
    return cls(spec, split, transform, input_spec)
