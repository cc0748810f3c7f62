"""DynamicBatcher: plain asyncio with fake predict functions (no models, no grpc)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from segsvc.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from segsvc.inference.batcher import Batched, BatchingConfig, DynamicBatcher, Priority

# A delay the batcher must not wait for: far beyond HANG_S, so a batcher that does wait for it fails on run()'s
# bound, and no stall of a loaded host can reach it. No test measures how long anything took: a stalled host
# stretches every step, and only the order of events decides an outcome.
DELAY_NEVER_WAITED_S = 3600.0
# The bound on every wait for an event (a gate, a batch entering predict, a whole test): it only turns a hang
# into a failure, and no loaded host comes near it while the test passes.
HANG_S = 120.0


class Recorder:
    """A predict function that doubles its inputs and records every batch it saw, with the ``time.monotonic()``
    (the event loop's clock) at which it entered and left predict. With a ``gate``, every call holds until the
    gate is set (HANG_S at most: a gate never set fails the batch instead of letting it through)."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.spans: list[tuple[float, float]] = []
        self.delay_s = delay_s
        self.gate = gate
        self.threads: set[str] = set()
        self.entered = threading.Event()

    def __call__(self, items: list) -> list:
        entered_at = time.monotonic()
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(HANG_S), f"the test never opened the gate in {HANG_S:g} s"
        if self.delay_s:
            time.sleep(self.delay_s)  # makes the batch take some time; never decides an outcome
        self.batches.append(list(items))
        self.spans.append((entered_at, time.monotonic()))
        return [x * 2 if isinstance(x, int) else x for x in items]


def run(coro):
    # The bound only turns a hang into a failure (a loaded host stretches a test, never to this).
    return asyncio.run(asyncio.wait_for(coro, HANG_S))


async def running(rec: Recorder) -> None:
    """Return once a batch is inside ``rec``: the worker has taken it off the queue."""
    assert await asyncio.to_thread(rec.entered.wait, HANG_S), "no batch reached predict"


async def until(condition) -> None:
    """Wait, stepping the event loop, until ``condition()`` holds (run()'s bound stops a hang)."""
    while not condition():
        await asyncio.sleep(0.001)


def test_config_checks_arguments():
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(InvalidArgument, match="max_delay_s"):
        BatchingConfig(max_delay_s=-1)
    with pytest.raises(InvalidArgument, match="max_queue_size"):
        BatchingConfig(max_queue_size=0)
    assert BatchingConfig(max_batch_size=1).enabled is False
    with pytest.raises(InvalidArgument, match="callable"):
        DynamicBatcher(None, BatchingConfig())  # type: ignore[arg-type]


def test_flushes_at_max_batch_size_without_waiting_for_the_delay():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=4, max_delay_s=DELAY_NEVER_WAITED_S))
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))  # waiting max_delay_s: run() fails
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [2 * i for i in range(8)]
    assert [len(x) for x in rec.batches] == [4, 4]
    assert all(isinstance(r, Batched) and r.batch_size == 4 for r in results)


def test_flushes_a_partial_batch_after_max_delay():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=0.05))
        b.start()
        t0 = time.perf_counter()
        with b.incoming():  # another item is on its way (and never comes): the batch waits for it
            r = await b.submit(21)
        elapsed = time.perf_counter() - t0
        await b.stop()
        return r, elapsed

    r, elapsed = run(main())  # waiting for the item that never comes: run() fails
    assert r.value == 42 and r.batch_size == 1
    assert 0.04 <= elapsed  # waited for the delay (a lower bound: a stalled host only lengthens it)
    assert 0.04 <= r.queue_s <= elapsed and 0.0 <= r.run_s <= elapsed - r.queue_s


def test_a_lone_item_runs_at_once_when_nothing_else_is_on_its_way():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=DELAY_NEVER_WAITED_S))
        b.start()
        first = await b.submit(1)  # nothing announced: no other item could join, so no reason to wait
        second = await b.submit(2)
        await b.stop()
        return rec.batches, first, second

    batches, first, second = run(main())
    assert batches == [[1], [2]]
    assert (first.value, first.batch_size, second.value) == (2, 1, 4)


def test_a_partial_batch_waits_for_announced_items_and_goes_when_the_last_one_is_in():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=DELAY_NEVER_WAITED_S))
        b.start()
        with b.incoming():  # item 2 is being decoded
            with b.incoming():  # so is item 3, whose decoding will fail
                first = b.submit(1)
                for _ in range(3):
                    await asyncio.sleep(0)  # the worker sees item 1 with company announced: it waits
            for _ in range(3):
                await asyncio.sleep(0)  # item 3 withdrawn, item 2 still announced: it keeps waiting
            assert not first.done() and rec.batches == []
            second = b.submit(2)
        # the last announced item is in: the batch goes now, not after the delay (run() fails first)
        results = await asyncio.gather(first, second)
        assert b.incoming_count == 0
        await b.stop()
        return rec.batches, results

    batches, results = run(main())
    assert batches == [[1, 2]]
    assert [(r.value, r.batch_size) for r in results] == [(2, 2), (4, 2)]


