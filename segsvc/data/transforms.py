"""Image preprocessing shared by training, evaluation and serving, and training augmentation.

``preprocess`` is the one evaluation/inference preprocessing function: the
evaluation loop, the predictor and the gRPC server all call it, so a model sees
exactly the same input at serving time as when it was measured. Evaluation
applies no augmentation, only ``preprocess``. It is defined in
``segsvc.data.preprocess`` (which serving imports without albumentations) and
re-exported here.

``train_transform`` builds the named augmentation presets (albumentations 2.x):
image and mask go through the same geometric transform, masks are resampled
without blending labels (``resize_labels`` for scaling, nearest neighbour
otherwise) and padding of the mask is filled with the ignore index, so padded
pixels count in neither loss nor metrics.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop

from segsvc.data.preprocess import as_hwc, preprocess
from segsvc.errors import InvalidArgument

__all__ = ["PRESETS", "ClassUniformCrop", "LabelScale", "as_hwc", "preprocess", "reseed", "resize_labels",
           "train_transform"]


# -- label maps resized in register with their images ------------------------------------------
def resize_labels(mask: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``mask`` (``HxW`` class ids) resized to ``size`` (height, width), in register with its image.

    OpenCV's ``INTER_NEAREST`` takes source pixel ``floor(i / s)`` for output pixel
    ``i``: corner-aligned, while ``INTER_LINEAR`` and ``INTER_AREA`` resize images
    centre-aligned. A mask resized with it sits about half an output pixel below and
    to the right of its image at any scale that is not a whole-number enlargement
    (a quarter pixel on average at exactly x0.5), and a network trained on it learns
    that offset. Here an enlargement takes the source pixel under each output
    pixel's centre (``INTER_NEAREST_EXACT``); a reduction gives each output pixel
    the class that covers most of its area (each class's share resized with
    ``INTER_AREA``), exact ties broken at random from ``rng`` so that no class
    wins every boundary. Labels are never blended.

    Example:
        >>> m = np.array([[0, 0, 1, 1]] * 2, np.uint8)
        >>> resize_labels(m, (1, 2), np.random.default_rng(0)).tolist()
        [[0, 1]]
    """
    if mask.ndim == 3:
        return np.stack([resize_labels(mask[..., c], size, rng) for c in range(mask.shape[2])], axis=2)
    height, width = size
    if (height, width) == mask.shape:
        return mask
    if height >= mask.shape[0] and width >= mask.shape[1]:
        return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    values = np.flatnonzero(np.bincount(mask.ravel())) if mask.dtype.kind == "u" else np.unique(mask)
    out = np.full((height, width), values[0], mask.dtype)
    if len(values) == 1:
        return out
    best = np.full((height, width), -1.0, np.float32)
    wins = np.empty((height, width), bool)
    # a hundredth of the share one source pixel has in an output pixel: it decides only (near) ties
    jitter = 0.01 * height * width / mask.size
    for value in values:
        share = cv2.resize((mask == value).astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        share += rng.random((height, width), dtype=np.float32) * np.float32(jitter)
        np.greater(share, best, out=wins)
        np.copyto(out, out.dtype.type(value), where=wins)
        np.maximum(best, share, out=best)
    return out


class LabelScale(A.RandomScale):
    """``A.RandomScale`` whose mask is resized by ``resize_labels``: in register with the image.

    The image is resized as ``A.RandomScale`` does (``interpolation``, or
    ``INTER_AREA`` when shrinking with ``area_for_downscale="image"``).
    """

    def __init__(self, scale_limit: tuple[float, float], interpolation: int = cv2.INTER_LINEAR,
                 area_for_downscale: str | None = None, p: float = 1.0) -> None:
        if area_for_downscale == "image_mask":
            raise InvalidArgument("LabelScale resizes masks itself: area_for_downscale may be None or 'image'")
        super().__init__(scale_limit=scale_limit, interpolation=interpolation,
                         area_for_downscale=area_for_downscale, p=p)

    def apply_to_mask(self, mask: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        height, width = mask.shape[:2]
        return resize_labels(mask, (int(height * scale), int(width * scale)), self.random_generator)


# -- training augmentation presets ---------------------------------------------------------
class ClassUniformCrop(BaseCrop):
    """A crop of ``height x width`` that, for a ``fraction`` of the samples, contains a pixel of a
    class drawn uniformly from the classes present in the mask (class-uniform sampling, Zhu et al.,
    CVPR 2019); the other crops are uniform random crops, as ``A.RandomCrop``'s.

    Rare classes (poles, signs, pedestrians) are then seen in far more crops
    than their pixel share gives them, without re-weighting the loss. The drawn
    pixel lies at a uniformly random position inside the crop (clamped to the
    image). The image must be at least the crop size (the presets pad first).

    Example:
        >>> mask = np.zeros((64, 64), np.uint8); mask[60, 2] = 1
        >>> t = A.Compose([ClassUniformCrop(8, 8, fraction=1.0, ignore_index=255)], seed=0)
        >>> hits = sum(1 in t(image=np.zeros((64, 64, 3), np.uint8), mask=mask)["mask"] for _ in range(20))
        >>> hits > 5   # a uniform crop would contain the pixel about 1 time in 57
        True
    """

    def __init__(self, height: int, width: int, fraction: float, ignore_index: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 0.0 <= fraction <= 1.0:
            raise InvalidArgument(f"the class-uniform fraction of crops must lie in [0, 1], got {fraction}")
        self.height, self.width, self.fraction, self.ignore_index = height, width, fraction, ignore_index

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        if h < self.height or w < self.width:
            raise InvalidArgument(f"ClassUniformCrop: the image ({h}x{w}) is smaller than the crop "
                                  f"({self.height}x{self.width}); pad it first")
        rng = self.random_generator
        y0, x0 = int(rng.integers(h - self.height + 1)), int(rng.integers(w - self.width + 1))
        mask = data.get("mask")
        if mask is not None and rng.random() < self.fraction:
            labels = np.asarray(mask).reshape(h, w)
            counts = np.bincount(labels.ravel())
            present = [c for c in np.flatnonzero(counts) if c != self.ignore_index]
            if present:
                ys, xs = np.nonzero(labels == present[int(rng.integers(len(present)))])
                k = int(rng.integers(len(ys)))
                y0 = min(max(int(ys[k]) - int(rng.integers(self.height)), 0), h - self.height)
                x0 = min(max(int(xs[k]) - int(rng.integers(self.width)), 0), w - self.width)
        return {"crop_coords": (x0, y0, x0 + self.width, y0 + self.height)}


def _pad_and_crop(crop_hw: tuple[int, int] | None, ignore_index: int, class_uniform: float = 0.0) -> list[A.BasicTransform]:
    """Pad to at least the crop (mask padding = ignore), then take a random (or class-uniform) crop."""
    if crop_hw is None:
        return []
    h, w = crop_hw
    crop = ClassUniformCrop(h, w, class_uniform, ignore_index) if class_uniform > 0 else A.RandomCrop(height=h, width=w)
    return [
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        crop,
    ]


def _street(crop: list[A.BasicTransform]) -> list[A.BasicTransform]:
    """Street scenes (CamVid): scale jitter 0.5-2x, pad + random crop, horizontal flip, colour jitter."""
    return [
        LabelScale(scale_limit=(-0.5, 1.0), interpolation=cv2.INTER_LINEAR, p=1.0),
        *crop,
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
    ]  # fmt: skip


def _em(crop: list[A.BasicTransform]) -> list[A.BasicTransform]:
    """Electron microscopy (ISBI): no preferred orientation, so flips and 90-degree turns;
    elastic deformation as in the U-Net paper; brightness/contrast for section-to-section variation.

    The crop comes last: a 90-degree turn swaps height and width, and padding
    added after the deformation stays exactly the ignore index.
    """
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        # about 2 px mean displacement, local stretch at most ~2x (no folds);
        # reflection at the border keeps image and mask aligned
        A.ElasticTransform(alpha=300, sigma=10, interpolation=cv2.INTER_LINEAR,
                           mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.8),
        *crop,
    ]  # fmt: skip


def _synthetic(crop: list[A.BasicTransform]) -> list[A.BasicTransform]:
    """The synthetic shapes: flips plus light colour jitter (the generator already varies a lot)."""
    return [
        *crop,
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, p=0.5),
    ]


def _none(crop: list[A.BasicTransform]) -> list[A.BasicTransform]:
    """No augmentation; with a crop size, only pad + random crop so mixed sizes can be batched."""
    return crop


PRESETS: dict[str, Callable[[list[A.BasicTransform]], list[A.BasicTransform]]] = {
    "street": _street,
    "em": _em,
    "synthetic": _synthetic,
    "none": _none,
}
NEEDS_CROP = frozenset({"street"})  # presets that change the image size, so batches need a crop


def train_transform(
    preset: str,
    crop_hw: tuple[int, int] | None = None,
    ignore_index: int | None = 255,
    seed: int | None = None,
    *,
    crop: tuple[int, int] | None = None,
    class_uniform: float = 0.0,
) -> A.Compose:
    """The named training augmentation, applied as ``t(image=uint8, mask=labels)``.

    Args:
        preset: one of ``PRESETS`` (``street``, ``em``, ``synthetic``, ``none``).
        crop_hw: training crop (height, width); required by ``street``. Smaller
            images are padded first, the mask with ``ignore_index``.
        ignore_index: the mask value of padded pixels (required when cropping).
        seed: fixes the augmentation stream (``None``: fresh entropy). The
            datasets reseed it per DataLoader worker, so workers do not repeat
            each other.
        crop: the same as ``crop_hw`` (the name the internal contract uses).
        class_uniform: the fraction of crops drawn around a pixel of a class chosen
            uniformly from the mask's classes (``ClassUniformCrop``); 0 is plain random crops.

    Example:
        >>> t = train_transform("street", crop_hw=(64, 64), seed=0)
        >>> out = t(image=np.zeros((40, 50, 3), np.uint8), mask=np.zeros((40, 50), np.uint8))
        >>> out["image"].shape, out["mask"].shape
        ((64, 64, 3), (64, 64))
    """
    try:
        build = PRESETS[preset]
    except KeyError:
        raise InvalidArgument(f"unknown augmentation preset {preset!r}; valid: {', '.join(PRESETS)}") from None
    if crop is not None and crop_hw is not None and tuple(crop) != tuple(crop_hw):
        raise InvalidArgument(f"give the crop once: crop_hw={crop_hw!r} and crop={crop!r} differ")
    crop_hw = crop_hw if crop_hw is not None else crop
    if crop_hw is not None and (len(crop_hw) != 2 or min(crop_hw) < 1):
        raise InvalidArgument(f"crop_hw must be (height, width) with positive sizes, got {crop_hw!r}")
    if crop_hw is not None and ignore_index is None:
        raise InvalidArgument("cropping pads masks with the ignore index, but the dataset has none")
    if ignore_index is not None and not 0 <= ignore_index <= 65535:
        raise InvalidArgument(f"ignore_index must fit a mask pixel (0..65535), got {ignore_index}")
    if preset in NEEDS_CROP and crop_hw is None:
        raise InvalidArgument(f"the {preset!r} preset changes the image size: give crop_hw=(height, width)")
    if class_uniform and crop_hw is None:
        raise InvalidArgument("class-uniform crops need a crop size")
    size = (int(crop_hw[0]), int(crop_hw[1])) if crop_hw is not None else None
    crop = _pad_and_crop(size, ignore_index if ignore_index is not None else 0, class_uniform)
    transform = A.Compose(build(crop))
    if seed is not None:
        reseed(transform, seed)
    return transform


def reseed(transform: A.Compose, seed: int) -> None:
    """Start ``transform``'s random stream at ``seed``: one generator pair shared by all its transforms.

    Not ``Compose.set_random_seed``: in albumentations 2.0 it gives every transform of
    the pipeline a generator of its own, started from that same seed, so each one's
    first draw is the same number. Every coin flip of a pipeline then comes up alike
    (the ``em`` preset's two flips were always both done or both skipped: only
    rotations, never a mirror image) and the first parameter each draws is tied to
    the others (the ``street`` preset zoomed only unflipped crops, and took its
    close-ups from the bottom of the image).
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
