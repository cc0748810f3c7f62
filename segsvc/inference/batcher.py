"""Dynamic batching: one small asyncio class between many callers and one predict function.

Callers ``submit`` items and await the returned future; a single worker task
collects items into batches that flush at ``max_batch_size`` items or when the
oldest item has waited ``max_delay_s``. A partial batch waits only while more
items are on their way: callers announce an item they are still preparing with
``incoming()``, and when none is announced the queue already holds every item
that could join, so the batch goes at once (a lone request on an idle model
does not pay ``max_delay_s``; under load items queue while a batch runs, so
batches still fill). The worker runs ``predict`` on a worker thread (so
the event loop keeps decoding, encoding and talking to clients), and delivers
one result, or the batch's exception, to every future. Items are grouped by a
key (for images: the padded size and the options), so a batch never mixes
inputs that cannot be stacked. The queue is bounded: a full queue refuses new
items with ``Overloaded`` instead of letting latency grow without limit.
Cancelled items and items whose deadline passed are dropped before they run (also
from a batch already taken, up to the moment its thread starts ``predict``); a
batch already running is not interrupted, so ``submit`` takes an ``on_finish``
hook called when an item's work has really ended (its batch ran, or it left the
queue unrun): the caller's memory stays accounted for until then.

Two lanes share the worker: interactive calls (``Priority.INTERACTIVE``) and
batch-job items (``Priority.BATCH``). A batch-lane batch starts only when no
interactive item waits and no interactive batch ended within
``batch_holdoff_s``, so a client sending one request after another is not
queued behind a job; under saturating interactive load one batch-lane batch
still runs every ``batch_max_wait_s``, so a job advances at a bounded cost. Each lane
has its own ``max_queue_size`` bound: a job can never fill the interactive queue.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     b = DynamicBatcher(lambda xs: [x * 2 for x in xs], BatchingConfig(max_batch_size=4))
    ...     b.start()
    ...     results = await asyncio.gather(*(b.submit(i) for i in range(6)))
    ...     await b.stop()
    ...     return [r.value for r in results]
    >>> asyncio.run(demo())
    [0, 2, 4, 6, 8, 10]
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Generic, Hashable, Iterator, Sequence, TypeVar

from segsvc.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)
UNCONVERTED_BYTES = "max_batch_bytes needs the model's bytes per pixel: convert it with BatchingConfig.for_model(...)"


class Priority(enum.IntEnum):
    """Scheduling lane of an item; the lower value runs first."""

    INTERACTIVE = 0
    BATCH = 1


@dataclass(frozen=True)
class BatchingConfig:
    """How a model's requests are batched.

    Args:
        max_batch_size: most items per batch; 1 turns batching off.
        max_delay_s: longest time the oldest item waits for the batch to fill, while
            more items are announced (``DynamicBatcher.incoming``); with none on their
            way a partial batch goes at once.
        max_queue_size: most items waiting (not yet running); more are refused
            with ``Overloaded`` (gRPC RESOURCE_EXHAUSTED).
        max_batch_pixels: most input pixels in one batch (``None``: no limit), so
            a batch of large images cannot exhaust memory; an image over the budget
            still runs, alone. Needs the batcher's ``pixels`` function.
        max_batch_bytes: most estimated forward-pass memory in one batch (``None``:
            no limit). A model's batcher gets it as a pixel budget, through
            ``for_model`` with the bytes per pixel measured at load: small models
            batch more images than large ones under the same budget.
        batch_holdoff_s: a batch-lane batch waits this long after the last
            interactive batch ended (the gap in which a sequential client sends
            its next request).
        batch_max_wait_s: while interactive traffic continues, one batch-lane
            batch runs at most every this many seconds (jobs never starve, and
            take a bounded share of the model).
        concurrency: batches that run at once (the executor's threads). On CPU,
            two single-threaded passes (``--torch-threads 1``) outrun one
            two-threaded pass by ~1.4x for small models, at the cost of each
            request's latency; 1 runs one batch at a time.

    Example:
        >>> BatchingConfig(max_batch_size=8, max_delay_s=0.005, max_queue_size=256).max_batch_size
        8
    """

    max_batch_size: int = 8
    max_delay_s: float = 0.005
    max_queue_size: int = 256
    max_batch_pixels: int | None = None
    max_batch_bytes: int | None = None
    batch_holdoff_s: float = 0.02
    batch_max_wait_s: float = 1.0
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise InvalidArgument(f"concurrency must be a positive integer, got {self.concurrency!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise InvalidArgument(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if not self.max_delay_s >= 0:
            raise InvalidArgument(f"max_delay_s must be >= 0, got {self.max_delay_s!r}")
        if not isinstance(self.max_queue_size, int) or self.max_queue_size < 1:
            raise InvalidArgument(f"max_queue_size must be a positive integer, got {self.max_queue_size!r}")
        if self.max_batch_pixels is not None and (
            not isinstance(self.max_batch_pixels, int) or self.max_batch_pixels < 1
        ):
            raise InvalidArgument(f"max_batch_pixels must be a positive integer or None, got {self.max_batch_pixels!r}")
        if self.max_batch_bytes is not None and (
            not isinstance(self.max_batch_bytes, int) or self.max_batch_bytes < 1
        ):
            raise InvalidArgument(f"max_batch_bytes must be a positive integer or None, got {self.max_batch_bytes!r}")
        for name in ("batch_holdoff_s", "batch_max_wait_s"):
            if not getattr(self, name) >= 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    def for_model(self, bytes_per_pixel: float) -> BatchingConfig:
        """This config for a model whose forward pass needs ``bytes_per_pixel`` per input pixel:
        ``max_batch_bytes`` becomes pixels, and the tighter of the two pixel budgets stays.

        Example:
            >>> BatchingConfig(max_batch_bytes=1000, max_batch_pixels=50).for_model(4.0).max_batch_pixels
            50
            >>> BatchingConfig(max_batch_bytes=1000).for_model(4.0).max_batch_pixels
            250
        """
        if self.max_batch_bytes is None:
            return self
        if not bytes_per_pixel > 0:
            raise InvalidArgument(f"bytes_per_pixel must be > 0, got {bytes_per_pixel!r}")
        pixels = max(int(self.max_batch_bytes // bytes_per_pixel), 1)
        if self.max_batch_pixels is not None:
            pixels = min(pixels, self.max_batch_pixels)
        return replace(self, max_batch_pixels=pixels, max_batch_bytes=None)

    def images_per_batch(self, pixels: int) -> int:
        """How many items of ``pixels`` each a full batch holds (an item over the pixel budget runs alone).

        Example:
            >>> BatchingConfig(max_batch_size=8, max_batch_pixels=500).images_per_batch(200)
            2
        """
        if self.max_batch_bytes is not None:
            raise InvalidArgument(UNCONVERTED_BYTES)
        if self.max_batch_pixels is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_batch_pixels // pixels))


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result with where its time went."""

    value: R
    queue_s: float
    run_s: float
    batch_size: int


@dataclass(eq=False)
class _Pending(Generic[T]):
    item: T
    key: Hashable
    future: asyncio.Future
    enqueued_at: float
    deadline: float | None
    priority: Priority = Priority.INTERACTIVE
    queued: bool = True
    on_finish: Callable[[], None] | None = None


@dataclass
class BatcherStats:
    """Batches run, items they ran, and items ``dropped``: left unrun (cancelled, expired, failed by a stop)."""

    batches: int = 0
    items: int = 0
    dropped: int = 0
    batch_lane_items: int = 0


class DynamicBatcher(Generic[T, R]):
    """Bounded queue + one worker that runs ``predict`` on batches of same-key items.

    Args:
        predict: maps a list of items to a list of results of the same length.
            A result may be an ``Exception`` instance to fail that item alone;
            raising fails every item of the batch. Runs on ``executor``.
        config: batch size, delay and queue bound.
        key: items with different keys never share a batch (default: all equal).
        pixels: an item's pixel count, for ``config.max_batch_pixels``.
        executor: where ``predict`` runs; default one dedicated thread, so one
            batch of this model runs at a time.
        name: used in error messages and logs (e.g. ``"model unet:3"``).
        on_batch: called on the event loop after each batch with
            ``(batch_size, run_s)``; for metrics.

    The owner calls ``start()`` inside a running event loop and ``await stop()``.
    """

    def __init__(
        self,
        predict: Callable[[list[T]], Sequence[R]],
        config: BatchingConfig,
        *,
        key: Callable[[T], Hashable] | None = None,
        pixels: Callable[[T], int] | None = None,
        executor: Executor | None = None,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if not callable(predict):
            raise InvalidArgument(f"predict must be callable, got {type(predict).__name__}")
        if not isinstance(config, BatchingConfig):
            raise InvalidArgument(f"config must be a BatchingConfig, got {type(config).__name__}")
        self._predict = predict
        self.config = config
        self._key = key or (lambda _item: None)
        if config.max_batch_bytes is not None:
            raise InvalidArgument(UNCONVERTED_BYTES)
        if config.max_batch_pixels is not None and pixels is None:
            raise InvalidArgument("config.max_batch_pixels needs a pixels function")
        self._pixels = pixels or (lambda _item: 0)
        self._own_executor = executor is None
        self._executor = executor
        self.name = name
        self._on_batch = on_batch
        # (priority, key) -> items in arrival order; the lane is part of the group key.
        self._groups: dict[tuple[Priority, Hashable], deque[_Pending[T]]] = {}
        self._size = 0
        self._lane_size = {lane: 0 for lane in Priority}
        self._incoming = {lane: 0 for lane in Priority}  # items announced, not yet submitted
        self._last_interactive_end = float("-inf")
        self._last_batch_lane_start = float("-inf")
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._interactive_running = 0
        self._accepting = False
        self.stats = BatcherStats()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is not None:
            raise RuntimeError(f"{self.name} is already started")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.config.concurrency,
                                                thread_name_prefix=f"batch-{self.name}")
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; finish the queued ones (``drain``) or fail them with ``Unavailable``.

        A caller cancelled while it waits leaves the worker running until every item has its result
        (awaited bare, the cancellation reached the worker, and those items' callers waited forever).
        """
        self._accepting = False
        worker = self._worker
        if worker is None:
            return
        if not drain:
            self._fail_all(Unavailable(f"{self.name} stopped before the request ran"))
        self._wakeup.set()
        try:
            await asyncio.shield(worker)
        finally:
            if worker.done():
                self._stopped(worker)
            else:
                worker.add_done_callback(lambda _done: self._stopped(worker))

    def _stopped(self, worker: asyncio.Task) -> None:
        """``worker`` has ended: forget it and shut down the executor this batcher made."""
        if self._worker is not worker:
            return
        self._worker = None
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Items waiting to run (not counting the batch in progress)."""
        return self._size

    # -- callers ---------------------------------------------------------------
    def submit(self, item: T, *, deadline: float | None = None, priority: Priority = Priority.INTERACTIVE,
               on_finish: Callable[[], None] | None = None) -> asyncio.Future:
        """Queue ``item`` in the ``priority`` lane; the future resolves to ``Batched[R]``.

        ``deadline`` is an event-loop time (``loop.time()``); an item still
        queued after it fails with ``DeadlineExceeded`` and never runs.
        Cancelling the future removes the item from the queue; it does not
        stop a batch already running. ``on_finish`` is called once, on the
        event loop, when the item's work has ended: its batch ran (whether or
        not its future was still wanted), or it left the queue without running.

        Raises:
            Unavailable: the batcher is not started or is stopping.
            Overloaded: ``max_queue_size`` items of that lane are already waiting.
        """
        if not self._accepting:
            raise Unavailable(f"{self.name} is not accepting requests (stopped or unloading)")
        priority = Priority(priority)
        if self._lane_size[priority] >= self.config.max_queue_size:
            raise Overloaded(
                f"{self.name} queue is full ({self.config.max_queue_size} requests waiting); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        pending = _Pending(item, (priority, self._key(item)), loop.create_future(), loop.time(), deadline, priority,
                           on_finish=on_finish)
        self._groups.setdefault(pending.key, deque()).append(pending)
        self._size += 1
        self._lane_size[priority] += 1
        pending.future.add_done_callback(lambda _f, p=pending: self._discard(p))
        self._wakeup.set()
        return pending.future

    @contextlib.contextmanager
    def incoming(self, priority: Priority = Priority.INTERACTIVE) -> Iterator[None]:
        """Announce an item that is on its way (being decoded) for the block's duration.

        While items of a lane are announced, a partial batch of that lane waits for
        them (up to ``max_delay_s``); with none announced it runs at once. Leave the
        block just before ``submit`` (or on failure): leaving wakes the worker.

        Example:
            >>> with batcher.incoming():  # doctest: +SKIP
            ...     item = await decode_on_a_thread(request)
            >>> result = await batcher.submit(item)  # doctest: +SKIP
        """
        priority = Priority(priority)
        self._incoming[priority] += 1
        try:
            yield
        finally:
            self._incoming[priority] -= 1
            if self._wakeup is not None:
                self._wakeup.set()  # a partial batch waiting for this item may go now

    @property
    def incoming_count(self) -> int:
        """Items announced with ``incoming()`` and not yet submitted (both lanes)."""
        return sum(self._incoming.values())

    # -- worker ----------------------------------------------------------------
    def _discard(self, pending: _Pending[T]) -> None:
        """A queued item's future finished early (cancelled/deadline): drop it from the queue."""
        if not pending.queued:
            return
        pending.queued = False
        group = self._groups.get(pending.key)
        if group is not None:
            try:
                group.remove(pending)
            except ValueError:
                pass
            else:
                self._size -= 1
                self._lane_size[pending.priority] -= 1
                self.stats.dropped += 1
                self._finished(pending)
            if not group:
                del self._groups[pending.key]

    def _finished(self, pending: _Pending[T]) -> None:
        """The item's work has ended (ran, or left the queue unrun): call its ``on_finish`` once."""
        on_finish, pending.on_finish = pending.on_finish, None
        if on_finish is None:
            return
        try:
            on_finish()
        except Exception:  # a caller's hook must never break the worker
            log.exception("%s: on_finish hook failed", self.name)

    def _full(self, group: deque[_Pending[T]]) -> bool:
        """Whether a group holds a whole batch (by count or by pixel budget)."""
        if len(group) >= self.config.max_batch_size:
            return True
        budget = self.config.max_batch_pixels
        return budget is not None and sum(self._pixels(p.item) for p in group) >= budget

    def _next_key(self, now: float) -> tuple[Hashable | None, float]:
        """The group to batch next, or ``(None, t)``: nothing may start before loop time ``t``.

        Interactive groups come first, oldest first. A batch-lane group waits out
        the hold-off after the last interactive batch and never starts beside a
        running one, unless no batch-lane batch has started for ``batch_max_wait_s``
        and its oldest item waited that long: then it is starved and goes first
        (with concurrent batches, interactive items are always queued when a slot
        frees, so starvation must outrank them).
        """
        def oldest(lane: Priority) -> Hashable | None:
            keys = [k for k in self._groups if k[0] == lane]
            return min(keys, key=lambda k: self._groups[k][0].enqueued_at) if keys else None

        interactive, batch = oldest(Priority.INTERACTIVE), oldest(Priority.BATCH)
        if batch is None:
            return interactive, now
        if self._starved(batch, now):
            return batch, now
        if interactive is not None:
            return interactive, now
        if self._interactive_running:  # starts once the interactive batch ends (it wakes the loop)
            return None, self._starved_at(batch)
        allowed_at = min(self._last_interactive_end + self.config.batch_holdoff_s, self._starved_at(batch))
        return (batch, now) if now >= allowed_at else (None, allowed_at)

    def _starved_at(self, key: Hashable) -> float:
        """When the batch-lane group ``key`` may run ahead of interactive items."""
        return max(self._groups[key][0].enqueued_at, self._last_batch_lane_start) + self.config.batch_max_wait_s

    def _yields(self, key: Hashable, now: float) -> bool:
        """Whether the group ``key`` must give way to queued interactive items (a batch-lane group not starved)."""
        return (key[0] == Priority.BATCH and bool(self._lane_size[Priority.INTERACTIVE])
                and not self._starved(key, now))

    def _starved(self, key: Hashable, now: float) -> bool:
        return key in self._groups and now >= self._starved_at(key)

    def _take(self, key: Hashable) -> list[_Pending[T]]:
        group = self._groups.get(key)
        batch: list[_Pending[T]] = []
        now = asyncio.get_running_loop().time()
        budget = self.config.max_batch_pixels
        total = 0
        while group and len(batch) < self.config.max_batch_size:
            cost = self._pixels(group[0].item)
            if budget is not None and batch and total + cost > budget:
                break
            pending = group.popleft()
            self._size -= 1
            self._lane_size[pending.priority] -= 1
            pending.queued = False
            if pending.future.done():  # cancelled in this iteration: its done callback has not run yet
                self.stats.dropped += 1
                self._finished(pending)
                continue
            if pending.deadline is not None and now >= pending.deadline:
                self.stats.dropped += 1
                pending.future.set_exception(
                    DeadlineExceeded(f"deadline passed after {now - pending.enqueued_at:.3f} s in the {self.name} queue")
                )
                self._finished(pending)
                continue
            batch.append(pending)
            total += cost
        if group is not None and not group:
            del self._groups[key]
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if len(self._running) >= self.config.concurrency:  # every slot busy: wait for one
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            if self._size == 0:
                if not self._accepting:
                    if self._running:
                        await asyncio.wait(self._running)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, not_before = self._next_key(loop.time())
            if key is None:  # only batch-lane work, inside the interactive hold-off
                await self._sleep_until(not_before)
                continue
            flush_at = self._groups[key][0].enqueued_at + self.config.max_delay_s
            # Wait for the group to fill, the oldest item's delay to pass, or a stop, and only
            # while more items of its lane are on their way: else nothing can join it.
            while (
                self._accepting
                and key in self._groups
                and self._incoming[key[0]] > 0
                and not self._full(self._groups[key])
                and loop.time() < flush_at
            ):
                await self._sleep_until(flush_at)
                if key in self._groups and self._yields(key, loop.time()):
                    break  # an interactive item arrived: it goes first
            if key not in self._groups:  # every item of the group was cancelled meanwhile
                continue
            if self._yields(key, loop.time()):
                continue
            batch = self._take(key)
            if not batch:  # every item taken was cancelled or expired
                continue
            self._begin(batch)
            if self.config.concurrency == 1:
                await self._execute(batch)
            else:
                task = loop.create_task(self._execute(batch), name=f"batch-{self.name}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _sleep_until(self, when: float) -> None:
        """Wait for a new item, a stop, or loop time ``when``, whichever comes first.

        ``asyncio.timeout_at``, not ``wait_for``: in Python 3.11 ``wait_for`` drops a cancel that arrives in
        the loop iteration its wait ends, and the worker then outlived ``asyncio.run``'s final cancel.
        """
        self._wakeup.clear()
        try:
            async with asyncio.timeout_at(when):
                await self._wakeup.wait()
        except TimeoutError:
            pass

    def _begin(self, batch: list[_Pending[T]]) -> None:
        """Count ``batch`` as running from the moment it is taken: with free slots the worker picks
        the next batch before this one's task first runs, and the lanes' rules must already see it."""
        if batch[0].priority == Priority.INTERACTIVE:
            self._interactive_running += 1
        else:
            self._last_batch_lane_start = asyncio.get_running_loop().time()

    async def _execute(self, batch: list[_Pending[T]]) -> None:
        """Run a batch counted by ``_begin``; deliver its results, then report every item finished."""
        try:
            await self._run_batch(batch)
        finally:
            for p in batch:
                self._finished(p)

    async def _run_batch(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        interactive = batch[0].priority == Priority.INTERACTIVE
        try:
            ran, outcome = await loop.run_in_executor(self._executor, self._predict_wanted, batch)
        except Exception as exc:  # the executor refused it (shut down): delivered to every caller of the batch
            ran, outcome = batch, exc
        run_s = loop.time() - started
        self.stats.dropped += len(batch) - len(ran)
        if ran:
            self._deliver(ran, outcome, started, run_s)
            self.stats.batches += 1
            self.stats.items += len(ran)
        if interactive:
            self._interactive_running -= 1
            self._last_interactive_end = loop.time()
            self._wakeup.set()  # a batch-lane batch held back while this ran may start after the hold-off
        else:
            self.stats.batch_lane_items += len(ran)
        if ran and self._on_batch is not None:
            try:
                self._on_batch(len(ran), run_s)
            except Exception:  # a metrics hook must never break serving
                log.exception("%s: on_batch hook failed", self.name)

    def _predict_wanted(self, batch: list[_Pending[T]]) -> tuple[list[_Pending[T]], Sequence[R] | Exception]:
        """On the batch thread: ``predict`` of the items whose callers still wait, and those items.

        A caller may leave after ``_take`` and before the thread gets here (it was busy or still starting):
        its item is left out, and a batch nobody waits for runs no forward pass at all. A future read off
        the loop may look pending a moment after it finished (a finished future never reverts), so a wrong
        read only runs an item, as before. ``predict``'s exception is returned, to fail the items that ran.
        """
        wanted = [p for p in batch if not p.future.done()]
        if not wanted:
            return wanted, []
        try:
            results = self._predict([p.item for p in wanted])
            if len(results) != len(wanted):
                raise RuntimeError(f"{self.name}: predict returned {len(results)} results for a batch of {len(wanted)}")
        except Exception as exc:
            return wanted, exc
        return wanted, results

    def _deliver(self, ran: list[_Pending[T]], outcome: Sequence[R] | Exception, started: float,
                 run_s: float) -> None:
        """Give each item of a batch that ran its result, or the batch's exception."""
        if isinstance(outcome, Exception):
            log.debug("%s: batch of %d failed: %r", self.name, len(ran), outcome)
            for p in ran:
                if not p.future.done():
                    p.future.set_exception(outcome)
            return
        for p, value in zip(ran, outcome):
            if p.future.done():
                continue
            if isinstance(value, BaseException):
                p.future.set_exception(value)
            else:
                p.future.set_result(Batched(value, started - p.enqueued_at, run_s, len(ran)))

    def _fail_all(self, exc: Exception) -> None:
        groups, self._groups, self._size = self._groups, {}, 0
        self._lane_size = {lane: 0 for lane in Priority}
        for group in groups.values():
            for p in group:
                p.queued = False
                self.stats.dropped += 1
                if not p.future.done():
                    p.future.set_exception(exc)
                self._finished(p)