def test_a_withdrawn_announcement_releases_the_waiting_batch():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=DELAY_NEVER_WAITED_S))
        b.start()
        with pytest.raises(ValueError):
            with b.incoming():  # the announced item fails while it is prepared
                first = b.submit(1)
                await asyncio.sleep(0)
                raise ValueError("undecodable image")
        result = await first
        await b.stop()
        return rec.batches, result, b.incoming_count

    batches, result, incoming = run(main())
    assert batches == [[1]] and result.value == 2 and incoming == 0


def test_an_item_announced_in_the_batch_lane_does_not_hold_back_an_interactive_one():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=DELAY_NEVER_WAITED_S, batch_holdoff_s=0))
        b.start()
        with b.incoming(Priority.BATCH):  # a job's image is being decoded
            result = await b.submit(1)  # interactive: only interactive items could join its batch
        await b.stop()
        return result

    assert run(main()).value == 2


def test_items_with_different_keys_never_share_a_batch():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=16, max_delay_s=0.02), key=lambda s: len(s))
        b.start()
        items = ["a", "bb", "c", "dd", "e", "fff"]
        results = await asyncio.gather(*(b.submit(s) for s in items))
        await b.stop()
        return rec, items, results

    rec, items, results = run(main())
    assert [r.value for r in results] == items  # every caller gets its own result
    for batch in rec.batches:
        assert len({len(s) for s in batch}) == 1
    assert sorted(len(batch) for batch in rec.batches) == [1, 2, 3]


def test_full_queue_is_refused_with_overloaded():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0, max_queue_size=2))
        b.start()
        first = b.submit(0)
        await running(rec)  # the worker has taken it and blocks on the gate
        queued = [b.submit(1), b.submit(2)]
        with pytest.raises(Overloaded, match="queue is full"):
            b.submit(3)
        assert b.queue_depth == 2
        gate.set()
        done = await asyncio.gather(first, *queued)
        later = await b.submit(4)  # room again
        await b.stop()
        return [r.value for r in done], later.value

    values, later = run(main())
    assert values == [0, 2, 4] and later == 8


def test_an_exception_is_delivered_to_every_future_of_the_batch_and_the_worker_survives():
    calls = []

    def predict(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise ValueError("boom")
        return items

    async def main():
        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=3, max_delay_s=1.0))
        b.start()
        futures = [b.submit(i) for i in range(3)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        after = await asyncio.gather(*(b.submit(i) for i in (7, 8, 9)))  # a full batch: no 1 s delay
        await b.stop()
        return outcomes, after

    outcomes, after = run(main())
    assert all(isinstance(o, ValueError) and str(o) == "boom" for o in outcomes)
    assert [r.value for r in after] == [7, 8, 9]


def test_an_exception_result_fails_only_its_item():
    def predict(items):
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def main():
        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=3, max_delay_s=1.0))
        b.start()
        outcomes = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(2), return_exceptions=True)
        await b.stop()
        return outcomes

    ok1, bad, ok2 = run(main())
    assert ok1.value == 1 and ok2.value == 2
    assert isinstance(bad, ValueError) and "bad -1" in str(bad)


def test_a_wrong_result_count_fails_the_batch():
    async def main():
        b = DynamicBatcher(lambda items: items[:-1], BatchingConfig(max_batch_size=2, max_delay_s=1.0))
        b.start()
        outcomes = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        await b.stop()
        return outcomes

    outcomes = run(main())
    assert all(isinstance(o, RuntimeError) and "1 results for a batch of 2" in str(o) for o in outcomes)


def test_cancelled_requests_are_dropped_from_the_queue_and_never_run():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        first = b.submit(1)
        await running(rec)
        doomed = b.submit(2)
        kept = b.submit(3)
        assert b.queue_depth == 2
        doomed.cancel()
        await asyncio.sleep(0)
        assert b.queue_depth == 1
        gate.set()
        results = await asyncio.gather(first, kept)
        await b.stop()
        return rec, results, b.stats.dropped

    rec, results, dropped = run(main())
    assert [r.value for r in results] == [2, 6]
    assert rec.batches == [[1], [3]]
    assert dropped == 1


def test_requests_past_their_deadline_are_failed_and_never_run():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        loop = asyncio.get_running_loop()
        first = b.submit(1)
        await running(rec)
        late = b.submit(2, deadline=loop.time() + 0.05)
        on_time = b.submit(3, deadline=loop.time() + DELAY_NEVER_WAITED_S)
        await asyncio.sleep(0.1)  # the deadline of `late` passes while the worker is held on the gate
        gate.set()
        outcomes = await asyncio.gather(first, late, on_time, return_exceptions=True)
        await b.stop()
        return rec, outcomes

    rec, (first, late, on_time) = run(main())
    assert isinstance(late, DeadlineExceeded) and "deadline passed" in str(late)
    assert first.value == 2 and on_time.value == 6
    assert [2] not in rec.batches


