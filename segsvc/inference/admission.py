"""Admission by cost: what a request will cost is known, and bounded, before work starts.

A pixel limit alone does not bound cost: a 1 x 262144 image is padded to the
model's stride before the forward pass, a 96x96 image with 16-pixel tiles at
overlap 0.9999 runs thousands of passes, and memory grows with the padded
pixels times what the model allocates per pixel. ``estimate`` turns an image
size and its options into a ``Cost`` (padded pixels per pass, passes, tiles and
an estimated peak memory from the model's measured bytes per pixel);
``Admission.check`` refuses a request over the per-request limits before it is
decoded, and ``MemoryBudget`` queues admitted requests against one server-wide
memory budget, so concurrent large requests wait instead of exhausting memory
(a bounded number of them: beyond it they are refused with ``Overloaded``).

Example:
    >>> cost = estimate(1, 262144, tile_size=0, tile_overlap=0.25, flip_tta=False, stride=32, min_size=1,
    ...                 num_classes=3, bytes_per_pixel=1000)
    >>> cost.pixels, cost.passes
    (8388608, 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Hashable

from segsvc.config import MAX_TILE_OVERLAP  # noqa: F401  (re-exported: the per-request limit)
from segsvc.errors import DeadlineExceeded, ImageTooLarge, InvalidArgument, Overloaded
from segsvc.inference.batcher import Priority
from segsvc.inference.contract import TILE_BATCH, padded_size, scaled_size
from segsvc.inference.tiling import overlap_tile_layout, tile_count

MIB = 1 << 20


@dataclass(frozen=True)
class Cost:
    """What one request will cost.

    Attributes:
        pixels: pixels of one forward pass (padded to the stride and minimum size).
        passes: forward passes (tiles x flips; with multi-scale TTA, the work in passes of the largest size).
        tiles: sliding-window tiles (1 without tiling), summed over the TTA scales.
        peak_bytes: estimated peak memory of the request.
        scale: how the largest pass resizes the image (the manifest's scale, times a TTA factor).
        tiled: the request runs sliding-window tiles (a ``tile_size``), even a single one.
        full_size_bytes: the part of ``peak_bytes`` that tiling cannot shrink, the least any tile size
            needs: the image and its outputs, and the per-class logit sums and weights a tiled run
            accumulates at full size (for an untiled request, what a tiled run of it would hold).
    """

    pixels: int
    passes: int
    tiles: int
    peak_bytes: int
    scale: float = 1.0
    tiled: bool = False
    full_size_bytes: int = 0

    @property
    def work_pixels(self) -> int:
        """Pixels pushed through the network in total: the time a request costs."""
        return self.pixels * self.passes


def estimate(height: int, width: int, *, tile_size: int, tile_overlap: float, flip_tta: bool, stride: int,
             min_size: int, num_classes: int, bytes_per_pixel: float, channels: int = 3,
             scale: float = 1.0, tile_padding: str = "zero", tta_scales: tuple[float, ...] = (),
             confidence: bool = False, label_bytes: int = 1) -> Cost:
    """The ``Cost`` of one ``height x width`` image with these options on this model.

    With ``scale != 1`` the network sees the image resized (``scaled_size``): a
    model run at 0.5 costs about a quarter of the pixels, plus the logits resized
    back to the original size and the decoded original image. With
    ``tile_padding="reflect"`` tiles are overlap tiles (``overlap_tile_layout``):
    their mirrored context counts in every pass's pixels, with the mirrored copy
    of the image they are cut from. With ``tta_scales`` every factor is one
    such estimate at the size the engine runs it: the image resized by ``scale``,
    then that size by the factor (each rounded, as the engine rounds them). Their
    passes and tiles add up, the largest pass and peak count, plus the running
    sum of the logits. What the outputs add at the image's size (``_with_outputs``) comes last.
    """
    def at(size: tuple[int, int], pass_scale: float) -> Cost:
        return _one_size((height, width), size, pass_scale, tile_size=tile_size, tile_overlap=tile_overlap,
                         flip_tta=flip_tta, stride=stride, min_size=min_size, num_classes=num_classes,
                         bytes_per_pixel=bytes_per_pixel, channels=channels, tile_padding=tile_padding)

    sh, sw = scaled_size(height, width, scale)
    if not tta_scales:
        cost = at((sh, sw), scale)
    else:
        costs = [at(scaled_size(sh, sw, f), scale * f) for f in tta_scales]
        largest = max(costs, key=lambda c: c.pixels)
        work = sum(c.work_pixels for c in costs)
        running = sh * sw * num_classes * 4 * 2  # the sum and one resized pass
        peak = max(c.peak_bytes for c in costs) + running
        full = max(c.full_size_bytes for c in costs) + running
        cost = Cost(largest.pixels, -(-work // largest.pixels), sum(c.tiles for c in costs), int(peak), largest.scale,
                    largest.tiled, int(full))
    return _with_outputs(cost, height * width, num_classes, confidence, label_bytes)


def _with_outputs(cost: Cost, pixels: int, num_classes: int, confidence: bool, label_bytes: int) -> Cost:
    """``cost`` plus what ``Engine._output`` allocates beside the full-size logits that the rest does not count:
    with ``confidence`` their softmax (a map as large as the logits, and as much again for the kernel's
    working copy: measured) with its maximum, rounded, as uint8; labels wider than uint8 through an int32 copy.
    With a model run at a reduced scale the logits are small until resized back, so these can double the peak.
    """
    per_pixel = (label_bytes - 1 + 4) if label_bytes > 1 else 0
    if confidence:
        per_pixel += num_classes * 4 * 2 + 4 + 4 + 1
    if not per_pixel:
        return cost
    return replace(cost, peak_bytes=cost.peak_bytes + pixels * per_pixel,
                   full_size_bytes=cost.full_size_bytes + pixels * per_pixel)


def _one_size(out: tuple[int, int], size: tuple[int, int], scale: float, *, tile_size: int, tile_overlap: float,
              flip_tta: bool, stride: int, min_size: int, num_classes: int, bytes_per_pixel: float, channels: int,
              tile_padding: str) -> Cost:
    """The ``Cost`` of an ``out``-sized image run by the network at ``size`` (``scale`` times ``out``)."""
    flips = 2 if flip_tta else 1
    (out_h, out_w), (height, width) = out, size
    image_bytes = height * width * (channels * 4 + 1)  # float32 input tensor + uint8 labels
    if (height, width) != (out_h, out_w):  # logits resized back, the original image and its labels
        image_bytes += out_h * out_w * (num_classes * 4 + channels + 1)
    accumulators = height * width * 4 * (num_classes * (flips + 1) + 1)  # tiled: logits sums, weights
    if tile_size and tile_padding == "reflect":
        layout = overlap_tile_layout(height, width, (tile_size, tile_size), tile_overlap, stride, min_size)
        ph, pw = layout.input_size
        in_flight = min(TILE_BATCH, layout.tiles)
        mirrored = (height + ph) * (width + pw) * channels * 4  # the image with its mirrored border
        full = accumulators + image_bytes + mirrored
        peak = bytes_per_pixel * ph * pw * in_flight + full
        return Cost(ph * pw, layout.tiles * flips, layout.tiles, int(peak), scale, True, int(full))
    if tile_size:
        th, tw = min(tile_size, height), min(tile_size, width)
        tiles = tile_count(height, th, tile_overlap) * tile_count(width, tw, tile_overlap)  # never listed
        ph, pw = padded_size(th, tw, stride, min_size)
        in_flight = min(TILE_BATCH, tiles)
        peak = bytes_per_pixel * ph * pw * in_flight + accumulators + image_bytes
        return Cost(ph * pw, tiles * flips, tiles, int(peak), scale, True, accumulators + image_bytes)
    ph, pw = padded_size(height, width, stride, min_size)
    peak = bytes_per_pixel * ph * pw + ph * pw * 4 * num_classes * flips + image_bytes
    return Cost(ph * pw, flips, 1, int(peak), scale, False, accumulators + image_bytes)


@dataclass(frozen=True)
class AdmissionConfig:
    """Per-request and server-wide cost limits.

    Args:
        max_pixels: largest image (height x width), from its header, and largest
            forward pass (padded height x width).
        max_inflight_mb: server-wide memory budget of the requests being served;
            a request whose estimate exceeds it alone is refused.
        max_tiles: most sliding-window tiles of one request.
        max_work_pixels: most pixels pushed through the network for one request
            (tiles x flips x pixels per pass): bounds the time one request holds the model.
    """

    max_pixels: int = 64_000_000
    max_inflight_mb: int = 2048
    max_tiles: int = 1024
    max_work_pixels: int = 256_000_000

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_inflight_mb", "max_tiles", "max_work_pixels"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be positive, got {getattr(self, name)}")

    def check(self, cost: Cost, height: int, width: int) -> None:
        """Refuse a request over a per-request limit, with what to change."""
        if cost.tiles > self.max_tiles:
            raise ImageTooLarge(f"tiling this {width}x{height} image needs {cost.tiles} tiles, over the limit of "
                                f"{self.max_tiles}; use larger tiles or less overlap")
        if cost.pixels > self.max_pixels:
            how = "padded to the model's stride" if cost.scale == 1 else \
                f"resized by {cost.scale:g} for the model and padded to its stride"
            raise ImageTooLarge(f"the {width}x{height} image is {cost.pixels} pixels once {how}, over the limit of "
                                f"{self.max_pixels}; downscale it or use tiling")
        if cost.work_pixels > self.max_work_pixels:
            raise ImageTooLarge(f"this request runs {cost.passes} passes of {cost.pixels} pixels, over the limit of "
                                f"{self.max_work_pixels} pixels; use fewer tiles, no flip TTA or a smaller image")
        budget = self.max_inflight_mb * MIB
        if cost.peak_bytes > budget:
            over = (f"the {width}x{height} image needs about {cost.peak_bytes / MIB:.0f} MiB, over the server's "
                    f"budget of {self.max_inflight_mb} MiB")
            full = (f"its full-size accumulators (image, outputs, per-class logit sums and weights) alone need "
                    f"about {cost.full_size_bytes / MIB:.0f} MiB")
            if cost.full_size_bytes < budget:
                remedy = "use smaller tiles or downscale it" if cost.tiled else "downscale it or use tiling"
                raise ImageTooLarge(f"{over}; {remedy}")
            if cost.tiled:
                raise ImageTooLarge(f"{over}, even tiled: {full}, whatever the tile size; downscale it or raise "
                                    "the server's --max-inflight-mb")
            raise ImageTooLarge(f"{over}, and tiling would not help: {full}; downscale it or raise the server's "
                                "--max-inflight-mb")


class Hold:
    """Bytes of a ``MemoryBudget`` held until ``release()``; releasing again gives nothing back twice."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget: MemoryBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes)


@dataclass(eq=False)
class _Waiter:
    """One request waiting for room: its bytes, lane and arrival (``MemoryBudget``'s clock)."""

    nbytes: int
    lane: Hashable
    since: float
    granted: asyncio.Future


class MemoryBudget:
    """Requests hold their estimated bytes while served; the rest wait, a bounded number per lane.

    The wait line keeps the batchers' lanes: the ``background`` lane (batch jobs, ``Priority.BATCH``)
    gives way to the others, so a client's request is not queued behind a job's window of images that
    wait for memory (the batcher would run it first, but only once it has its memory). A background
    request still goes first once none has been granted for ``max_wait_s`` and it waited that long
    (``BatchingConfig.batch_max_wait_s``): a job advances under continuous interactive load. Within a
    lane requests go in arrival order, and the one whose turn it is is never overtaken (a large request
    is not starved by small ones).

    Args:
        total_bytes: the budget; a request larger than this alone never fits (``Admission.check``
            refuses it first).
        max_waiting: most requests of one lane waiting for room; more are refused with ``Overloaded``.
        max_wait_s: longest a background request gives way while other lanes wait.
        background: the lane that gives way.
        clock: seconds, monotonic (``time.monotonic``).
    """

    def __init__(self, total_bytes: int, max_waiting: int, max_wait_s: float = 1.0,
                 background: Hashable = Priority.BATCH, clock: Callable[[], float] = time.monotonic) -> None:
        if total_bytes < 1:
            raise InvalidArgument(f"the memory budget must be positive, got {total_bytes}")
        if max_waiting < 1:
            raise InvalidArgument(f"the memory budget's wait line must hold at least one request, got {max_waiting}")
        if not max_wait_s >= 0:
            raise InvalidArgument(f"the memory budget's max_wait_s must be >= 0, got {max_wait_s!r}")
        self.total_bytes = total_bytes
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.background = background
        self._clock = clock
        self.used_bytes = 0
        self._lines: dict[bool, deque[_Waiter]] = {False: deque(), True: deque()}  # keyed by "background?"
        self._waiting: Counter[Hashable] = Counter()
        self._last_background = float("-inf")

    def waiting(self) -> dict[Hashable, int]:
        """Requests waiting for room now, per lane (lanes none waits in are left out). They are in no batch
        queue yet: the metrics export them beside the queue depths (``segsvc_memory_waiting``), read at scrape
        time from another thread (one copy of a dict of integers)."""
        return {lane: count for lane, count in dict(self._waiting).items() if count}

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, deadline: float | None = None, lane: Hashable = None) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the block (``acquire``, then ``release`` on leaving)."""
        held = await self.acquire(nbytes, deadline, lane)
        try:
            yield
        finally:
            held.release()

    async def acquire(self, nbytes: int, deadline: float | None = None, lane: Hashable = None) -> Hold:
        """Take ``nbytes`` of the budget; wait (until ``deadline``, an event-loop time) for the lane's turn.

        Raises:
            Overloaded: ``max_waiting`` requests of ``lane`` already wait.
            DeadlineExceeded: the deadline passed while waiting.
        """
        nbytes = min(max(int(nbytes), 0), self.total_bytes)
        if not (self._lines[False] or self._lines[True]) and self.used_bytes + nbytes <= self.total_bytes:
            self.used_bytes += nbytes  # no one waits and it fits: every request's path, with no future made
            return Hold(self, nbytes)
        waiter = _Waiter(nbytes, lane, self._clock(), asyncio.get_running_loop().create_future())
        line = self._lines[lane == self.background]
        line.append(waiter)
        self._wake()
        if waiter.granted.done():  # its turn, and it fits: no wait
            return Hold(self, nbytes)
        if self._waiting[lane] >= self.max_waiting:
            line.remove(waiter)
            waiter.granted.cancel()
            self._wake()
            raise Overloaded(f"{self._waiting[lane]} requests are already waiting for the server's memory budget "
                             f"({self.total_bytes / MIB:.0f} MiB), the limit; retry with backoff")
        self._waiting[lane] += 1
        try:
            await self._wait(waiter, line, deadline)
        finally:
            self._waiting[lane] -= 1
        return Hold(self, nbytes)

    async def _wait(self, waiter: _Waiter, line: deque[_Waiter], deadline: float | None) -> None:
        """Wait for the grant until ``deadline``. ``asyncio.timeout_at``, not ``wait_for``: in Python 3.11
        ``wait_for`` returns a grant that arrives in the same loop iteration as the caller's cancel, and the
        cancelled request went on to decode and queue (gh-86296, fixed in 3.12)."""
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(waiter.granted)
        except BaseException as exc:
            if waiter.granted.done() and not waiter.granted.cancelled():  # granted meanwhile: give it back
                self.used_bytes -= waiter.nbytes
            else:
                waiter.granted.cancel()
            with contextlib.suppress(ValueError):
                line.remove(waiter)
            self._wake()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("the deadline passed while waiting for memory to serve the image") from None
            raise

    def _give_back(self, nbytes: int) -> None:
        self.used_bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        """Grant waiters while the one whose turn it is fits (the foreground lanes' oldest, unless the
        background's has waited out ``max_wait_s``); it is never overtaken, so a large request is not starved."""
        foreground, background = self._lines[False], self._lines[True]
        while True:
            for line in (foreground, background):
                while line and line[0].granted.done():
                    line.popleft()
            now = self._clock()
            if background and (not foreground or now >= self._starved_at(background[0])):
                line = background
            elif foreground:
                line = foreground
            else:
                return
            head = line[0]
            if self.used_bytes + head.nbytes > self.total_bytes:
                return
            line.popleft()
            self.used_bytes += head.nbytes
            if line is background:
                self._last_background = now
            head.granted.set_result(None)

    def _starved_at(self, waiter: _Waiter) -> float:
        """When the background ``waiter`` goes ahead of the other lanes (as ``DynamicBatcher`` does)."""
        return max(waiter.since, self._last_background) + self.max_wait_s
