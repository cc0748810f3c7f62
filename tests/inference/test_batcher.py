"""DynamicBatcher: plain asyncio with fake predict functions (no models, no grpc)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from segsvc.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from segsvc.inference.batcher import Batched, BatchingConfig, DynamicBatcher, Priority


class Recorder:
    """A predict function that doubles its inputs and records every batch it saw."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.delay_s = delay_s
        self.gate = gate
        self.threads: set[str] = set()

    def __call__(self, items: list) -> list:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append(list(items))
        return [x * 2 if isinstance(x, int) else x for x in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


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
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=4, max_delay_s=5.0))
        b.start()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
        elapsed = time.perf_counter() - t0
        await b.stop()
        return rec, results, elapsed

    rec, results, elapsed = run(main())
    assert [r.value for r in results] == [2 * i for i in range(8)]
    assert [len(x) for x in rec.batches] == [4, 4]
    assert all(isinstance(r, Batched) and r.batch_size == 4 for r in results)
    assert elapsed < 2.0  # full batches never wait for max_delay_s


def test_flushes_a_partial_batch_after_max_delay():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=0.05))
        b.start()
        t0 = time.perf_counter()
        r = await b.submit(21)
        elapsed = time.perf_counter() - t0
        await b.stop()
        return r, elapsed

    r, elapsed = run(main())
    assert r.value == 42 and r.batch_size == 1
    assert 0.04 <= elapsed < 1.0
    assert r.queue_s >= 0.04 and r.run_s >= 0.0


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
        await asyncio.sleep(0.05)  # the worker takes it and blocks on the gate
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
        after = await b.submit(7)
        await b.stop()
        return outcomes, after

    outcomes, after = run(main())
    assert all(isinstance(o, ValueError) and str(o) == "boom" for o in outcomes)
    assert after.value == 7


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
        await asyncio.sleep(0.05)
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
        await asyncio.sleep(0.05)
        late = b.submit(2, deadline=loop.time() + 0.05)
        on_time = b.submit(3, deadline=loop.time() + 30)
        await asyncio.sleep(0.1)  # the deadline of `late` passes while the worker is busy
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
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=2, max_delay_s=1.0))
        b.start()
        futures = [b.submit(i) for i in range(5)]
        await b.stop(drain=True)  # must not wait the 1 s delay: stopping flushes at once
        results = [f.result().value for f in futures]
        with pytest.raises(Unavailable):
            b.submit(9)
        return results

    t0 = time.perf_counter()
    assert run(main()) == [0, 2, 4, 6, 8]
    assert time.perf_counter() - t0 < 1.0


def test_stop_without_drain_fails_queued_items_with_unavailable():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        running = b.submit(1)
        await asyncio.sleep(0.05)
        queued = b.submit(2)
        stopping = asyncio.ensure_future(b.stop(drain=False))
        await asyncio.sleep(0.05)
        gate.set()
        await stopping
        return running.result().value, queued.exception()

    value, exc = run(main())
    assert value == 2
    assert isinstance(exc, Unavailable)


def test_predict_runs_off_the_event_loop():
    async def main():
        rec = Recorder(delay_s=0.3)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        await b.submit(1)
        t.cancel()
        await b.stop()
        return ticks, rec.threads

    ticks, threads = run(main())
    assert ticks >= 10  # the loop kept running while predict slept for 0.3 s
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
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=8, max_delay_s=5.0, max_batch_pixels=100),
                           pixels=lambda item: item)
        b.start()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(b.submit(i) for i in (60, 40, 70, 30, 50, 50)))
        elapsed = time.perf_counter() - t0
        await b.stop()
        return rec, results, elapsed

    rec, results, elapsed = run(main())
    assert [r.value for r in results] == [120, 80, 140, 60, 100, 100]
    assert rec.batches == [[60, 40], [70, 30], [50, 50]]
    assert elapsed < 2.0  # a full budget flushes at once, never waiting for the 5 s delay


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
        while not rec.threads:  # the first batch-lane batch is running (blocked on the gate)
            await asyncio.sleep(0.001)
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
        loop = asyncio.get_running_loop()
        submitted = loop.time()
        job = await b.submit(2, priority=Priority.BATCH)
        waited = loop.time() - submitted
        await b.stop()
        return waited, job

    waited, job = run(main())
    assert waited >= 0.25, f"the batch-lane item ran {waited:.3f} s after an interactive batch"
    assert job.value == 4 and job.queue_s >= 0.25


def test_batch_items_run_after_max_wait_even_under_continuous_interactive_load():
    async def main():
        rec = Recorder(delay_s=0.01)
        cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, batch_holdoff_s=10.0, batch_max_wait_s=0.2)
        b = DynamicBatcher(rec, cfg)
        b.start()
        stop = asyncio.Event()

        async def interactive_client():
            while not stop.is_set():
                await b.submit(1)

        client = asyncio.get_running_loop().create_task(interactive_client())
        while not rec.batches:  # interactive traffic is flowing
            await asyncio.sleep(0.001)
        job = b.submit(7, priority=Priority.BATCH)
        result = await asyncio.wait_for(job, 5)
        stop.set()
        await client
        await b.stop()
        return result

    result = run(main())
    assert result.value == 14
    assert 0.15 <= result.queue_s < 2.0


def test_each_lane_has_its_own_queue_bound():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate=gate)
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0, max_queue_size=2))
        b.start()
        running = b.submit(0)
        while not rec.threads:
            await asyncio.sleep(0.001)
        jobs = [b.submit(i, priority=Priority.BATCH) for i in (1, 2)]
        with pytest.raises(Overloaded):
            b.submit(3, priority=Priority.BATCH)
        interactive = [b.submit(i) for i in (4, 5)]  # the full batch lane does not block these
        with pytest.raises(Overloaded):
            b.submit(6)
        assert b.queue_depth == 4
        gate.set()
        await asyncio.gather(running, *jobs, *interactive)
        await b.stop()
        return rec

    rec = run(main())
    assert [x for batch in rec.batches for x in batch] == [0, 4, 5, 1, 2]


def test_under_continuous_interactive_load_the_batch_lane_gets_one_batch_per_max_wait():
    """Aging bounds the job's share: old batch items do not lift the hold-off for good."""
    async def main():
        rec = Recorder(delay_s=0.005)
        cfg = BatchingConfig(max_batch_size=1, max_delay_s=0, batch_holdoff_s=10.0, batch_max_wait_s=0.2)
        b = DynamicBatcher(rec, cfg)
        b.start()
        stop = asyncio.Event()

        async def interactive_client():
            while not stop.is_set():
                await b.submit(1)

        client = asyncio.get_running_loop().create_task(interactive_client())
        while not rec.batches:
            await asyncio.sleep(0.001)
        jobs = [b.submit(100 + i, priority=Priority.BATCH) for i in range(20)]
        await asyncio.sleep(0.9)
        stop.set()
        await client
        ran = b.stats.batch_lane_items
        for j in jobs:
            j.cancel()
        await b.stop(drain=False)
        return ran

    ran = run(main())
    assert 2 <= ran <= 5, f"{ran} batch-lane batches ran in 0.9 s with batch_max_wait_s=0.2"
