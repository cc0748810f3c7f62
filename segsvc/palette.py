"""Class colours shared by datasets, artifacts, overlays and reports.

NumPy only (no OpenCV, no torch), so the light client can paint label maps too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from segsvc.errors import InvalidArgument

Color = tuple[int, int, int]


def default_palette(n: int) -> tuple[Color, ...]:
    """The Pascal VOC colour map: distinct, stable colours for ``n`` classes (class 0 is black)."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def colorize(labels: np.ndarray, palette: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """RGB ``HxWx3`` uint8 image with each class painted in its palette colour.

    Labels outside the palette (e.g. an ignore index) are painted black.
    """
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut = np.zeros((max(65536 if labels.dtype == np.uint16 else 256, len(pal)), 3), np.uint8)
    lut[: len(pal)] = pal
    return lut[labels]


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of ``labels`` over ``image`` (RGB or grey) with opacity ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"overlay alpha must be in [0, 1], got {alpha}")
    if image.dtype != np.uint8:  # blended unscaled, 16-bit pixels would come out white and [0, 1] floats black
        raise InvalidArgument(f"overlay images must be uint8 arrays, got {image.dtype}")
    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    rgb = rgb[:, :, :3]
    if rgb.shape[:2] != labels.shape:
        raise InvalidArgument(f"overlay image is {rgb.shape[:2]} but the label map is {labels.shape}")
    colors = colorize(labels, palette)
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colors.astype(np.float32) * alpha
    return np.rint(blended).clip(0, 255).astype(np.uint8)
