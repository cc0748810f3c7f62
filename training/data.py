"""Training and validation samples for the trainer.

Training items are augmented from a dataset's raw ``read(i)`` with a seed
derived from ``(seed, epoch, index)``: the augmentation of a sample depends on
nothing else (not the worker that loads it, not an interruption), which is what
lets ``--resume`` continue exactly. Both splits end in the shared
``segsvc.data.transforms.preprocess``. Per-pixel loss weights that depend on
the mask (the U-Net border weights of ``loss: weighted_ce``) are computed here,
from the augmented mask, so they follow every flip, crop and deformation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segsvc.config import InferenceSpec, InputSpec
from segsvc.data.registration import shift_image
from segsvc.data.spec import DatasetSpec
from segsvc.data.transforms import LabelScale, preprocess, reseed
from segsvc.errors import InvalidArgument, SegsvcError
from segsvc.inference.contract import network_input

T = TypeVar("T")


def sample_seed(*parts: int) -> int:
    """A 32-bit seed that is a pure function of ``parts`` (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def select_indices(length: int, span: tuple[int, int] | None, limit: int | None) -> list[int]:
    """Positions ``[start, stop)`` of a split (all by default), then at most ``limit`` (>= 1) of them."""
    start, stop = span if span is not None else (0, length)
    if not 0 <= start < stop <= length:
        raise InvalidArgument(f"index range [{start}, {stop}) does not fit a split of {length} samples")
    if limit is not None and limit < 1:  # a negative one would slice from the end: [:-1] drops the last sample
        raise InvalidArgument(f"a sample limit must be at least 1, got {limit}")
    indices = list(range(start, stop))
    return indices[:limit] if limit is not None else indices


def require_labels(data: DatasetSpec, split: str, name: str, purpose: str) -> None:
    """Refuse a split the dataset lacks (naming the ones it has) or one without masks (``masks: null``).

    An unlabelled split reads as masks that are void everywhere: every metric on it is NaN and
    every loss 0, so training or evaluating on it would report nothing, not fail.
    """
    labelled = data.split(split).labelled or data.format == "synthetic"  # synthetic splits draw their masks
    if not labelled:
        raise InvalidArgument(f"{name} {split!r} of {data.name} has no labels (masks: null): {purpose}")


def rescale_transform(scale: tuple[float, float]) -> A.BasicTransform | None:
    """Random isotropic rescaling by a factor in ``[lo, hi]`` (None when it is the identity)."""
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ValueError(f"data.scale must be 0 < lo <= hi, got {scale}")
    if lo == hi == 1.0:
        return None
    return LabelScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                      area_for_downscale="image", p=1.0)


class TrainSamples(Dataset):
    """Augmented ``(image CxHxW float, mask HxW long)`` items from ``base.read``.

    Args:
        base: a segsvc dataset (``read(i) -> (uint8 image, int mask)``).
        indices: positions of ``base`` to use.
        transform: an albumentations ``Compose`` (or None for no augmentation).
        input_spec: normalisation for ``preprocess``.
        seed: the run's seed; call ``set_epoch`` before each epoch.
        pixel_weights: maps the augmented mask to per-pixel loss weights (``HxW`` float);
            when given, items are ``(image, mask, weights)``
            (``training.losses.border_weight_function``).
        shift: ``(dy, dx)`` px every image is translated by before augmentation, so
            that it lies under its labels (``data.register``, ``segsvc.data.registration``).
    """

    def __init__(
        self,
        base: Any,
        indices: Sequence[int],
        transform: A.Compose | None,
        input_spec: InputSpec,
        seed: int,
        pixel_weights: Callable[[np.ndarray], np.ndarray] | None = None,
        shift: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.input_spec = input_spec
        self.shift = shift
        self.seed = seed
        self.pixel_weights = pixel_weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        index = self.indices[i]
        image, mask = self.base.read(index)
        image = shift_image(image, self.shift)
        if self.transform is not None:
            # by position, so a sample listed twice (data.repeat) gets two different augmentations
            reseed(self.transform, sample_seed(self.seed, self.epoch, i))
            out = self.transform(image=image, mask=np.asarray(mask))
            image, mask = out["image"], out["mask"]
        item = (preprocess(image, self.input_spec), torch.from_numpy(np.asarray(mask, dtype=np.int64)))
        if self.pixel_weights is None:
            return item
        return (*item, torch.from_numpy(np.asarray(self.pixel_weights(np.asarray(mask)), dtype=np.float32)))


class EvalSamples(Dataset):
    """Un-augmented items for validation: the image as the contract prepares it, and the full-size mask.

    ``network_input`` is the serving contract's first step (``segsvc.inference.contract``):
    the image is shifted and resized (``data.val_scale``) exactly as the server does
    for the published model; the evaluation loop resizes the logits back, so
    metrics are always computed on the original labels.
    """

    def __init__(self, base: Any, indices: Sequence[int], input_spec: InputSpec,
                 contract: InferenceSpec = InferenceSpec()) -> None:
        self.base = base
        self.indices = list(indices)
        self.input_spec = input_spec
        self.contract = contract

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.base.read(self.indices[i])
        return network_input(image, self.input_spec, self.contract), torch.from_numpy(np.asarray(mask, dtype=np.int64))


def worker_batches(loader: Iterable[T]) -> Iterator[T]:
    """The loader's batches; a segsvc error raised in a ``data.workers`` process keeps its own message.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as the message
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."), which the command line
    would print as the error; this gives the error its own message back.
    """
    try:
        yield from loader
    except SegsvcError as exc:
        text, marker = str(exc), f"\n{type(exc).__module__}.{type(exc).__qualname__}: "
        start = text.rfind(marker)
        if "Original Traceback" not in text or start < 0:
            raise
        raise type(exc)(text[start + len(marker):].rstrip()) from None


def stack_batch(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Collate equal-size ``(image, mask[, pixel weights])`` items; a clear error when sizes differ."""
    fields = list(zip(*items))
    shapes = {tuple(x.shape) for x in fields[0]}
    if any(len({tuple(t.shape) for t in field}) > 1 for field in fields):
        raise InvalidArgument(
            f"cannot batch images of different sizes {sorted(shapes)}: set a crop "
            "(data.crop) for training or train.val_batch_size=1 for evaluation"
        )
    return tuple(torch.stack(field) for field in fields)
