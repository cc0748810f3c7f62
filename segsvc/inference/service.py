"""The protocol-free inference core that every front end calls.

``InferenceService.segment`` is the one path from image to label map: take a
lease on the model version (so a hot swap cannot retire it mid-request),
read the image's size from its header, check the request's cost (padded
pixels, tiles, passes, estimated memory) against the per-request limits, take
its estimated memory from one server-wide budget (waiting in a line bounded by
the batchers' ``max_queue_size``, refused with ``Overloaded`` beyond it), then
decode and preprocess on an I/O thread (announced to the batcher meanwhile, so
a partial batch waits for it, and a lone image on an idle model waits for
nothing), queue the image in that version's batcher (in the interactive or the
batch lane) with the caller's deadline, and await the result. A caller that
gives up (deadline, cancel) marks its image abandoned, so a tiled batch stops
between passes; its memory stays held until its work has really ended (the
decoding thread or the forward pass finished, or it left the queue unrun), so
a request waiting for the budget is never admitted into memory still in use.
The ``segsvc.v1`` gRPC servicer, the Open Inference Protocol
servicer and the batch-job runner are thin adapters over it: they turn their
requests into arguments and the ``Segmentation`` into their responses, and
never repeat this choreography (KServe's ``DataPlane`` under its servicer).

Example:
    >>> service = InferenceService(manager, io_executor, max_pixels=64_000_000)  # doctest: +SKIP
    >>> seg = await service.segment(EncodedImage(png_bytes), model="membrane")  # doctest: +SKIP
    >>> seg.output.labels.shape == seg.image.shape[:2]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from segsvc.errors import DeadlineExceeded, ImageTooLarge, InvalidImage, PathOutsideRoot
from segsvc.files import PathChanged, open_beneath
from segsvc.inference.admission import MIB, AdmissionConfig, Hold, MemoryBudget
from segsvc.inference.batcher import Batched, Priority
from segsvc.inference.codec import check_pixels, decode_image, image_header, raw_image
from segsvc.inference.engine import Engine, InferenceOptions, Output, Prepared
from segsvc.inference.manager import LoadedModel, ModelManager
from segsvc.models.artifact import Manifest

R = TypeVar("R")
PreparedImage = tuple[np.ndarray, Prepared, float]  # the decoded image, its network input, the seconds it took


class ImageSource(Protocol):
    """Something that becomes a uint8 RGB/grey image, with its size checked before decoding."""

    def peek(self) -> tuple[int, int] | None:
        """``(height, width)`` without decoding (from a header or a shape), or None if unknown."""

    def load(self, max_pixels: int) -> np.ndarray: ...


@dataclass(frozen=True)
class EncodedImage:
    """PNG/JPEG/TIFF/BMP/WebP bytes."""

    data: bytes

    def peek(self) -> tuple[int, int] | None:
        header = image_header(self.data)
        return header.height, header.width

    def load(self, max_pixels: int) -> np.ndarray:
        return decode_image(self.data, max_pixels)


@dataclass(frozen=True)
class RawPixels:
    """Row-major uint8 pixels and their ``[H, W]`` or ``[H, W, C]`` shape."""

    data: bytes
    shape: Sequence[int]

    def peek(self) -> tuple[int, int] | None:
        return (int(self.shape[0]), int(self.shape[1])) if len(self.shape) in (2, 3) else None

    def load(self, max_pixels: int) -> np.ndarray:
        return raw_image(self.data, self.shape, max_pixels)


@dataclass(eq=False)
class ImageFile:
    """An image file on the server's disk, below a root it must not leave, read once.

    The caller resolves and confines the path (``rel`` names no symlink); the file
    is then opened from ``root`` one component at a time without following
    symlinks (``segsvc.files.open_beneath``), so a folder swapped for a symlink
    after that check fails the read instead of leading it out of the root.
    ``peek`` reads the whole file and keeps the bytes; ``load`` decodes those
    same bytes (then lets them go), so the header the cost was checked from and
    the pixels decoded come from one read of one file.

    Args:
        root: the folder the file lies in (symlinks resolved).
        rel: the file's resolved path below ``root`` (``/``-separated).
        name: how errors name it (the caller's relative name, never a server path).
        max_bytes: files larger than this are refused before they are read.
    """

    root: Path
    rel: str
    name: str
    max_bytes: int
    _data: bytes | None = field(default=None, init=False, repr=False)

    def peek(self) -> tuple[int, int] | None:
        """The size from the file's header; reads the file (at most ``max_bytes``): call it on an I/O thread."""
        if self._data is None:
            self._data = self._read()
        header = self._named(image_header, self._data)
        return header.height, header.width

    def load(self, max_pixels: int) -> np.ndarray:
        """Decode the bytes ``peek`` read (or read them now); a later call reads the file again."""
        data = self._data if self._data is not None else self._read()
        self._data = None
        return self._named(decode_image, data, max_pixels)

    def _read(self) -> bytes:
        """The file's bytes; one over ``max_bytes`` is refused before it is read."""
        try:
            with open_beneath(self.root, self.rel) as file:
                size = os.fstat(file.fileno()).st_size
                data = file.read(self.max_bytes + 1) if size <= self.max_bytes else b""
                size = max(size, len(data))  # it may have grown since the fstat
        except PathChanged as exc:
            raise PathOutsideRoot(f"input {self.name!r} changed while it was read ({exc.strerror}): refused") from None
        except OSError as exc:
            raise InvalidImage(f"{self.name} cannot be read: {exc.strerror or type(exc).__name__}") from None
        if size > self.max_bytes:
            raise ImageTooLarge(f"{self.name} is {size} bytes, over the limit of {self.max_bytes} bytes")
        return data

    def _named(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(*args)`` with the file's name in front of an ``InvalidImage`` message."""
        try:
            return fn(*args)
        except InvalidImage as exc:
            raise type(exc)(f"{self.name}: {exc}") from None


@dataclass(frozen=True, eq=False)
class Segmentation:
    """One image's result and where it came from.

    Attributes:
        image: the decoded input (for overlays).
        output: labels, and confidence and class counts when asked for.
        manifest: the version's manifest (classes, palette).
        model, version: the version that ran (the directory's number).
        queue_s, run_s, batch_size: where the time went in the batcher.
    """

    image: np.ndarray
    output: Output
    manifest: Manifest
    model: str
    version: int
    queue_s: float
    run_s: float
    batch_size: int


class InferenceService:
    """Segments images with the models a ``ModelManager`` serves.

    Args:
        manager: the loaded model versions and their batchers.
        io_executor: threads that decode, preprocess and encode (off the event loop).
        admission: per-request cost limits and the server-wide memory budget.
    """

    def __init__(self, manager: ModelManager, io_executor: Executor, admission: AdmissionConfig) -> None:
        self.manager = manager
        self._io = io_executor
        self.admission = admission
        self.max_pixels = admission.max_pixels
        # Waiting for memory is waiting in a queue: bounded per lane like every batcher's (--max-queue),
        # in the batchers' lanes (a job's images waiting for memory give way to interactive calls).
        batching = manager.config.batching
        self.budget = MemoryBudget(admission.max_inflight_mb * MIB, batching.max_queue_size,
                                   max_wait_s=batching.batch_max_wait_s, background=Priority.BATCH)

    async def run_io(self, fn: Callable[..., R], *args: object) -> R:
        """Run ``fn(*args)`` on the I/O threads (encoding a response, writing a file)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def resolve(self, model: str | None, version: int | None) -> tuple[str, int, Manifest]:
        """The ``(name, version, manifest)`` a request would use now; jobs pin this at submission."""
        lm = self.manager.resolve(model, version)
        return lm.name, lm.version, lm.manifest

    async def segment(
        self,
        source: ImageSource,
        *,
        model: str | None = None,
        version: int | None = None,
        options: InferenceOptions = InferenceOptions(),
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        on_lease: Callable[[str, int, Manifest], None] | None = None,
    ) -> Segmentation:
        """Segment one image.

        Args:
            source: the image (bytes, raw pixels or a file).
            model, version: which model; ``None`` for the only loaded model / the default version.
            options: tiling, flip TTA, confidence, class counts; tiling and flip TTA left
                unset (``None``) take the model version's defaults from its manifest, which
                also fixes the input scale (``segsvc.inference.contract``).
            deadline: event-loop time after which the caller no longer wants the result.
            priority: the batcher lane (batch jobs run below interactive calls).
            on_lease: called with the resolved ``(name, version, manifest)`` before any
                work: to record what serves the call, or to refuse a request the
                version cannot answer (by raising).

        Raises:
            InvalidImage, ImageTooLarge, PathOutsideRoot, UnknownModel, UnknownVersion,
            Overloaded, DeadlineExceeded, Unavailable: the domain errors of each step.
        """
        with self.manager.lease(model, version) as lm:
            started = time.perf_counter()
            try:
                seg, prepare_s = await self._segment(lm, source, options, deadline, priority, on_lease)
            except BaseException:
                lm.stats.failed(time.perf_counter() - started)
                raise
            lm.stats.succeeded(total_s=time.perf_counter() - started, prepare_s=prepare_s, queue_s=seg.queue_s,
                               infer_s=seg.output.infer_s, output_s=seg.output.output_s)
            return seg

    async def _segment(self, lm: LoadedModel, source: ImageSource, options: InferenceOptions,
                       deadline: float | None, priority: Priority,
                       on_lease: Callable[[str, int, Manifest], None] | None) -> tuple[Segmentation, float]:
        """``segment`` on a leased version; also returns the seconds spent decoding and preparing."""
        if on_lease is not None:
            on_lease(lm.name, lm.version, lm.manifest)
        size = await self._size(source)
        if size is None:  # a source that cannot tell its size: decoded first, then admitted
            image, prepared, prepare_s = await self._prepare_announced(lm, source, options, priority, None)
            held = await self.budget.acquire(prepared.cost.peak_bytes, deadline, priority)
        else:  # refused before decoding, and decoded inside its share of the budget
            check_pixels(*size, self.max_pixels)
            cost = lm.engine.cost(*size, options)
            self.admission.check(cost, *size)
            held = await self.budget.acquire(cost.peak_bytes, deadline, priority)
            image, prepared, prepare_s = await self._prepare_held(held, lm, source, options, priority, size)
        result = await self._infer(held, lm, prepared, deadline, priority)
        seg = Segmentation(image, result.value, lm.manifest, lm.name, lm.version,
                           result.queue_s, result.run_s, result.batch_size)
        return seg, prepare_s

    async def _size(self, source: ImageSource) -> tuple[int, int] | None:
        """The source's ``(height, width)`` before decoding; a file's header is read on an I/O thread."""
        if isinstance(source, ImageFile):
            return await self.run_io(source.peek)
        return source.peek()

    async def _prepare_announced(self, lm: LoadedModel, source: ImageSource, options: InferenceOptions,
                                 priority: Priority, size: tuple[int, int] | None) -> PreparedImage:
        """Decode and prepare on an I/O thread, announced to the batcher (a partial batch waits for it)."""
        with lm.batcher.incoming(priority):
            return await self.run_io(self._prepare, source, lm.engine, options, size)

    async def _prepare_held(self, held: Hold, lm: LoadedModel, source: ImageSource, options: InferenceOptions,
                            priority: Priority, size: tuple[int, int]) -> PreparedImage:
        """``_prepare_announced`` inside ``held``: if it fails or the caller gives up, the bytes go back
        once the I/O thread is done with the image, not before (a running thread cannot be stopped)."""
        with lm.batcher.incoming(priority):
            work = asyncio.ensure_future(self.run_io(self._prepare, source, lm.engine, options, size))
            try:
                return await asyncio.shield(work)  # a caller that gives up leaves the I/O thread running
            except BaseException:
                work.add_done_callback(lambda done: _release_after(done, held))
                raise

    async def _infer(self, held: Hold, lm: LoadedModel, prepared: Prepared, deadline: float | None,
                     priority: Priority) -> Batched[Output]:
        """Queue the image and await its result; ``held`` goes back when its work ends (its batch ran,
        or it left the queue unrun), which for a caller that gave up may be after this returns."""
        try:
            future = lm.batcher.submit(prepared, deadline=deadline, priority=priority, on_finish=held.release)
        except BaseException:
            held.release()
            raise
        try:
            return await _wait(future, deadline)
        except BaseException:
            prepared.abandon.set()  # a tiled batch of abandoned images stops between passes
            raise

    def _prepare(self, source: ImageSource, engine: Engine, options: InferenceOptions,
                 size: tuple[int, int] | None) -> PreparedImage:
        """Decode (no larger than the header said) and prepare one image; runs on an I/O thread."""
        started = time.perf_counter()
        image = source.load(self.max_pixels if size is None else min(self.max_pixels, size[0] * size[1]))
        if size is not None and tuple(image.shape[:2]) != size:
            raise InvalidImage(f"the image decodes to {image.shape[1]}x{image.shape[0]}, not the "
                               f"{size[1]}x{size[0]} it declared before decoding")
        prepared = engine.prepare(image, options)
        self.admission.check(prepared.cost, *image.shape[:2])
        return image, prepared, time.perf_counter() - started


def _release_after(work: asyncio.Future, held: Hold) -> None:
    """Give ``held`` back once ``work`` is done; its outcome was the caller's, who has gone (nothing to log)."""
    if not work.cancelled():
        work.exception()  # retrieved: no "exception was never retrieved" warning for a caller that left
    held.release()


async def _wait(future: asyncio.Future, deadline: float | None) -> Batched[Output]:
    """Await the batch result; at the deadline the item leaves the queue (if it has not run).

    ``asyncio.timeout_at``, not ``wait_for``: in Python 3.11 ``wait_for`` returns a result that arrives in the
    same loop iteration as the caller's cancel, and the cancelled call went on (gh-86296, fixed in 3.12).
    """
    if deadline is None:
        return await future
    try:
        async with asyncio.timeout_at(deadline):
            return await future
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed before the image was segmented") from None
