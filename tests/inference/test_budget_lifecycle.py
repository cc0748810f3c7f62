"""A request's share of the memory budget: taken from its header before decoding, held until its work has ended
(not until its caller gives up), and the line of requests waiting for it bounded.

Every wait here is on an event (a gate the test opens, or a step of the event loop), never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest
import torch

from segsvc.config import InferenceSpec
from segsvc.errors import ImageTooLarge, Overloaded
from segsvc.inference.admission import MIB, AdmissionConfig, MemoryBudget
from segsvc.inference.batcher import BatchingConfig, Priority
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.inference.service import ImageFile, InferenceService, RawPixels
from segsvc.models.artifact import save_artifact
from tests.server.conftest import encode, make_image, publish, tiny_model

SIZE = 256
GATE_S = 60  # waits on the test's own gates: an open gate, or one that was entered, ends them at once


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))  # a hang fails instead of blocking the run


@contextlib.asynccontextmanager
async def serving(root: Path, batching: BatchingConfig = BatchingConfig(max_batch_size=1, max_delay_s=0),
                  ) -> AsyncIterator[tuple[ModelManager, ThreadPoolExecutor]]:
    manager = ModelManager(ModelRepository(root), ManagerConfig(engine=EngineConfig(device="cpu", warmup=False),
                                                                batching=batching))
    await manager.start()
    io = ThreadPoolExecutor(2)
    try:
        yield manager, io
    finally:
        await manager.stop()
        io.shutdown()


def one_image_budget(peak: int) -> AdmissionConfig:
    """A server-wide budget that fits one request of ``peak`` bytes, not two."""
    mb = math.ceil(1.5 * peak / MIB)
    assert peak <= mb * MIB < 2 * peak
    return AdmissionConfig(max_inflight_mb=mb)


def raw(image: np.ndarray) -> RawPixels:
    return RawPixels(image.tobytes(), image.shape)


class ForwardGate:
    """Holds an engine's forward passes until ``open`` is set, and counts how many ran at once."""

    def __init__(self, engine: Engine) -> None:
        self.entered, self.open = threading.Event(), threading.Event()
        self.most = 0
        self._now = 0
        self._lock = threading.Lock()
        self._forward = engine.forward
        engine.forward = self  # type: ignore[method-assign]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._now += 1
            self.most = max(self.most, self._now)
        self.entered.set()
        try:
            self.open.wait(GATE_S)
            return self._forward(batch)
        finally:
            with self._lock:
                self._now -= 1


