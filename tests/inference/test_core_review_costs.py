"""From a review of the inference core: what admission computes before any work is bounded itself, and the
memory budget's wait line keeps the batchers' lanes.

No test here sleeps or measures time: memory is counted with tracemalloc or a fresh process's peak RSS, and
the wait line's order is decided by the test's own steps of the event loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from segsvc.errors import ImageTooLarge
from segsvc.inference.admission import MIB, AdmissionConfig, MemoryBudget, estimate
from segsvc.inference.batcher import Priority
from segsvc.inference.tiling import overlap_tile_layout, tile_starts


def traced_peak(fn):  # type: ignore[no-untyped-def]
    """``fn()``'s result and the most Python memory it held at once."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))  # a hang fails; a loaded host never comes near it


# -- counting tiles costs nothing per tile --------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_counting_the_tiles_of_a_declared_size_lists_none_of_them(padding):
    """A PNG header of 1 x 64 000 000 pixels (a few dozen bytes) asking for 16-pixel tiles at overlap 0.75 means
    16 million tiles. The estimate, run on the event loop before ``max_tiles`` refuses the request, listed every
    tile offset to count them: about 600 MB and seconds of a stalled server per such request. It counts them."""
    width = 4_000_000  # a million tiles: a list shows, and a host that still builds it survives
    cost, peak = traced_peak(lambda: estimate(1, width, tile_size=16, tile_overlap=0.75, flip_tta=True, stride=1,
                                              min_size=1, num_classes=3, bytes_per_pixel=100.0,
                                              tile_padding=padding))
    assert peak < MIB, f"{peak / MIB:.0f} MiB of Python objects held to count the tiles"
    assert cost.tiles == 999_997 if padding == "zero" else cost.tiles == 1_000_000
    with pytest.raises(ImageTooLarge, match="tiles, over the limit of 1024"):
        AdmissionConfig().check(cost, 1, width)


def test_an_overlap_tile_layout_still_lists_its_tiles_where_they_are_cut():
    layout = overlap_tile_layout(100, 61, (32, 24), 0.5, stride=8, min_size=16)
    assert layout.ys == tile_starts(100, 16, 0.0) and layout.xs == tile_starts(61, 12, 0.0)
    assert layout.tiles == len(layout.ys) * len(layout.xs)


# -- the memory budget's wait line keeps the lanes ---------------------------------------------------------
async def _take(budget: MemoryBudget, nbytes: int, lane: object, name: str, order: list[str]) -> None:
    async with budget.hold(nbytes, lane=lane):
        order.append(name)


def test_a_client_waiting_for_memory_is_not_queued_behind_a_batch_job_s_window():
    """A job keeps a window of images in flight; with the budget spent they wait for memory, and the batcher can
    run a client's request ahead of them only once it has its memory. The line was one FIFO for both lanes, so
    the client waited for every job image ahead of it."""
    async def main():  # type: ignore[no-untyped-def]
        budget = MemoryBudget(100, max_waiting=8)
        budget.max_wait_s = 3600.0  # the job has not waited long enough to go first: only the lanes decide
        order: list[str] = []
        running = await budget.acquire(100)  # an image in its forward pass holds every byte
        jobs = [asyncio.create_task(_take(budget, 60, Priority.BATCH, f"job{i}", order)) for i in range(3)]
        await asyncio.sleep(0)  # the job's window is in the line
        client = asyncio.create_task(_take(budget, 60, Priority.INTERACTIVE, "client", order))
        await asyncio.sleep(0)  # so is the client, behind it
        running.release()
        await asyncio.gather(client, *jobs)
        return order, budget.used_bytes

    order, used = run(main())
    assert order == ["client", "job0", "job1", "job2"], f"granted in the order {order}"
    assert used == 0


def test_a_job_waiting_for_memory_goes_first_once_it_waited_max_wait_s():
    """Under continuous interactive demand a job still advances: one of its images at most every ``max_wait_s``
    (the batchers' ``batch_max_wait_s``), read on the budget's clock when memory is handed out."""
    async def main():  # type: ignore[no-untyped-def]
        now = [0.0]
        budget = MemoryBudget(100, max_waiting=8, max_wait_s=5.0, clock=lambda: now[0])
        running = await budget.acquire(100)
        jobs = [asyncio.create_task(budget.acquire(100, lane=Priority.BATCH)) for _ in range(2)]
        await asyncio.sleep(0)
        clients = [asyncio.create_task(budget.acquire(100, lane=Priority.INTERACTIVE)) for _ in range(3)]
        await asyncio.sleep(0)
        now[0] = 1.0  # the job has waited 1 s of 5: a client goes first
        running.release()
        held = await clients[0]
        now[0] = 6.0  # 6 s: the job's oldest image goes ahead of the clients still waiting
        held.release()
        held = await jobs[0]
        after_first_job = [c.done() for c in clients]
        now[0] = 7.0  # the next image of the job waits another 5 s, from the last one's grant
        held.release()
        held = await clients[1]
        after_second_client = jobs[1].done()
        for waiting in (clients[2], jobs[1]):
            held.release()
            held = await waiting
        held.release()
        return after_first_job, after_second_client, budget.used_bytes

    after_first_job, after_second_client, used = run(main())
    assert after_first_job == [True, False, False], "the job waited past max_wait_s behind clients"
    assert after_second_client is False, "the job went first again before another max_wait_s"
    assert used == 0