def test_stop_drains_queued_items_and_then_refuses_new_ones():
    async def main():
        rec = Recorder(delay_s=0.02)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=2, max_delay_s=DELAY_NEVER_WAITED_S))
        b.start()
        with b.incoming():  # more is announced: the last partial batch would wait for it
            futures = [b.submit(i) for i in range(5)]
            await b.stop(drain=True)  # must not wait the delay: stopping flushes at once
        results = [f.result().value for f in futures]
        with pytest.raises(Unavailable):
            b.submit(9)
        return results

    assert run(main()) == [0, 2, 4, 6, 8]  # a stop that waited for the delay would fail on run()'s bound


def test_stop_without_drain_fails_queued_items_with_unavailable():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        first = b.submit(1)
        await running(rec)
        queued = b.submit(2)
        stopping = asyncio.ensure_future(b.stop(drain=False))
        await asyncio.gather(queued, return_exceptions=True)  # failed at once, while the first is still held
        gate.set()
        await stopping
        return first.result().value, queued.exception(), rec.batches, b.stats

    value, exc, batches, stats = run(main())
    assert (value, batches) == (2, [[1]])
    assert isinstance(exc, Unavailable)
    assert (stats.batches, stats.items, stats.dropped) == (1, 1, 1)  # the failed item counts as dropped


def test_predict_runs_off_the_event_loop():
    threads = []

    async def main():
        loop = asyncio.get_running_loop()

        def predict(items):
            # Asks the loop to run a callback and waits for it: on the loop's own thread it never runs.
            threads.append(threading.current_thread().name)
            answered = threading.Event()
            loop.call_soon_threadsafe(answered.set)
            return [answered.wait(HANG_S) for _ in items]  # False (after HANG_S) on the loop's thread

        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        result = await b.submit(1)
        await b.stop()
        return result.value

    assert run(main()) is True  # the loop kept running while predict waited
    assert threads and all(name.startswith("batch-") for name in threads)


def test_submit_before_start_is_refused():
    b = DynamicBatcher(lambda xs: xs, BatchingConfig())
    with pytest.raises(Unavailable):
        b.submit(1)


def test_pixel_budget_checks_arguments():
    with pytest.raises(InvalidArgument, match="max_batch_pixels"):
        BatchingConfig(max_batch_pixels=0)
    with pytest.raises(InvalidArgument, match="pixels function"):
        DynamicBatcher(Recorder(), BatchingConfig(max_batch_pixels=100))


def test_pixel_budget_splits_batches_and_flushes_without_waiting():
    """Items are their own pixel counts: a 100-pixel budget fits 60+40, then 70+30, then 50+50."""

    async def main():
        rec = Recorder()
        config = BatchingConfig(max_batch_size=8, max_delay_s=DELAY_NEVER_WAITED_S, max_batch_pixels=100)
        b = DynamicBatcher(rec, config, pixels=lambda item: item)
        b.start()
        # a full budget flushes at once: waiting for the delay would fail on run()'s bound
        results = await asyncio.gather(*(b.submit(i) for i in (60, 40, 70, 30, 50, 50)))
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [120, 80, 140, 60, 100, 100]
    assert rec.batches == [[60, 40], [70, 30], [50, 50]]


def test_a_memory_budget_becomes_pixels_by_the_model_s_bytes_per_pixel():
    config = BatchingConfig(max_batch_size=8, max_batch_bytes=1 << 20)
    assert config.for_model(1024.0).max_batch_pixels == 1024
    assert config.for_model(1024.0).max_batch_bytes is None
    assert config.for_model(3.0).max_batch_pixels == (1 << 20) // 3
    assert config.for_model(float(1 << 30)).max_batch_pixels == 1  # an image over the budget still runs, alone
    assert BatchingConfig(max_batch_bytes=1 << 20, max_batch_pixels=10).for_model(1.0).max_batch_pixels == 10
    assert BatchingConfig(max_batch_pixels=10).for_model(1.0).max_batch_pixels == 10
    with pytest.raises(InvalidArgument, match="bytes_per_pixel must be > 0"):
        config.for_model(0.0)


def test_an_unresolved_memory_budget_is_refused_where_it_would_be_ignored():
    config = BatchingConfig(max_batch_bytes=1 << 20)
    with pytest.raises(InvalidArgument, match="for_model"):
        DynamicBatcher(Recorder(), config, pixels=lambda item: item)
    with pytest.raises(InvalidArgument, match="for_model"):
        config.images_per_batch(100)


@pytest.mark.parametrize("config,pixels,images", [
    (BatchingConfig(max_batch_size=8), 10**9, 8),
    (BatchingConfig(max_batch_size=8, max_batch_pixels=100), 30, 3),
    (BatchingConfig(max_batch_size=2, max_batch_pixels=100), 30, 2),
    (BatchingConfig(max_batch_size=8, max_batch_pixels=100), 500, 1),
])
def test_images_per_batch_follows_the_batcher_s_rule(config, pixels, images):
    assert config.images_per_batch(pixels) == images


def test_a_batch_holds_images_per_batch_items_of_one_size():
    config = BatchingConfig(max_batch_size=8, max_delay_s=5.0, max_batch_pixels=100)

    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, config, pixels=lambda item: item)
        b.start()
        await asyncio.gather(*(b.submit(30) for _ in range(7)))
        await b.stop()
        return rec

    assert [len(batch) for batch in run(main()).batches] == [config.images_per_batch(30)] * 2 + [1]


