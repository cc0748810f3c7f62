"""ModelManager.stop is bounded by ``drain_timeout_s``: a forward pass that never ends is abandoned, not waited for.

The forward pass is held by a gate the test opens at the end; every wait is on that gate or on the stop itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from segsvc.errors import Unavailable
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository
from tests.server.conftest import make_image, publish

GATE_S = 300  # the stuck pass waits this long at most: the test opens its gate at the end, pass or fail
HANG_S = 120  # a stop still running after this is the bug (the drain timeout below is a fraction of a second)


@pytest.fixture
def stuck(monkeypatch):
    """``Engine.run`` enters ``entered`` and then waits for ``gate``: a forward pass that does not end."""
    entered, gate = threading.Event(), threading.Event()
    run = Engine.run

    def stuck_run(self, jobs):  # type: ignore[no-untyped-def]
        entered.set()
        gate.wait(GATE_S)
        return run(self, jobs)

    monkeypatch.setattr(Engine, "run", stuck_run)
    yield entered, gate
    gate.set()


@pytest.mark.parametrize("caller_waits", [True, False], ids=["request-still-waiting", "request-cancelled"])
def test_stop_abandons_a_stuck_forward_pass_after_drain_timeout(tmp_path, stuck, caplog, caller_waits):
    """stop() waited for the batch forever: ``drain_timeout_s`` bounded only the wait for leases, then the
    batcher's stop (drain or not) waited for the running batch without limit, and so did server shutdown."""
    entered, gate = stuck
    publish(tmp_path, "m", seed=1)
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False),
                           batching=BatchingConfig(max_batch_size=1, max_delay_s=0), drain_timeout_s=0.2)

    async def main() -> tuple[list[str], list[object]]:
        manager = ModelManager(ModelRepository(tmp_path), config)
        await manager.start()

        async def request() -> object:
            with manager.lease("m", None) as lm:  # held for the whole request, as the service holds it
                first = lm.batcher.submit(lm.engine.prepare(make_image(16, 16), InferenceOptions()))
                queued = lm.batcher.submit(lm.engine.prepare(make_image(16, 16, seed=1), InferenceOptions()))
                return await asyncio.gather(first, queued, return_exceptions=True)

        task = asyncio.ensure_future(request())
        assert await asyncio.to_thread(entered.wait, GATE_S), "the forward pass never started"
        if not caller_waits:  # the server's stop cancels the handlers before it stops the manager
            task.cancel()
        try:
            abandoned = await asyncio.wait_for(manager.stop(), HANG_S)
        finally:
            gate.set()
        outcome = await asyncio.gather(task, return_exceptions=True)
        return abandoned, outcome

    with caplog.at_level(logging.ERROR, logger="segsvc.inference.manager"):
        abandoned, outcome = asyncio.run(main())
    assert abandoned == ["m:1"]
    assert any("still busy after drain_timeout_s=0.2 s" in r.getMessage() and "m:1" in r.getMessage()
               for r in caplog.records)
    if caller_waits:  # the request queued behind the stuck pass was failed, not left waiting
        assert isinstance(outcome[0][1], Unavailable)
    else:
        assert isinstance(outcome[0], asyncio.CancelledError)


def test_stop_still_waits_for_a_forward_pass_that_ends_within_drain_timeout(tmp_path, stuck):
    """The bound gives up only on what outlasts it: a batch that ends in time delivers its result."""
    entered, gate = stuck
    publish(tmp_path, "m", seed=1)
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False),
                           batching=BatchingConfig(max_batch_size=1, max_delay_s=0), drain_timeout_s=HANG_S)

    async def main() -> tuple[list[str], object]:
        manager = ModelManager(ModelRepository(tmp_path), config)
        await manager.start()
        lm = manager.resolve("m", None)
        result = lm.batcher.submit(lm.engine.prepare(make_image(16, 16), InferenceOptions()))
        assert await asyncio.to_thread(entered.wait, GATE_S), "the forward pass never started"
        stopping = asyncio.ensure_future(manager.stop())
        await asyncio.sleep(0)  # the stop has begun waiting for the retirement
        gate.set()
        return await stopping, await result

    abandoned, result = asyncio.run(main())
    assert abandoned == [] and result.value.labels.shape == (16, 16)