# -- the outputs a request asks for are in its estimate ----------------------------------------------------
PEAK_OF_ONE_REQUEST = """
import resource, sys
from pathlib import Path
import numpy as np, torch
from segsvc.config import InferenceSpec
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions
from segsvc.models.artifact import save_artifact
from tests.server.conftest import reference, tiny_model
root, classes, side, confidence = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "confidence"
torch.set_num_threads(1)
spec, model = tiny_model(0, classes)
version = save_artifact(model, root, "m", spec=spec, inference=InferenceSpec(scale=0.25),
                        class_names=[f"c{i}" for i in range(classes)])
engine = Engine(reference(version), EngineConfig(device="cpu", warmup=False))
engine.measure_memory()
options = InferenceOptions(confidence=confidence)
engine.run([engine.prepare(np.zeros((64, 64, 3), np.uint8), options)])
job = engine.prepare(np.zeros((side, side, 3), np.uint8), options)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
[out] = engine.run([job])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
assert out.labels.dtype == engine.labels_dtype and (out.confidence is not None) == confidence
print(grown, engine.cost(side, side, options).peak_bytes)
"""


@pytest.mark.parametrize("confidence", ["confidence", "labels"])
def test_the_estimate_covers_the_confidence_map_of_a_model_run_at_a_reduced_scale(tmp_path, confidence):
    """Peak RSS of one request in a fresh process, within its estimate (glibc maps every block over 64 KiB and
    unmaps it when freed, so the peak is what was alive at once). A model run at scale 0.25 has small logits in
    the network and one full-size map once they are resized back; confidence takes the softmax of that map, a
    second one, which the estimate left out (uint16 labels for 300 classes, through int32, too): the peak was
    about 1.8x the estimate, so a budget admitted more than it holds."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK_OF_ONE_REQUEST, str(tmp_path), "300", "384", confidence],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2], env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, estimated = map(int, out.stdout.split()[-2:])
    assert grown <= estimated, f"{grown / MIB:.0f} MiB at the peak, {estimated / MIB:.0f} MiB estimated"


def test_through_the_service_a_client_s_image_is_decoded_before_a_waiting_job_image(tmp_path):
    """The same through ``InferenceService``: with the budget spent, a job's image waits first, a client's second;
    when memory frees, the client's image is the first decoded (one I/O thread: decoded in the order granted)."""
    from concurrent.futures import ThreadPoolExecutor

    from segsvc.inference.service import InferenceService
    from tests.inference.test_budget_lifecycle import SpySource, serving
    from tests.server.conftest import make_image, publish

    publish(tmp_path, "m", seed=1)
    order: list[str] = []

    class Named(SpySource):
        def __init__(self, name: str, budget: MemoryBudget) -> None:
            super().__init__(make_image(64, 64), budget)
            self.name = name

        def load(self, max_pixels: int):  # type: ignore[no-untyped-def]
            order.append(self.name)
            return super().load(max_pixels)

    async def main():  # type: ignore[no-untyped-def]
        async with serving(tmp_path) as (manager, _):
            io = ThreadPoolExecutor(1)
            try:
                service = InferenceService(manager, io, AdmissionConfig())
                service.budget.max_wait_s = 3600.0  # the job has not waited long enough to go first
                async with service.budget.hold(service.budget.total_bytes):  # every byte in use
                    job = asyncio.create_task(service.segment(Named("job", service.budget), model="m",
                                                              priority=Priority.BATCH))
                    await asyncio.sleep(0)  # the job's image is in the wait line
                    client = asyncio.create_task(service.segment(Named("client", service.budget), model="m"))
                    await asyncio.sleep(0)  # so is the client's, behind it
                results = await asyncio.gather(client, job)
                return [r.output.labels.shape for r in results], service.budget.used_bytes
            finally:
                io.shutdown()

    shapes, used = run(main())
    assert order == ["client", "job"], f"decoded in the order {order}"
    assert shapes == [(64, 64)] * 2 and used == 0