def test_an_item_over_the_pixel_budget_runs_alone():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=0.01, max_batch_pixels=100),
                           pixels=lambda item: item)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in (500, 10, 20)))
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [1000, 20, 40]
    assert rec.batches == [[500], [10, 20]]


# -- priority lanes ------------------------------------------------------------------
def test_interactive_items_run_before_queued_batch_items():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=2, max_delay_s=0, batch_holdoff_s=0))
        b.start()
        first = b.submit(1, priority=Priority.BATCH)
        await running(rec)  # the first batch-lane batch is running (blocked on the gate)
        queued_jobs = [b.submit(i, priority=Priority.BATCH) for i in (10, 11, 12)]
        interactive = b.submit(100)
        gate.set()
        await asyncio.gather(first, interactive, *queued_jobs)
        await b.stop()
        return rec, b.stats

    rec, stats = run(main())
    assert rec.batches[0] == [1]
    assert rec.batches[1] == [100], rec.batches  # jumped ahead of three older batch-lane items
    assert sorted(x for batch in rec.batches[2:] for x in batch) == [10, 11, 12]
    assert stats.batch_lane_items == 4 and stats.items == 5


def test_batch_items_wait_out_the_holdoff_after_an_interactive_batch():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=4, max_delay_s=0, batch_holdoff_s=0.3))
        b.start()
        await b.submit(1)
        job = await b.submit(2, priority=Priority.BATCH)
        await b.stop()
        return rec.spans, job

    # Measured between the batches themselves (the end of the interactive one, the start of the job's), not from
    # the test's submit: a host that stalls the test between the two shortens the wait the test sees, never this.
    spans, job = run(main())
    (_, interactive_left), (job_entered, _) = spans
    waited = job_entered - interactive_left
    assert job.value == 4
    assert waited >= 0.29, f"the batch-lane item ran {waited:.3f} s after an interactive batch (hold-off 0.3 s)"


async def _interactive_load(b: DynamicBatcher, rec: Recorder) -> tuple[asyncio.Event, asyncio.Task]:
    """A client sending interactive items back to back until the returned event is set."""
    stop = asyncio.Event()

    async def interactive_client() -> None:
        while not stop.is_set():
            await b.submit(1)

    return stop, asyncio.get_running_loop().create_task(interactive_client())


def test_batch_items_run_after_max_wait_even_under_continuous_interactive_load():
    async def main():
        rec = Recorder(delay_s=0.01)
        cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, batch_holdoff_s=DELAY_NEVER_WAITED_S,
                             batch_max_wait_s=0.2)
        b = DynamicBatcher(rec, cfg)
        b.start()
        stop, client = await _interactive_load(b, rec)
        await until(lambda: rec.batches)  # interactive traffic is flowing
        result = await b.submit(7, priority=Priority.BATCH)  # a job held off for good: run() fails
        stop.set()
        await client
        await b.stop()
        return result

    result = run(main())
    assert result.value == 14
    assert 0.15 <= result.queue_s  # after max_wait (not after the hold-off: that would fail on run()'s bound)


def test_each_lane_has_its_own_queue_bound():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0, max_queue_size=2))
        b.start()
        running_item = b.submit(0)
        await running(rec)
        jobs = [b.submit(i, priority=Priority.BATCH) for i in (1, 2)]
        with pytest.raises(Overloaded):
            b.submit(3, priority=Priority.BATCH)
        interactive = [b.submit(i) for i in (4, 5)]  # the full batch lane does not block these
        with pytest.raises(Overloaded):
            b.submit(6)
        assert b.queue_depth == 4
        gate.set()
        await asyncio.gather(running_item, *jobs, *interactive)
        await b.stop()
        return rec

    rec = run(main())
    assert [x for batch in rec.batches for x in batch] == [0, 4, 5, 1, 2]


def test_under_continuous_interactive_load_the_batch_lane_gets_one_batch_per_max_wait():
    """Aging bounds the job's share: old batch items do not lift the hold-off for good."""
    RAN = 4

    async def main():
        rec = Recorder(delay_s=0.005)
        cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, batch_holdoff_s=10.0, batch_max_wait_s=0.2)
        b = DynamicBatcher(rec, cfg)
        b.start()
        stop, client = await _interactive_load(b, rec)
        await until(lambda: rec.batches)
        loop = asyncio.get_running_loop()
        started = loop.time()
        jobs = [b.submit(100 + i, priority=Priority.BATCH) for i in range(20)]
        # The lane's share: RAN batches run (a starved lane never gets there: run() fails). Read with the window
        # at one instant, so a stall after it cannot add a batch to one side only.
        await until(lambda: b.stats.batch_lane_items >= RAN)
        ran, window_s = b.stats.batch_lane_items, loop.time() - started
        stop.set()
        await client
        for j in jobs:
            j.cancel()
        await b.stop(drain=False)
        return ran, window_s

    # At most one batch per 0.2 s, plus one, in the window the loop really had (a stall only widens it): RAN
    # batches take at least (RAN - 1) * 0.2 s. Aging that lifted the hold-off for good would run them back to back,
    # a few ms apart, and RAN is high enough that this cannot fit under the bound.
    ran, window_s = run(main())
    assert ran <= window_s / 0.2 + 1, f"{ran} batch-lane batches ran in {window_s:.2f} s with max_wait 0.2 s"


