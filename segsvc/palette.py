"""Class colours shared by datasets, artifacts, overlays and reports."""

from __future__ import annotations

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
