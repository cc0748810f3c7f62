"""Where a dataset's labels sit relative to the image they label, to a fraction of a pixel.

Hand-drawn labels can be offset from the structure they mark by a constant
sub-pixel amount: the ISBI 2012 membrane labels lie about 0.6 px above the dark
membranes of their slices (``training/RESULTS.md``). A network trained with
flips and 90-degree turns then sees that offset in every direction and cannot
learn it, so it misplaces every edge by it.

``label_offset`` measures it on one labelled image: the shift of a class's mask
that best matches the image's intensity (normalised cross-correlation at integer
shifts, refined to sub-pixel by a parabola through the peak). The correlation's
sign at zero shift tells whether the class is darker or brighter than the rest.
``dataset_offsets`` measures every image of a split (``segsvc data offset``
prints them). The trainer's ``data.register`` option measures the training split,
resamples the training images by the mean (``shift_image``) so that images and
labels agree, and publishes the same shift in the inference contract
(``InferenceSpec.shift``), which serving applies to every input.

Example:
    >>> mask = np.zeros((64, 64), np.uint8); mask[20:24] = 1; mask[:, 30:33] = 1   # dark membranes
    >>> image = (200 - 150 * shift_image(mask.astype(np.float32), (0.5, 0.0))).astype(np.uint8)
    >>> dy, dx = label_offset(image, mask == 1)    # the labels are drawn half a pixel above the image's
    >>> round(dy, 1), round(dx, 1)
    (-0.5, 0.0)
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from segsvc.config import MAX_INPUT_SHIFT
from segsvc.errors import DatasetError

__all__ = ["dataset_offsets", "label_offset", "mean_offset", "parabola_peak", "shift_image"]


def shift_image(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """``image`` translated by ``(dy, dx)`` px (bilinear; mirrored beyond the border); same shape and dtype.

    Output pixel ``(y, x)`` is input pixel ``(y - dy, x - dx)``: content moves by ``+shift``.
    """
    dy, dx = float(shift[0]), float(shift[1])
    if dy == 0.0 and dx == 0.0:
        return image
    h, w = image.shape[:2]
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)  # cv2 drops a single channel axis


def parabola_peak(c: np.ndarray) -> float:
    """Sub-pixel position in [-0.5, 0.5] of the maximum of three samples at -1, 0, 1."""
    curvature = c[0] - 2 * c[1] + c[2]
    return 0.0 if curvature >= 0 else float(np.clip(0.5 * (c[0] - c[2]) / curvature, -0.5, 0.5))


def _correlation_peak(grey: np.ndarray, b: np.ndarray, radius: int) -> tuple[float, float]:
    """The shift of the standardised mask ``b`` best matching ``grey``: integer peak plus a parabola."""
    h, w = b.shape
    a = (grey - grey.mean()) / grey.std()
    inner = a[radius : h - radius, radius : w - radius]
    size = 2 * radius + 1
    corr = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            corr[i, j] = float((inner * b[i : i + h - 2 * radius, j : j + w - 2 * radius]).mean())
    corr *= np.sign(corr[radius, radius]) or 1.0  # a dark class correlates negatively
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    iy, ix = np.unravel_index(int((corr - 1e-9 * (ys**2 + xs**2)).argmax()), corr.shape)  # ties: the nearest
    if iy in (0, size - 1) or ix in (0, size - 1):
        raise DatasetError(f"the labels are offset from the image by {radius} px or more; "
                           "the images and masks look misregistered")
    return (float(iy - radius + parabola_peak(corr[iy - 1 : iy + 2, ix])),
            float(ix - radius + parabola_peak(corr[iy, ix - 1 : ix + 2])))


def label_offset(image: np.ndarray, mask: np.ndarray, radius: int = 2, passes: int = 4) -> tuple[float, float]:
    """The ``(dy, dx)`` px by which ``mask`` is drawn away from the structure it marks in ``image``.

    ``mask(y + dy, x + dx)`` matches the structure at ``image(y, x)`` best; ``shift_image(image, (dy, dx))``
    moves the structure onto the mask. A parabola through a correlation peak is biased
    towards whole pixels (by up to 0.15 px here), so the image is shifted by the estimate
    and measured again, up to ``passes`` times: the offsets agree to about 0.03 px.

    Args:
        image: ``H x W`` or ``H x W x C`` (channels are averaged).
        mask: ``H x W`` boolean (or 0/1) mask of one class.
        radius: the largest integer shift tried on each axis.
        passes: measurements at most (the first, then re-measurements of the shifted image).

    Raises:
        DatasetError: sizes differ, the mask or image is constant, or the best shift is at the search border.
    """
    grey = np.asarray(image, np.float32)
    grey = grey.mean(axis=2) if grey.ndim == 3 else grey
    m = np.asarray(mask, np.float32)
    if grey.shape != m.shape:
        raise DatasetError(f"image {grey.shape} and mask {m.shape} differ in size")
    if min(m.shape) <= 4 * radius or grey.std() == 0 or m.std() == 0:
        raise DatasetError("label offset needs an image with contrast and a mask with both values, "
                           f"at least {4 * radius + 1} px on a side")
    b = (m - m.mean()) / m.std()
    dy, dx = _correlation_peak(grey, b, radius)
    for _ in range(passes - 1):
        ry, rx = _correlation_peak(shift_image(grey, (dy, dx)), b, radius)
        dy, dx = dy + ry, dx + rx
        if max(abs(ry), abs(rx)) < 0.01:
            break
    return dy, dx


def mean_offset(offsets: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """The mean ``(dy, dx)`` of per-image offsets, rounded to 0.01 px; refused beyond ``MAX_INPUT_SHIFT``."""
    arr = np.asarray(list(offsets), np.float64).reshape(-1, 2)
    if not len(arr):
        raise DatasetError("no labelled images to measure the label offset on")
    dy, dx = (round(float(v), 2) for v in arr.mean(axis=0))
    if max(abs(dy), abs(dx)) > MAX_INPUT_SHIFT:
        raise DatasetError(f"the labels are offset from the images by ({dy}, {dx}) px on average, more than "
                           f"{MAX_INPUT_SHIFT}; the images and masks look misregistered")
    return dy, dx


def dataset_offsets(
    read: Callable[[int], tuple[np.ndarray, np.ndarray]],
    indices: Sequence[int],
    class_id: int,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> np.ndarray:
    """``label_offset`` of class ``class_id`` on each distinct sample of ``indices`` (``read(i) -> image, labels``).

    Returns an ``N x 2`` array of ``(dy, dx)`` in sorted sample order.

    Raises:
        DatasetError: a sample cannot be measured (the class is absent, no contrast, misregistered), named.
    """
    offsets = []
    for index in progress(sorted(set(indices))):
        image, labels = read(index)
        try:
            offsets.append(label_offset(image, np.asarray(labels) == class_id))
        except DatasetError as exc:
            raise DatasetError(f"sample {index}: {exc}") from None
    return np.asarray(offsets, np.float64).reshape(-1, 2)
