"""From a review of the batcher and the inference service: work nobody waits for is skipped and counted as
dropped, and a caller's cancel always reaches it, even when its result arrives in the same loop iteration.

No test here measures time: each outcome is decided by the order of the test's own steps of the event loop,
and by gates the test opens (HANG_S only turns a hang into a failure).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from segsvc.inference.admission import AdmissionConfig
from segsvc.inference.batcher import BatchingConfig, DynamicBatcher
from segsvc.inference.engine import EngineConfig
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.inference.service import InferenceService, RawPixels
from tests.inference.test_batcher import DELAY_NEVER_WAITED_S, HANG_S, Recorder, run, until
from tests.server.conftest import make_image, publish

STEPS = 50  # event-loop iterations that a task with nothing to wait for surely ends in (it needs one or two)


class Finished:
    """``on_finish`` hooks that count the items whose work has ended; ``await all_of(n)`` waits for ``n``."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def hook(self) -> None:
        self.count += 1
        self._changed.set()

    async def all_of(self, n: int) -> None:
        while self.count < n:
            self._changed.clear()
            await self._changed.wait()


async def _taken_then_cancelled(cancel: list[int]) -> tuple[Recorder, list, object]:
    """Items 1 and 2 taken as one batch while the executor's only thread is busy; the items in ``cancel``
    are cancelled before the thread reaches the batch."""
    rec = Recorder()
    executor = ThreadPoolExecutor(1)
    busy = threading.Event()
    finished = Finished()
    b = DynamicBatcher(rec, BatchingConfig(max_batch_size=2, max_delay_s=0), executor=executor)
    b.start()
    try:
        blocker = asyncio.get_running_loop().run_in_executor(executor, busy.wait, HANG_S)
        futures = [b.submit(i, on_finish=finished.hook) for i in (1, 2)]
        await until(lambda: b.queue_depth == 0)  # taken off the queue: the batch waits for the thread
        for i in cancel:
            futures[i - 1].cancel()
        busy.set()
        await blocker
        await finished.all_of(2)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await b.stop()
    finally:
        executor.shutdown()
    return rec, outcomes, b.stats


def test_a_batch_whose_callers_all_left_before_it_started_runs_nothing():
    rec, outcomes, stats = run(_taken_then_cancelled([1, 2]))
    assert rec.batches == []  # predict never ran for it
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert (stats.batches, stats.items, stats.dropped) == (0, 0, 2)


def test_an_item_whose_caller_left_before_its_batch_started_is_left_out_of_it():
    rec, (gone, kept), stats = run(_taken_then_cancelled([1]))
    assert rec.batches == [[2]]
    assert isinstance(gone, asyncio.CancelledError)
    assert (kept.value, kept.batch_size) == (4, 1)
    assert (stats.batches, stats.items, stats.dropped) == (1, 1, 1)


def test_an_item_cancelled_as_the_worker_takes_its_group_is_counted_as_dropped():
    """The cancel's done callback (which drops a queued item) runs after the worker woken by the submit: the
    worker finds the item done in the queue, and that drop was not counted."""

    async def main():
        rec = Recorder()
        finished = Finished()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=1, max_delay_s=0))
        b.start()
        await asyncio.sleep(0)  # the worker waits for work
        future = b.submit(1, on_finish=finished.hook)  # wakes the worker...
        future.cancel()  # ...before the future's done callback runs
        await finished.all_of(1)
        depth = b.queue_depth
        await b.stop()
        return rec.batches, depth, finished.count, b.stats

    batches, depth, finished, stats = run(main())
    assert (batches, depth, finished) == ([], 0, 1)
    assert (stats.batches, stats.items, stats.dropped) == (0, 0, 1)


def test_a_predict_that_returns_no_list_fails_its_batch_and_the_worker_lives_on():
    async def main():
        b = DynamicBatcher(lambda items: iter(items) if items == [0] else items, BatchingConfig(max_batch_size=1))
        b.start()
        failed = await asyncio.gather(b.submit(0), return_exceptions=True)
        later = await b.submit(1)
        await b.stop()
        return failed, later.value

    [failed], later = run(main())
    assert isinstance(failed, TypeError) and later == 1


def test_a_cancel_of_the_worker_that_arrives_with_a_wakeup_stops_it():
    """asyncio.wait_for in Python 3.11 returns the result of a wait that ended in the same loop iteration as a
    cancel, dropping the cancel: the worker lived on (and asyncio.run, which cancels every task at its end,
    waited for it forever)."""

    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, BatchingConfig(max_batch_size=4, max_delay_s=DELAY_NEVER_WAITED_S))
        b.start()
        worker = b._worker
        with b.incoming():  # one more item is announced: the partial batch waits for it
            first = b.submit(1)
            for _ in range(5):  # the worker takes the group and waits for company
                await asyncio.sleep(0)
            second = b.submit(2)  # wakes the worker...
            worker.cancel()  # ...in the same iteration as its cancel
            for _ in range(STEPS):  # nothing but the loop's own steps: the worker ends in one of them
                if worker.done():
                    break
                await asyncio.sleep(0)
        outcome = "cancelled" if worker.cancelled() else "ran on"
        b._fail_all(RuntimeError("test over"))  # the worker is gone: fail what it left queued
        await asyncio.gather(first, second, return_exceptions=True)
        return outcome, rec.batches

    assert run(main()) == ("cancelled", [])


def test_a_caller_cancelled_as_its_result_arrives_is_cancelled(tmp_path):
    """The batch delivers the result and (from the on_batch hook, in the same loop iteration) the caller is
    cancelled: asyncio.wait_for in Python 3.11 returned the result, and the cancelled call went on."""
    publish(tmp_path, "m", seed=1)
    image = make_image(32, 32)
    caller: list[asyncio.Task] = []

    def cancel_the_caller(_model: str, _version: int, _size: int, _run_s: float) -> None:
        caller[0].cancel()

    async def main():
        config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False),
                               batching=BatchingConfig(max_batch_size=1, max_delay_s=0))
        manager = ModelManager(ModelRepository(tmp_path), config, on_batch=cancel_the_caller)
        await manager.start()
        io = ThreadPoolExecutor(1)
        try:
            service = InferenceService(manager, io, AdmissionConfig())
            deadline = asyncio.get_running_loop().time() + DELAY_NEVER_WAITED_S
            caller.append(asyncio.create_task(service.segment(RawPixels(image.tobytes(), image.shape), model="m",
                                                              deadline=deadline)))
            (outcome,) = await asyncio.gather(caller[0], return_exceptions=True)
            with manager.lease("m", None) as lm:
                stats = lm.stats.snapshot()
            return outcome, stats, service.budget.used_bytes
        finally:
            await manager.stop()
            io.shutdown()

    outcome, stats, used = run(main())
    assert isinstance(outcome, asyncio.CancelledError), f"the cancelled call returned a {type(outcome).__name__}"
    assert (stats.success.count, stats.fail.count, used) == (0, 1, 0)
