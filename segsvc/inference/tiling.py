"""Sliding-window inference and horizontal-flip test-time augmentation.

Both wrap a ``logits(batch)`` callable (``Predictor.logits`` or a bare model):
``[N, C, H, W]`` images in, ``[N, K, H, W]`` logits out. Sliding windows let a
model trained on crops see large images at its training scale and bound the
memory of one forward pass; overlapping tiles are blended with a smooth window
so tile seams do not show in the prediction. Nothing here depends on training.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from segsvc.errors import Cancelled, InvalidArgument

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
StopFn = Callable[[], bool]


def _check(should_stop: StopFn | None) -> None:
    """Stop between passes once every caller of the batch has gone (deadline or cancel)."""
    if should_stop is not None and should_stop():
        raise Cancelled("every request of the batch was abandoned; the remaining passes were skipped")


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with at least ``overlap`` overlap.

    The last tile is aligned to the end, so every tile lies inside the image.

    Example:
        >>> tile_starts(10, 4, 0.0)
        [0, 3, 6]
    """
    if tile >= size:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = math.ceil((size - tile) / stride) + 1
    if count == 1:
        return [0]
    # spread the tiles evenly between the first and the end-aligned last position
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def blend_window(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A separable sine window ``[height, width]``: 1 in the middle, small but positive at the edges."""

    def one(n: int) -> torch.Tensor:
        return torch.sin(math.pi * (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n)

    return one(height)[:, None] * one(width)[None, :]


def sliding_window_logits(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    tile: tuple[int, int],
    overlap: float = 0.25,
    tile_batch: int = 4,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Logits of ``images`` ``[N, C, H, W]`` computed tile by tile and blended.

    Args:
        logits_fn: maps ``[B, C, h, w]`` to ``[B, K, h, w]``.
        images: the full images.
        tile: ``(height, width)`` of a tile; clipped to the image size.
        overlap: fraction of a tile shared with its neighbour, in ``[0, 1)``.
        tile_batch: tiles per call of ``logits_fn``.
        should_stop: checked between tile batches; True raises ``Cancelled``.
    Returns:
        float32 logits ``[N, K, H, W]``: per pixel, the window-weighted mean of the tiles covering it.
    """
    if images.ndim != 4:
        raise InvalidArgument(f"sliding-window inference needs [N,C,H,W] images, got {tuple(images.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise InvalidArgument(f"tile overlap must be in [0, 1), got {overlap}")
    if tile[0] < 1 or tile[1] < 1 or tile_batch < 1:
        raise InvalidArgument(f"tile size and tile batch must be positive, got tile={tile}, batch={tile_batch}")
    n, _, h, w = images.shape
    th, tw = min(tile[0], h), min(tile[1], w)
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    window = blend_window(th, tw, images.device)
    total: torch.Tensor | None = None
    weight = torch.zeros((1, 1, h, w), dtype=torch.float32, device=images.device)
    for y, x in boxes:
        weight[..., y : y + th, x : x + tw] += window
    crops = [(i, y, x) for i in range(n) for y, x in boxes]
    for start in range(0, len(crops), tile_batch):
        _check(should_stop)
        chunk = crops[start : start + tile_batch]
        batch = torch.stack([images[i, :, y : y + th, x : x + tw] for i, y, x in chunk])
        out = logits_fn(batch).float()
        if total is None:
            total = torch.zeros((n, out.shape[1], h, w), dtype=torch.float32, device=out.device)
            window, weight = window.to(out.device), weight.to(out.device)
        for (i, y, x), logits in zip(chunk, out):
            total[i, :, y : y + th, x : x + tw] += logits * window
    assert total is not None  # at least one tile always exists
    return total / weight


def hflip_tta_logits(logits_fn: LogitsFn, images: torch.Tensor, should_stop: StopFn | None = None) -> torch.Tensor:
    """Mean of the logits of the images and of their mirror images (mirrored back)."""
    plain = logits_fn(images).float()
    _check(should_stop)
    flipped = logits_fn(torch.flip(images, dims=[-1])).float()
    return (plain + torch.flip(flipped, dims=[-1])) / 2


def make_logits_fn(
    logits_fn: LogitsFn,
    tile: tuple[int, int] | None = None,
    overlap: float = 0.25,
    hflip: bool = False,
    tile_batch: int = 4,
    should_stop: StopFn | None = None,
) -> LogitsFn:
    """Compose flip TTA (outer) and sliding windows (inner) around ``logits_fn``.

    Example:
        >>> fn = make_logits_fn(lambda x: x[:, :2], tile=(32, 32), overlap=0.5, hflip=True)
        >>> fn(torch.zeros(1, 3, 48, 80)).shape
        torch.Size([1, 2, 48, 80])
    """
    inner = logits_fn
    if tile is not None:
        def inner(x: torch.Tensor) -> torch.Tensor:
            return sliding_window_logits(logits_fn, x, tile, overlap, tile_batch, should_stop)
    if not hflip:
        return inner
    return lambda x: hflip_tta_logits(inner, x, should_stop)
