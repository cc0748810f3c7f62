"""Per-version statistics: what the core records for every image and batch, and the accumulator itself."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from segsvc.errors import InvalidImage
from segsvc.inference.admission import AdmissionConfig
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import EngineConfig
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.inference.service import EncodedImage, InferenceService, RawPixels
from segsvc.inference.statistics import BatchStatistics, Duration, VersionStatistics
from tests.server.conftest import encode, make_image, publish


def test_durations_add_up_and_a_snapshot_does_not_change_later():
    stats = VersionStatistics()
    stats.succeeded(total_s=0.5, prepare_s=0.1, queue_s=0.2, infer_s=0.15, output_s=0.05)
    first = stats.snapshot()
    stats.succeeded(total_s=0.25, prepare_s=0.05, queue_s=-1e-9, infer_s=0.1, output_s=0.05)  # clock jitter
    stats.failed(0.01)
    stats.executed(batch_size=2, infer_s=0.1, output_s=0.05)
    stats.executed(batch_size=2, infer_s=0.3, output_s=0.01)
    stats.executed(batch_size=1, infer_s=0.2, output_s=0.02)
    snap = stats.snapshot()
    assert first.inference_count == 1 and first.success == Duration(1, 500_000_000) and first.batches == {}
    assert snap.inference_count == 2 and snap.execution_count == 3
    assert snap.success == Duration(2, 750_000_000) and snap.fail == Duration(1, 10_000_000)
    assert snap.queue == Duration(2, 200_000_000)  # a negative duration counts as zero
    assert (snap.compute_input, snap.compute_infer, snap.compute_output) == (
        Duration(2, 150_000_000), Duration(2, 250_000_000), Duration(2, 100_000_000))
    assert snap.batches == {2: BatchStatistics(Duration(2, 400_000_000), Duration(2, 60_000_000)),
                            1: BatchStatistics(Duration(1, 200_000_000), Duration(1, 20_000_000))}
    assert snap.last_inference_ms >= first.last_inference_ms > 0


def test_records_from_many_threads_are_all_kept():
    stats = VersionStatistics()
    start = threading.Barrier(4)

    def record(_: int) -> None:
        start.wait()
        for _ in range(2000):
            stats.succeeded(total_s=1e-6, prepare_s=0, queue_s=0, infer_s=0, output_s=0)
            stats.executed(batch_size=1, infer_s=1e-6, output_s=0)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(record, range(4)))
    snap = stats.snapshot()
    assert snap.inference_count == snap.success.count == snap.execution_count == 8000
    assert snap.batches[1].compute_infer == Duration(8000, 8000 * 1000)


def test_the_service_records_each_image_and_each_batch_of_the_version_that_ran_it(tmp_path):
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False), poll_interval_s=0,
                           batching=BatchingConfig(max_batch_size=4, max_delay_s=0.05))
    image = make_image(24, 32, seed=3)
    corrupt = encode(image)[:60]  # the header reads, the pixels do not

    async def main():  # type: ignore[no-untyped-def]
        manager = ModelManager(ModelRepository(tmp_path), config)
        await manager.start()
        await manager.load("m", 1)
        io = ThreadPoolExecutor(2)
        service = InferenceService(manager, io, AdmissionConfig())
        try:
            pixels = RawPixels(image.tobytes(), list(image.shape))
            await asyncio.gather(*(service.segment(pixels, model="m", version=2) for _ in range(3)))
            await service.segment(EncodedImage(encode(image)), model="m", version=1)
            with pytest.raises(InvalidImage):
                await service.segment(EncodedImage(corrupt), model="m", version=2)
            return {lm.version: lm.stats.snapshot() for lm in manager.loaded("m")}
        finally:
            await manager.stop()
            io.shutdown()

    stats = asyncio.run(main())
    two, one = stats[2], stats[1]
    assert (two.inference_count, two.success.count, two.fail.count) == (3, 3, 1)
    assert (one.inference_count, one.success.count, one.fail.count) == (1, 1, 0)
    for snap in (two, one):
        stages = (snap.queue, snap.compute_input, snap.compute_infer, snap.compute_output)
        assert {d.count for d in stages} == {snap.success.count}
        assert snap.compute_input.ns > 0 and snap.compute_infer.ns > 0 and snap.compute_output.ns > 0
        assert snap.success.ns >= sum(d.ns for d in stages)
        assert snap.execution_count == sum(b.compute_infer.count for b in snap.batches.values())
        assert sum(size * b.compute_infer.count for size, b in snap.batches.items()) == snap.inference_count
    assert 1 <= two.execution_count <= 3 and one.batches == {1: one.batches[1]}
