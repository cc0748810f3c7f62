"""Sliding-window inference, horizontal-flip and multi-scale test-time augmentation.

Both wrap a ``logits(batch)`` callable (``Predictor.logits`` or a bare model):
``[N, C, H, W]`` images in, ``[N, K, H, W]`` logits out. Sliding windows let a
model trained on crops see large images at its training scale and bound the
memory of one forward pass; overlapping tiles are blended with a smooth window
so tile seams do not show in the prediction. Nothing here depends on training.

Two paddings (``InferenceSpec.tile_padding``):

- ``zero``: tiles lie inside the image; beyond its border the network sees
  zeros (the bottom/right padding to the stride is the backend's).
- ``reflect``: the U-Net paper's overlap-tile strategy. Each tile is a *core*
  whose logits are kept, plus ``context`` pixels on every side whose logits
  are dropped (``tile_size * tile_overlap / 2``: neighbouring tiles still share
  ``tile_overlap`` of their input); cores cover the image. Beyond the image
  border the context, and the padding to the stride and minimum size, is the
  mirrored image (``mirror_pad``), so the backend's own zero padding is a no-op.
  ``overlap_tile_layout`` is the geometry, shared with admission's cost estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from segsvc.errors import Cancelled, InvalidArgument

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
StopFn = Callable[[], bool]
PADDINGS = ("zero", "reflect")  # segsvc.config.TILE_PADDINGS


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
    count = tile_count(size, tile, overlap)
    if count == 1:
        return [0]
    # spread the tiles evenly between the first and the end-aligned last position
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def tile_count(size: int, tile: int, overlap: float) -> int:
    """``len(tile_starts(size, tile, overlap))`` without listing them: admission counts the tiles of a size read
    from a header, on the event loop and before ``max_tiles`` refuses it, so a list of millions of offsets would
    cost what it is there to bound.

    Example:
        >>> tile_count(10, 4, 0.0), tile_count(64_000_000, 16, 0.75)
        (3, 15999997)
    """
    if tile >= size:
        return 1
    stride = max(1, int(tile * (1.0 - overlap)))
    return math.ceil((size - tile) / stride) + 1


def round_up(size: int, multiple: int, min_size: int = 1) -> int:
    """The smallest length >= max(size, min_size) divisible by ``multiple``."""
    return -(-max(size, min_size) // multiple) * multiple


def mirror_indices(size: int, before: int, after: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Source positions of ``[-before, size + after)`` mirrored into ``[0, size)``, edge not repeated.

    numpy's ``reflect`` mode, for any pad width (a pad wider than the image
    mirrors back and forth); a single row or column is repeated.

    Example:
        >>> mirror_indices(3, 2, 4).tolist()
        [2, 1, 0, 1, 2, 1, 0, 1, 2]
    """
    index = torch.arange(-before, size + after, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """``[..., H, W]`` extended by the mirrored image on each side (``mirror_indices``)."""
    h, w = x.shape[-2:]
    if top == bottom == left == right == 0:
        return x
    rows = mirror_indices(h, top, bottom, x.device)
    cols = mirror_indices(w, left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def reflect_to_multiple(x: torch.Tensor, multiple: int, min_size: int = 1) -> torch.Tensor:
    """``[..., H, W]`` mirrored at the bottom/right to the stride and minimum size (the backend pads nothing more)."""
    h, w = x.shape[-2:]
    return mirror_pad(x, 0, round_up(h, multiple, min_size) - h, 0, round_up(w, multiple, min_size) - w)


@dataclass(frozen=True)
class OverlapTileLayout:
    """Where the tiles of a ``reflect`` (overlap-tile) pass lie, along both axes.

    Attributes:
        core: ``(h, w)`` of the part of a tile whose logits are kept.
        context: ``(h, w)`` pixels of context above/left of a core (as many below/right,
            plus ``extra``); their logits are dropped.
        extra: ``(h, w)`` more pixels below/right so a tile is a multiple of the stride.
        size: ``(h, w)`` of the image the cores cover.
    """

    core: tuple[int, int]
    context: tuple[int, int]
    extra: tuple[int, int]
    size: tuple[int, int]

    @property
    def ys(self) -> list[int]:
        """Start rows of the cores in the image (listed where the tiles are cut, after admission)."""
        return tile_starts(self.size[0], self.core[0], 0.0)

    @property
    def xs(self) -> list[int]:
        """Start columns of the cores in the image."""
        return tile_starts(self.size[1], self.core[1], 0.0)

    @property
    def input_size(self) -> tuple[int, int]:
        """``(h, w)`` of one tile as the network sees it: core, context on both sides, stride padding."""
        return (self.core[0] + 2 * self.context[0] + self.extra[0],
                self.core[1] + 2 * self.context[1] + self.extra[1])

    @property
    def tiles(self) -> int:
        """How many tiles, counted without listing them (``tile_count``)."""
        return tile_count(self.size[0], self.core[0], 0.0) * tile_count(self.size[1], self.core[1], 0.0)


def context_size(tile: int, overlap: float) -> int:
    """Context pixels on each side of an overlap tile of side ``tile``: half the overlap, leaving a core >= 1."""
    return min(round(tile * overlap / 2), (tile - 1) // 2)


def overlap_tile_layout(
    height: int, width: int, tile: tuple[int, int], overlap: float, stride: int = 1, min_size: int = 1
) -> OverlapTileLayout:
    """The tiles of an ``height x width`` image for ``reflect`` padding (see the module docstring).

    A tile of side ``tile`` is ``context`` + core + ``context``; cores are cut
    with ``tile_starts`` (no overlap of their own) and clipped to the image, so
    an image smaller than a core is one tile of its own size plus context.

    Example:
        >>> layout = overlap_tile_layout(100, 60, (32, 32), 0.5, stride=8)
        >>> layout.core, layout.context, layout.extra, layout.input_size, layout.tiles
        ((16, 16), (8, 8), (0, 0), (32, 32), 28)
    """
    ch, cw = context_size(tile[0], overlap), context_size(tile[1], overlap)
    kh, kw = min(tile[0] - 2 * ch, height), min(tile[1] - 2 * cw, width)
    eh = round_up(kh + 2 * ch, stride, min_size) - (kh + 2 * ch)
    ew = round_up(kw + 2 * cw, stride, min_size) - (kw + 2 * cw)
    return OverlapTileLayout((kh, kw), (ch, cw), (eh, ew), (height, width))


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
    h, w = images.shape[-2:]
    th, tw = min(tile[0], h), min(tile[1], w)
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    return _blend_tiles(logits_fn, images, boxes, (th, tw), (0, 0), (th, tw), (h, w), tile_batch, should_stop)


def _blend_tiles(
    logits_fn: LogitsFn,
    source: torch.Tensor,
    boxes: list[tuple[int, int]],
    tile: tuple[int, int],
    core_offset: tuple[int, int],
    core: tuple[int, int],
    size: tuple[int, int],
    tile_batch: int,
    should_stop: StopFn | None,
) -> torch.Tensor:
    """Run ``tile``-sized crops of ``source`` at ``boxes``, keep each result's ``core`` (at ``core_offset``
    in the tile), and blend the cores with the sine window into ``[N, K, *size]`` logits. A core's
    top-left corner in the output is its box's ``(y, x)``."""
    n, (h, w), (th, tw), (oy, ox), (kh, kw) = source.shape[0], size, tile, core_offset, core
    window = blend_window(kh, kw, source.device)
    weight = torch.zeros((1, 1, h, w), dtype=torch.float32, device=source.device)
    for y, x in boxes:
        weight[..., y : y + kh, x : x + kw] += window
    total: torch.Tensor | None = None
    crops = [(i, y, x) for i in range(n) for y, x in boxes]
    for start in range(0, len(crops), tile_batch):
        _check(should_stop)
        chunk = crops[start : start + tile_batch]
        batch = torch.stack([source[i, :, y : y + th, x : x + tw] for i, y, x in chunk])
        out = logits_fn(batch).float()[:, :, oy : oy + kh, ox : ox + kw]
        if total is None:
            total = torch.zeros((n, out.shape[1], h, w), dtype=torch.float32, device=out.device)
            window, weight = window.to(out.device), weight.to(out.device)
        for (i, y, x), logits in zip(chunk, out):
            total[i, :, y : y + kh, x : x + kw] += logits * window
    assert total is not None  # at least one tile always exists
    return total.div_(weight)  # in place: admission's estimate counts one logit map here, not two


def overlap_tile_logits(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    tile: tuple[int, int],
    overlap: float = 0.25,
    tile_batch: int = 4,
    should_stop: StopFn | None = None,
    stride: int = 1,
    min_size: int = 1,
) -> torch.Tensor:
    """Logits of ``images`` ``[N, C, H, W]`` by overlap tiles with mirrored borders (``reflect`` padding).

    Args:
        logits_fn: maps ``[B, C, h, w]`` to ``[B, K, h, w]``; it gets tiles of
            ``overlap_tile_layout(...).input_size``, already a multiple of ``stride``.
        images: the full images.
        tile: ``(height, width)`` of a tile as the network sees it, context included.
        overlap: fraction of a tile shared with its neighbour, in ``[0, 1)``: the context
            is half of it on each side.
        tile_batch: tiles per call of ``logits_fn``.
        should_stop: checked between tile batches; True raises ``Cancelled``.
        stride, min_size: the network's padding geometry (mirrored, not zeros).
    Returns:
        float32 logits ``[N, K, H, W]``: per pixel, the window-weighted mean of the cores covering it.
    """
    if images.ndim != 4:
        raise InvalidArgument(f"overlap-tile inference needs [N,C,H,W] images, got {tuple(images.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise InvalidArgument(f"tile overlap must be in [0, 1), got {overlap}")
    if tile[0] < 1 or tile[1] < 1 or tile_batch < 1 or stride < 1:
        raise InvalidArgument(f"tile size, tile batch and stride must be positive, got tile={tile}, "
                              f"batch={tile_batch}, stride={stride}")
    h, w = images.shape[-2:]
    layout = overlap_tile_layout(h, w, tile, overlap, stride, min_size)
    (kh, kw), (ch, cw), (eh, ew) = layout.core, layout.context, layout.extra
    ih, iw = layout.input_size
    padded = mirror_pad(images, ch, ch + eh, cw, cw + ew)  # image row r is padded row r + ch
    boxes = [(y, x) for y in layout.ys for x in layout.xs]
    return _blend_tiles(logits_fn, padded, boxes, (ih, iw), (ch, cw), (kh, kw), (h, w), tile_batch, should_stop)


def hflip_tta_logits(logits_fn: LogitsFn, images: torch.Tensor, should_stop: StopFn | None = None) -> torch.Tensor:
    """Mean of the logits of the images and of their mirror images (mirrored back).

    At most three logit maps are alive at once, as admission's estimate counts: the plain pass, the
    mirrored pass and its flip back, a new tensor that takes the sum in place.
    """
    plain = logits_fn(images).float()
    _check(should_stop)
    mean = torch.flip(logits_fn(torch.flip(images, dims=[-1])).float(), dims=[-1])
    return mean.add_(plain).div_(2)


def rescale(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, C, H, W]`` resized to ``size`` bilinearly (antialiased when shrinking); unchanged when it matches.

    torch's antialiased kernel is wrong when a side of the output is 1 (it averages a 64x1 column into one
    value), so a side that is 1 before and after is widened to 2 for the resize (2 -> 2 is the identity) and
    any other side of 1 is resized without the antialias. Images with no side of 1 take the plain path.

    Example:
        >>> column = torch.arange(8.0).view(1, 1, 8, 1)
        >>> torch.equal(rescale(column, (4, 1)), rescale(column.expand(1, 1, 8, 2), (4, 2))[..., :1])
        True
    """
    in_size, out_size = tuple(x.shape[-2:]), tuple(size)
    if in_size == out_size:
        return x
    shrink = out_size[0] < in_size[0] or out_size[1] < in_size[1]
    if not shrink or min(*in_size, *out_size) > 1:
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False, antialias=shrink)
    keep = tuple(n == 1 and m == 1 for n, m in zip(in_size, out_size))
    wide = x.expand(*x.shape[:-2], *(2 if k else n for k, n in zip(keep, in_size)))
    target = tuple(2 if k else m for k, m in zip(keep, out_size))
    antialias = min(*wide.shape[-2:], *target) > 1
    out = F.interpolate(wide, size=target, mode="bilinear", align_corners=False, antialias=antialias)
    return out[..., : out_size[0], : out_size[1]].contiguous()


def multiscale_tta_logits(
    logits_fn: LogitsFn, images: torch.Tensor, scales: tuple[float, ...], should_stop: StopFn | None = None
) -> torch.Tensor:
    """Mean of the logits of ``images`` resized by each factor in ``scales``, each resized back.

    Example:
        >>> multiscale_tta_logits(lambda x: x[:, :2], torch.ones(1, 3, 8, 10), (0.5, 1.0, 1.5)).shape
        torch.Size([1, 2, 8, 10])
    """
    h, w = images.shape[-2:]
    total: torch.Tensor | None = None
    for i, s in enumerate(scales):
        if i:
            _check(should_stop)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        logits = rescale(logits_fn(rescale(images, size)).float(), (h, w))
        total = logits if total is None else total + logits
    assert total is not None, "multi-scale TTA needs at least one scale"
    return total / len(scales)


def make_logits_fn(
    logits_fn: LogitsFn,
    tile: tuple[int, int] | None = None,
    overlap: float = 0.25,
    hflip: bool = False,
    tile_batch: int = 4,
    should_stop: StopFn | None = None,
    padding: str = "zero",
    stride: int = 1,
    min_size: int = 1,
    scales: tuple[float, ...] = (),
) -> LogitsFn:
    """Compose multi-scale TTA (outer), flip TTA and sliding windows (inner) around ``logits_fn``.

    ``scales`` are factors of the given images' size (``InferenceSpec.tta_scales``);
    tiles are cut from each rescaled image, so a tile is always ``tile`` network pixels.

    ``padding="reflect"`` makes the windows overlap tiles with mirrored borders
    (``overlap_tile_logits``) and, without tiles, mirrors the image at the
    bottom/right to ``stride`` and ``min_size`` before ``logits_fn`` (cropped
    back after); ``zero`` leaves that padding to ``logits_fn`` (the backend).

    Example:
        >>> fn = make_logits_fn(lambda x: x[:, :2], tile=(32, 32), overlap=0.5, hflip=True)
        >>> fn(torch.zeros(1, 3, 48, 80)).shape
        torch.Size([1, 2, 48, 80])
    """
    if padding not in PADDINGS:
        raise InvalidArgument(f"tile padding must be one of {PADDINGS}, got {padding!r}")

    def tiled(x: torch.Tensor) -> torch.Tensor:
        assert tile is not None
        if padding == "reflect":
            return overlap_tile_logits(logits_fn, x, tile, overlap, tile_batch, should_stop, stride, min_size)
        return sliding_window_logits(logits_fn, x, tile, overlap, tile_batch, should_stop)

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return logits_fn(reflect_to_multiple(x, stride, min_size))[..., :h, :w]

    inner = tiled if tile is not None else mirrored if padding == "reflect" else logits_fn
    flipped = (lambda x: hflip_tta_logits(inner, x, should_stop)) if hflip else inner
    if not scales:
        return flipped
    return lambda x: multiscale_tta_logits(flipped, x, scales, should_stop)