class SpySource:
    """Raw pixels that record the bytes of ``budget`` in use when they are decoded, optionally held at a gate."""

    def __init__(self, image: np.ndarray, budget: MemoryBudget, gated: bool = False) -> None:
        self.image, self.budget = image, budget
        self.held_at_load: int | None = None
        self.entered, self.open = threading.Event(), threading.Event()
        if not gated:
            self.open.set()

    def peek(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def load(self, max_pixels: int) -> np.ndarray:
        self.held_at_load = self.budget.used_bytes
        self.entered.set()
        self.open.wait(GATE_S)
        return self.image.copy()


def test_a_caller_that_gives_up_keeps_its_share_until_its_forward_pass_ends(tmp_path):
    publish(tmp_path, "m", seed=1)
    image = make_image(SIZE, SIZE)

    async def main():  # type: ignore[no-untyped-def]
        async with serving(tmp_path) as (manager, io):
            lm = manager.resolve("m", None)
            peak = lm.engine.cost(SIZE, SIZE, InferenceOptions()).peak_bytes
            service = InferenceService(manager, io, one_image_budget(peak))
            gate = ForwardGate(lm.engine)
            first = asyncio.create_task(service.segment(raw(image), model="m"))
            # its forward pass runs (and cannot be interrupted)
            assert await asyncio.to_thread(gate.entered.wait, GATE_S)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            held_after_cancel = service.budget.used_bytes
            second = asyncio.create_task(service.segment(raw(image), model="m"))
            gate.open.set()
            seg = await second
            return peak, held_after_cancel, gate.most, seg.output.labels.shape, service.budget.used_bytes

    peak, held, most, shape, used = run(main())
    assert held == peak, "the caller that gave up handed back its bytes while its forward pass still ran"
    assert most == 1 and shape == (SIZE, SIZE) and used == 0


def test_an_image_is_decoded_inside_its_share_of_the_budget(tmp_path):
    publish(tmp_path, "m", seed=1)

    async def main():  # type: ignore[no-untyped-def]
        async with serving(tmp_path) as (manager, io):
            peak = manager.resolve("m", None).engine.cost(SIZE, SIZE, InferenceOptions()).peak_bytes
            service = InferenceService(manager, io, AdmissionConfig())
            source = SpySource(make_image(SIZE, SIZE), service.budget)
            await service.segment(source, model="m")
            return peak, source.held_at_load, service.budget.used_bytes

    peak, held_at_load, used = run(main())
    assert held_at_load == peak, "the image was decoded before its share of the budget was taken"
    assert used == 0


def test_a_request_cancelled_while_its_image_decodes_keeps_its_share_until_the_decoder_is_done(tmp_path):
    publish(tmp_path, "m", seed=1)
    image = make_image(SIZE, SIZE)

    async def main():  # type: ignore[no-untyped-def]
        async with serving(tmp_path) as (manager, io):
            peak = manager.resolve("m", None).engine.cost(SIZE, SIZE, InferenceOptions()).peak_bytes
            service = InferenceService(manager, io, one_image_budget(peak))
            slow = SpySource(image, service.budget, gated=True)
            first = asyncio.create_task(service.segment(slow, model="m"))
            assert await asyncio.to_thread(slow.entered.wait, GATE_S)  # an I/O thread decodes it
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            held_after_cancel = service.budget.used_bytes
            after = SpySource(image, service.budget)
            second = asyncio.create_task(service.segment(after, model="m"))
            slow.open.set()  # the decoder finishes; only then does the second request get the budget
            await second
            return peak, held_after_cancel, after.held_at_load, service.budget.used_bytes

    peak, held, second_saw, used = run(main())
    assert held == peak, "the cancelled request handed back its bytes while its image was still being decoded"
    assert second_saw == peak and used == 0


def test_the_line_waiting_for_the_budget_is_bounded_by_the_queue_size_and_has_decoded_nothing(tmp_path):
    publish(tmp_path, "m", seed=1)
    image = make_image(64, 64)

    async def main():  # type: ignore[no-untyped-def]
        async with serving(tmp_path, BatchingConfig(max_batch_size=1, max_delay_s=0, max_queue_size=2)) as (
                manager, io):
            service = InferenceService(manager, io, AdmissionConfig())
            loop = asyncio.get_running_loop()
            async with service.budget.hold(service.budget.total_bytes):  # every byte in use
                spies = [SpySource(image, service.budget) for _ in range(3)]
                waiting = [asyncio.create_task(service.segment(s, model="m")) for s in spies[:2]]
                job = asyncio.create_task(service.segment(spies[2], model="m", priority=Priority.BATCH))
                await asyncio.sleep(0)  # each ran up to the budget's wait line
                with pytest.raises(Overloaded, match="2 requests are already waiting"):
                    await service.segment(raw(image), model="m", deadline=loop.time() + 10)
                decoded_while_waiting = [s.held_at_load for s in spies]
            results = await asyncio.gather(*waiting, job)
            return decoded_while_waiting, [r.output.labels.shape for r in results], service.budget.used_bytes

    decoded, shapes, used = run(main())
    assert decoded == [None, None, None], "requests waiting for the budget had decoded their images"
    assert shapes == [(64, 64)] * 3 and used == 0


def test_a_job_file_is_refused_from_its_header_before_it_is_resized_and_the_error_names_the_scale(tmp_path):
    spec, model = tiny_model(1)
    save_artifact(model, tmp_path / "repo", "x4", spec=spec, inference=InferenceSpec(scale=4.0),
                  class_names=["c0", "c1", "c2"])
    files = tmp_path / "files"
    files.mkdir()
    (files / "big.png").write_bytes(encode(make_image(100, 100)))
    (files / "small.png").write_bytes(encode(make_image(20, 20)))

    async def main():  # type: ignore[no-untyped-def]
        async with serving(tmp_path / "repo") as (manager, io):
            engine = manager.resolve("x4", None).engine
            prepared: list[tuple[int, ...]] = []
            original = engine.prepare
            engine.prepare = lambda image, options: prepared.append(image.shape) or original(image, options)
            service = InferenceService(manager, io, AdmissionConfig(max_pixels=100_000))
            with pytest.raises(ImageTooLarge) as refused:
                await service.segment(ImageFile(files, "big.png", "big.png", 1 << 20), model="x4")
            refused_prepared = list(prepared)
            seg = await service.segment(ImageFile(files, "small.png", "small.png", 1 << 20), model="x4")
            return str(refused.value), refused_prepared, seg.output.labels.shape

    message, refused_prepared, shape = run(main())
    assert refused_prepared == [], "the file was decoded and resized before its cost was checked"
    assert "160000 pixels once resized by 4" in message and "over the limit of 100000" in message
    assert shape == (20, 20)