# -- what metrics, owners and callers rely on ------------------------------------------------
class Held:
    """A predict function that doubles its inputs, records each batch and its thread, and holds
    every call until ``release`` is set; ``await held.entered()`` returns once a batch is inside
    predict (event-driven: no polling)."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.threads: list[threading.Thread] = []
        self.release = threading.Event()
        self._entered = threading.Semaphore(0)

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.threads.append(threading.current_thread())
        self._entered.release()
        assert self.release.wait(HANG_S), f"the test never released the batch in {HANG_S:g} s"
        return [x * 2 for x in items]

    async def entered(self) -> None:
        assert await asyncio.to_thread(self._entered.acquire, True, HANG_S), "no batch reached predict"


def test_on_batch_stats_and_timings_describe_every_batch():
    async def main():
        calls = []
        held = Held()
        b = DynamicBatcher(held, BatchingConfig(max_batch_size=3, max_delay_s=0),
                           on_batch=lambda size, run_s: calls.append((size, run_s)))
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = b.submit(0)
        await held.entered()  # [0] runs alone and is held
        queued = [b.submit(i) for i in range(1, 6)]  # then [1, 2, 3] (a full batch) and [4, 5]
        await asyncio.sleep(0.01)
        held.release.set()
        results = await asyncio.gather(first, *queued)
        elapsed = loop.time() - t0
        await b.stop()
        return held, calls, results, elapsed, b.stats

    held, calls, results, elapsed, stats = run(main())
    assert held.batches == [[0], [1, 2, 3], [4, 5]]
    assert [r.value for r in results] == [0, 2, 4, 6, 8, 10]
    assert [r.batch_size for r in results] == [1, 3, 3, 3, 2, 2]
    # the hook sees each batch once, with the run time its callers see
    assert calls == [(1, results[0].run_s), (3, results[1].run_s), (2, results[4].run_s)]
    assert results[1].run_s == results[2].run_s == results[3].run_s
    assert (stats.batches, stats.items, stats.dropped, stats.batch_lane_items) == (3, 6, 0, 0)
    # [0] was held in predict >= 10 ms while [1..5] waited in the queue
    assert 0.01 <= results[0].run_s <= elapsed
    assert 0.0 <= results[0].queue_s <= elapsed - results[0].run_s
    for r in results[1:]:
        assert 0.01 <= r.queue_s <= elapsed and 0.0 <= r.run_s <= elapsed - r.queue_s


def test_a_failed_batch_is_reported_to_on_batch_and_a_failing_hook_breaks_nothing():
    calls = []

    def hook(size, run_s):
        calls.append((size, run_s))
        raise RuntimeError("metrics backend down")

    def predict(items):
        if -1 in items:
            raise ValueError("bad batch")
        return [x * 2 for x in items]

    async def main():
        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=2, max_delay_s=5.0), on_batch=hook)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        failed = await asyncio.gather(b.submit(-1), b.submit(1), return_exceptions=True)
        later = await asyncio.gather(b.submit(2), b.submit(3))
        elapsed = loop.time() - t0
        await b.stop()
        return failed, later, elapsed, b.stats

    failed, later, elapsed, stats = run(main())
    assert all(isinstance(e, ValueError) and str(e) == "bad batch" for e in failed)
    assert [r.value for r in later] == [4, 6]
    assert [size for size, _ in calls] == [2, 2]
    assert all(0.0 <= run_s <= elapsed for _, run_s in calls)
    assert calls[1][1] == later[0].run_s
    assert (stats.batches, stats.items) == (2, 4)  # a failed batch still counts


def test_the_oldest_group_runs_first():
    async def main():
        held = Held()
        b = DynamicBatcher(held, BatchingConfig(max_batch_size=4, max_delay_s=0), key=lambda s: s[0])
        b.start()
        first = b.submit("g0")
        await held.entered()
        # groups by first letter; arrival order z, a, m: neither alphabetical nor its reverse
        queued = [b.submit(s) for s in ("z1", "a1", "z2", "m1", "a2")]
        held.release.set()
        await asyncio.gather(first, *queued)
        await b.stop()
        return held.batches

    assert run(main()) == [["g0"], ["z1", "z2"], ["a1", "a2"], ["m1"]]


def test_an_item_cancelled_while_its_batch_runs_leaves_the_others_their_results():
    async def main():
        calls = []
        held = Held()
        b = DynamicBatcher(held, BatchingConfig(max_batch_size=3, max_delay_s=5.0),
                           on_batch=lambda size, run_s: calls.append(size))
        b.start()
        futures = [b.submit(i) for i in (1, 2, 3)]
        await held.entered()
        futures[1].cancel()  # the caller of the middle item went away
        held.release.set()
        done = await asyncio.gather(futures[0], futures[2])
        later = await asyncio.gather(*(b.submit(i) for i in (4, 5, 6)))  # the worker lives on
        await b.stop()
        return held.batches, calls, done, later, b.stats

    batches, calls, done, later, stats = run(main())
    assert batches == [[1, 2, 3], [4, 5, 6]]
    assert [(r.value, r.batch_size) for r in done] == [(2, 3), (6, 3)]
    assert [r.value for r in later] == [8, 10, 12]
    assert calls == [3, 3]
    assert (stats.batches, stats.items, stats.dropped) == (2, 6, 0)  # it ran: not a drop


def test_an_item_cancelled_in_the_middle_of_a_queued_group_is_dropped_and_frees_its_place():
    async def main():
        held = Held()
        b = DynamicBatcher(held, BatchingConfig(max_batch_size=4, max_delay_s=0, max_queue_size=4))
        b.start()
        blocker = b.submit(0)
        await held.entered()
        queued = [b.submit(i) for i in (1, 2, 3, 4)]
        queued[1].cancel()
        queued[2].cancel()
        await asyncio.sleep(0)  # the futures' done callbacks run
        depth = b.queue_depth
        dropped = b.stats.dropped
        queued += [b.submit(5), b.submit(6)]  # the two cancelled items' places are free again...
        with pytest.raises(Overloaded):
            b.submit(7)  # ...and no more than those
        held.release.set()
        results = await asyncio.gather(blocker, queued[0], queued[3], queued[4], queued[5])
        await b.stop()
        return held.batches, depth, dropped, results, b.stats

    batches, depth, dropped, results, stats = run(main())
    assert (depth, dropped) == (2, 2)
    assert batches == [[0], [1, 4, 5, 6]]
    assert [(r.value, r.batch_size) for r in results] == [(0, 1), (2, 4), (8, 4), (10, 4), (12, 4)]
    assert (stats.batches, stats.items, stats.dropped) == (2, 5, 2)


def test_an_expired_item_is_counted_as_dropped_and_its_neighbours_run():
    async def main():
        held = Held()
        b = DynamicBatcher(held, BatchingConfig(max_batch_size=3, max_delay_s=0))
        b.start()
        loop = asyncio.get_running_loop()
        blocker = b.submit(0)
        await held.entered()
        queued = [b.submit(1), b.submit(2, deadline=loop.time()),
                  b.submit(3, deadline=loop.time() + DELAY_NEVER_WAITED_S), b.submit(4, deadline=loop.time())]
        held.release.set()
        outcomes = await asyncio.gather(blocker, *queued, return_exceptions=True)
        await b.stop()
        return held.batches, outcomes, b.stats

    batches, (blocker, one, expired, three, also_expired), stats = run(main())
    assert batches == [[0], [1, 3]]
    assert isinstance(expired, DeadlineExceeded) and isinstance(also_expired, DeadlineExceeded)
    # the time it spent queued is however long the host took (a stall makes it seconds): only its form is fixed
    assert re.fullmatch(r"deadline passed after \d+\.\d{3} s in the batcher queue", str(expired)), str(expired)
    assert (one.value, one.batch_size, three.value) == (2, 2, 6)
    assert (stats.batches, stats.items, stats.dropped) == (2, 3, 2)


def test_the_own_executor_is_shut_down_on_stop_and_a_given_one_is_not():
    async def main():
        own = Held()
        own.release.set()
        b = DynamicBatcher(own, BatchingConfig(max_batch_size=1), name="m")
        b.start()
        await b.submit(1)
        await b.stop()
        own_thread = own.threads[0]
        own_thread_ended = await asyncio.to_thread(lambda: (own_thread.join(HANG_S), not own_thread.is_alive())[1])

        given_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="given")
        given = Held()
        given.release.set()
        g = DynamicBatcher(given, BatchingConfig(max_batch_size=1), executor=given_executor)
        g.start()
        await g.submit(2)
        await g.stop()
        return b, own_thread, own_thread_ended, given_executor, given.threads

    b, own_thread, own_thread_ended, given_executor, given_threads = run(main())
    assert own_thread.name.startswith("batch-m")
    assert own_thread_ended  # stop() shut the batcher's own executor down (b is still referenced)
    assert [t.name.split("_")[0] for t in given_threads] == ["given"]
    try:
        assert given_executor.submit(lambda: 7).result(HANG_S) == 7  # the owner's executor still works
    finally:
        given_executor.shutdown()


def test_a_stopped_batcher_starts_again_with_an_empty_queue_and_a_fresh_executor():
    async def main():
        held = Held()
        b = DynamicBatcher(held, BatchingConfig(max_batch_size=1, max_delay_s=0, max_queue_size=1), name="m")
        b.start()
        running = b.submit(0)
        await held.entered()
        queued = b.submit(1)
        stopping = asyncio.ensure_future(b.stop(drain=False))
        await asyncio.sleep(0)  # stop fails the queued item at once, then waits for the running one
        queued_error = queued.exception()
        depth = b.queue_depth
        held.release.set()
        await stopping
        b.start()
        again = await asyncio.gather(b.submit(2))  # the lane's bound of 1 is free again
        await b.stop()
        return running.result(), queued_error, depth, again, held.threads

    running, queued_error, depth, again, threads = run(main())
    assert running.value == 0 and [r.value for r in again] == [4]
    assert isinstance(queued_error, Unavailable) and str(queued_error) == "m stopped before the request ran"
    assert depth == 0
    assert threads[0] is not threads[1]  # the first executor was shut down; start() made a new one


def test_lifecycle_errors_and_names():
    async def main():
        b = DynamicBatcher(lambda xs: xs, BatchingConfig())
        with pytest.raises(Unavailable, match="batcher is not accepting requests"):
            b.submit(1)
        await b.stop()  # never started: nothing to do
        assert not b.running
        b.start()
        assert b.running
        with pytest.raises(RuntimeError, match="batcher is already started"):
            b.start()
        names = {t.get_name() for t in asyncio.all_tasks()}
        value = (await b.submit(5)).value
        await b.stop()
        assert not b.running
        return names, value

    names, value = run(main())
    assert "batcher-batcher" in names and value == 5


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_batch_size": 2.5}, "max_batch_size must be a positive integer, got 2.5"),
        ({"max_queue_size": 1.5}, "max_queue_size must be a positive integer, got 1.5"),
        ({"max_batch_pixels": 1.5}, "max_batch_pixels must be a positive integer or None, got 1.5"),
        ({"max_batch_pixels": -1}, "max_batch_pixels must be a positive integer or None, got -1"),
        ({"max_batch_bytes": 0}, "max_batch_bytes must be a positive integer or None, got 0"),
        ({"max_batch_bytes": 2.5}, "max_batch_bytes must be a positive integer or None, got 2.5"),
        ({"batch_holdoff_s": -0.5}, "batch_holdoff_s must be >= 0, got -0.5"),
        ({"batch_max_wait_s": -1.0}, "batch_max_wait_s must be >= 0, got -1.0"),
        ({"max_delay_s": -0.001}, "max_delay_s must be >= 0, got -0.001"),
    ],
)
def test_config_errors_name_the_field_and_value(kwargs, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        BatchingConfig(**kwargs)


def test_config_bounds_are_accepted_and_arguments_checked():
    cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, max_queue_size=1, max_batch_pixels=1,
                         batch_holdoff_s=0, batch_max_wait_s=0)
    assert (cfg.max_batch_pixels, cfg.max_queue_size) == (1, 1)
    assert BatchingConfig(max_batch_size=2).enabled
    with pytest.raises(InvalidArgument, match="config must be a BatchingConfig, got dict"):
        DynamicBatcher(lambda xs: xs, {"max_batch_size": 2})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="predict must be callable, got int"):
        DynamicBatcher(42, BatchingConfig())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as info:
        DynamicBatcher(lambda xs: xs, BatchingConfig(max_batch_pixels=100))
    assert str(info.value) == "config.max_batch_pixels needs a pixels function"


def test_stop_drains_by_default():
    async def main():
        b = DynamicBatcher(lambda xs: xs, BatchingConfig(max_batch_size=8, max_delay_s=5.0))
        b.start()
        with b.incoming():
            futures = [b.submit(i) for i in range(3)]  # a partial batch, waiting for company
            await b.stop()
        return [f.result().value for f in futures]

    assert run(main()) == [0, 1, 2]


def test_a_partial_batch_keeps_waiting_for_its_key_while_other_keys_arrive():
    async def main():
        rec = Recorder()
        # a delay never reached: a host that stalls the test between a1 and a2 cannot flush a1 alone
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=4, max_delay_s=DELAY_NEVER_WAITED_S),
                           key=lambda s: s[0])
        b.start()
        with b.incoming():  # a2 is on its way
            first = b.submit("a1")
            await asyncio.sleep(0.005)  # the worker waits for a1's batch to fill
            other = b.submit("b1")  # wakes the worker: not a reason to flush a1 early
            await asyncio.sleep(0.005)
            late = b.submit("a2")
        await asyncio.gather(first, other, late)
        await b.stop()
        return rec.batches

    assert run(main()) == [["a1", "a2"], ["b1"]]


def test_an_interactive_item_does_not_wait_for_a_batch_lane_group_to_fill():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=2, max_delay_s=DELAY_NEVER_WAITED_S, batch_holdoff_s=0))
        b.start()
        with b.incoming(Priority.BATCH):  # another job item is on its way
            job = b.submit(1, priority=Priority.BATCH)
            await asyncio.sleep(0.005)  # the batch-lane item waits for company (until the announcement ends)
            interactive = await asyncio.gather(b.submit(2), b.submit(3))
        await job
        await b.stop()
        return rec.batches, interactive

    batches, interactive = run(main())
    assert batches == [[2, 3], [1]]
    # they did not wait for the delay: that would have failed on run()'s bound


def test_a_group_cancelled_while_it_waits_for_company_does_not_stop_the_worker():
    async def main():
        # a delay never reached: a host that stalls the test before the cancel cannot flush "a1" alone first
        b = DynamicBatcher(lambda xs: xs, BatchingConfig(max_batch_size=2, max_delay_s=DELAY_NEVER_WAITED_S),
                           key=lambda s: s[0])
        b.start()
        with b.incoming():
            lonely = b.submit("a1")
            await asyncio.sleep(0.005)  # the worker waits for group "a" to fill
            lonely.cancel()
            await asyncio.sleep(0.005)
            results = await asyncio.gather(b.submit("b1"), b.submit("b2"))  # another group wakes the worker
        await b.stop()
        return [r.value for r in results], b.stats.dropped

    assert run(main()) == (["b1", "b2"], 1)


def test_concurrency_runs_batches_at_once_and_is_checked():
    with pytest.raises(InvalidArgument, match="concurrency"):
        BatchingConfig(concurrency=0)
    barrier = threading.Barrier(2, timeout=HANG_S)

    def predict(items: list) -> list:
        barrier.wait()  # only two batches running at the same time get past this
        return [x * 2 for x in items]

    async def main():
        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=1, max_delay_s=0, concurrency=2))
        b.start()
        results = await asyncio.gather(b.submit(1), b.submit(2))
        await b.stop()
        return [r.value for r in results]

    assert run(main()) == [2, 4]


def test_a_starved_batch_item_runs_with_concurrent_batches_under_continuous_interactive_load():
    """With two slots a freed slot always finds interactive items queued: starvation must outrank them."""
    async def main():
        rec = Recorder(delay_s=0.01)
        cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, batch_holdoff_s=DELAY_NEVER_WAITED_S,
                             batch_max_wait_s=0.2, concurrency=2)
        b = DynamicBatcher(rec, cfg)
        b.start()
        loads = [await _interactive_load(b, rec) for _ in range(2)]
        await until(lambda: rec.batches)
        result = await b.submit(7, priority=Priority.BATCH)  # a job held off for good: run() fails
        for stop, client in loads:
            stop.set()
            await client
        await b.stop()
        return result

    result = run(main())
    assert result.value == 14 and result.queue_s >= 0.15


def _gated_predict() -> tuple[threading.Event, threading.Event, object]:
    """A predict that signals ``entered`` and holds every batch until ``gate`` is set."""
    entered, gate = threading.Event(), threading.Event()

    def predict(items: list) -> list:
        entered.set()
        assert gate.wait(HANG_S), f"the test never opened the gate in {HANG_S:g} s"
        return [x * 2 if isinstance(x, int) else x for x in items]

    return entered, gate, predict


def test_on_finish_runs_when_an_item_s_work_ends_not_when_its_caller_gives_up():
    """Running: once its batch ends, even if its future was cancelled. Queued: when it leaves the queue unrun."""
    entered, gate, predict = _gated_predict()

    async def main():
        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        loop = asyncio.get_running_loop()
        finished: list[str] = []
        running_item = b.submit("a", on_finish=lambda: finished.append("a"))
        await asyncio.to_thread(entered.wait, HANG_S)  # "a" is inside predict
        cancelled = b.submit("b", on_finish=lambda: finished.append("b"))
        expired = b.submit("c", deadline=loop.time(), on_finish=lambda: finished.append("c"))
        running_item.cancel()
        cancelled.cancel()
        await asyncio.sleep(0)  # the cancelled futures' callbacks run: "b" leaves the queue
        while_running = list(finished)
        gate.set()
        await b.stop()  # drains: "a" ends, then "c" is taken past its deadline and dropped
        with pytest.raises(DeadlineExceeded):
            expired.result()
        return while_running, finished

    while_running, finished = run(main())
    assert while_running == ["b"], "a running item was reported finished while its batch still ran"
    assert finished == ["b", "a", "c"]


def test_an_interactive_batch_counts_as_running_from_the_moment_it_is_taken():
    """With two slots the worker picks its next batch right after dispatching one; a batch-lane batch must not
    start beside the interactive batch it just dispatched (nor skip the hold-off after it)."""
    entered, gate, predict = _gated_predict()

    async def main():
        cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, concurrency=2, batch_holdoff_s=0,
                             batch_max_wait_s=DELAY_NEVER_WAITED_S)
        b = DynamicBatcher(predict, cfg)
        b.start()
        interactive = b.submit(1)
        job = b.submit(2, priority=Priority.BATCH)
        await asyncio.to_thread(entered.wait, HANG_S)  # the interactive batch is inside predict
        queued_beside_it = b.queue_depth
        gate.set()
        results = await asyncio.gather(interactive, job)
        await b.stop()
        return queued_beside_it, [r.value for r in results]

    queued_beside_it, values = run(main())
    assert queued_beside_it == 1, "the batch-lane item was taken while the interactive batch ran"
    assert values == [2, 4]


def test_a_stop_whose_caller_is_cancelled_still_delivers_every_queued_result():
    """A stop() cancelled while it drained (ModelManager.stop cancelled during a shutdown cancels the retirements it
    awaits) cancelled the worker with it: the batch running and the item queued never got a result, and their
    callers waited forever."""
    async def main():
        entered, gate, predict = _gated_predict()
        b = DynamicBatcher(predict, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        first = b.submit(1)
        assert await asyncio.to_thread(entered.wait, HANG_S)
        queued = b.submit(2)
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0)  # the stop now awaits the worker
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        gate.set()
        results = await asyncio.gather(first, queued)
        await b.stop()  # a later stop finds it ended
        return [r.value for r in results], b._worker, b._executor

    assert run(main()) == ([2, 4], None, None)
