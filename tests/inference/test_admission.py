"""Admission by cost: estimates, per-request limits, the memory budget, abandoned work stopping."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segsvc.errors import Cancelled, DeadlineExceeded, ImageTooLarge, InvalidArgument, Overloaded
from segsvc.inference.admission import MIB, AdmissionConfig, MemoryBudget, estimate
from segsvc.inference.contract import scaled_size
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions
from segsvc.inference.predictor import Predictor
from segsvc.inference.tiling import make_logits_fn
from tests.server.conftest import publish, reference


def _cost(h, w, **kw):
    args = dict(tile_size=0, tile_overlap=0.25, flip_tta=False, stride=32, min_size=1, num_classes=3,
                bytes_per_pixel=1000.0)
    return estimate(h, w, **{**args, **kw})


def test_padding_is_counted_so_a_one_pixel_high_strip_costs_more_than_a_square():
    strip, square = _cost(1, 262144), _cost(512, 512)
    assert strip.pixels == 32 * 262144 and square.pixels == 512 * 512
    assert strip.peak_bytes > 20 * square.peak_bytes
    assert (strip.passes, strip.tiles) == (1, 1)


def test_tiles_and_flips_multiply_the_passes():
    cost = _cost(96, 96, tile_size=32, tile_overlap=0.5, flip_tta=True)
    assert cost.tiles == 25 and cost.passes == 50 and cost.pixels == 32 * 32
    assert cost.work_pixels == 50 * 32 * 32


def test_the_overlap_is_capped_so_tiles_cannot_degenerate_to_a_one_pixel_stride():
    with pytest.raises(InvalidArgument, match=r"tile_overlap must be a fraction in \[0, 0.75\]"):
        InferenceOptions(tile_size=16, tile_overlap=0.9999)
    assert InferenceOptions(tile_size=16, tile_overlap=0.75).tile_overlap == 0.75


@pytest.mark.parametrize("cost_kw, limits, words", [
    (dict(h=2048, w=2048, tile_size=16, tile_overlap=0.75), dict(max_tiles=1024), "tiles, over the limit of 1024"),
    (dict(h=1, w=262144), dict(max_pixels=4_000_000), "once padded to the model's stride"),
    (dict(h=512, w=512, tile_size=64, tile_overlap=0.75, flip_tta=True), dict(max_work_pixels=1_000_000), "passes"),
    (dict(h=1, w=262144), dict(max_inflight_mb=1024), "MiB, over the server's budget of 1024 MiB"),
])
def test_requests_over_a_per_request_limit_are_refused_by_name(cost_kw, limits, words):
    h, w = cost_kw.pop("h"), cost_kw.pop("w")
    config = AdmissionConfig(**limits)
    with pytest.raises(ImageTooLarge, match=words):
        config.check(_cost(h, w, **cost_kw), h, w)
    config.check(_cost(512, 512), 512, 512)  # the same pixel count, square, passes


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))  # a hang fails; a loaded host cannot trip it


def test_memory_budget_queues_in_order_and_releases():
    async def main():
        budget = MemoryBudget(100, max_waiting=8)
        order = []

        async def user(name, nbytes, hold_s):
            async with budget.hold(nbytes):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(user("a", 60, 0.05))
        await asyncio.sleep(0)
        big = asyncio.create_task(user("big", 80, 0))  # waits for a
        await asyncio.sleep(0)
        small = asyncio.create_task(user("small", 10, 0))  # fits now, but must not overtake big
        await asyncio.gather(first, big, small)
        return order, budget.used_bytes

    order, used = run(main())
    assert order == ["a", "big", "small"] and used == 0


def test_memory_budget_wait_ends_at_the_deadline_and_gives_nothing_away():
    async def main():
        budget = MemoryBudget(100, max_waiting=8)
        loop = asyncio.get_running_loop()
        async with budget.hold(90):
            with pytest.raises(DeadlineExceeded, match="waiting for memory"):
                async with budget.hold(50, deadline=loop.time() + 0.05):
                    pass
            assert budget.used_bytes == 90
        cancelled = asyncio.create_task(_hold_forever(budget))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        return budget.used_bytes

    assert run(main()) == 0


async def _hold_forever(budget: MemoryBudget) -> None:
    async with budget.hold(100):
        await asyncio.sleep(60)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("repo")
    predictor: Predictor = reference(publish(root, "m", seed=3))
    engine = Engine(predictor, EngineConfig(device="cpu", warmup=False))
    engine.measure_memory()
    return engine


def test_bytes_per_pixel_is_measured_and_drives_the_estimate(engine):
    assert engine.bytes_per_pixel > 12  # more than the float32 RGB input itself
    small = engine.cost(64, 64, InferenceOptions())
    large = engine.cost(256, 256, InferenceOptions())
    assert 12 <= large.peak_bytes / small.peak_bytes <= 20  # ~16x the pixels


def test_an_abandoned_tiled_batch_stops_between_passes(engine, monkeypatch):
    image = np.zeros((256, 256, 3), np.uint8)
    prepared = engine.prepare(image, InferenceOptions(tile_size=32, tile_overlap=0.5))
    assert prepared.cost.tiles == 225
    calls = []
    original = engine.forward

    def forward(batch):
        calls.append(batch.shape[0])
        if len(calls) == 2:
            prepared.abandon.set()  # the caller's deadline passed during the second pass
        return original(batch)

    monkeypatch.setattr(engine, "forward", forward)
    with pytest.raises(Cancelled, match="abandoned"):
        engine.run([prepared])
    assert len(calls) == 2, f"{len(calls)} passes ran after the request was abandoned"


def test_a_batch_with_one_caller_left_keeps_running(engine):
    image = np.zeros((64, 64, 3), np.uint8)
    a, b = (engine.prepare(image, InferenceOptions(tile_size=32, tile_overlap=0.5)) for _ in range(2))
    a.abandon.set()
    outputs = engine.run([a, b])
    assert len(outputs) == 2 and outputs[1].labels.shape == (64, 64)



async def _hold_once(budget: MemoryBudget, nbytes: int, lane: object = None) -> None:
    async with budget.hold(nbytes, lane=lane):
        pass


def test_memory_budget_wait_line_is_bounded_per_lane_and_refuses_with_overloaded():
    async def main():
        budget = MemoryBudget(100, max_waiting=2)
        async with budget.hold(100):
            waiting = [asyncio.create_task(_hold_once(budget, 10)) for _ in range(2)]
            await asyncio.sleep(0)  # both are in the wait line
            with pytest.raises(Overloaded, match="2 requests are already waiting"):
                await budget.acquire(10)
            other_lane = asyncio.create_task(_hold_once(budget, 10, lane="batch"))  # its own bound
            await asyncio.sleep(0)
            assert not other_lane.done()
        await asyncio.gather(*waiting, other_lane)
        granted = await budget.acquire(10)  # room again
        granted.release()
        granted.release()  # a second release gives nothing back twice
        return budget.used_bytes

    assert run(main()) == 0


def test_multi_scale_tiles_are_counted_as_the_engine_rounds_each_size():
    """The engine resizes the image by the manifest's scale, then that size by each TTA factor (rounding twice)."""
    h, w, scale, factors = 89, 31, 0.5, (0.75, 1.3)
    cost = _cost(h, w, tile_size=16, tile_overlap=0.75, stride=1, scale=scale, tta_scales=factors)
    passes: list[torch.Size] = []

    def logits(x: torch.Tensor) -> torch.Tensor:
        passes.append(x.shape)
        return x[:, :3]

    make_logits_fn(logits, tile=(16, 16), overlap=0.75, scales=factors)(torch.zeros(1, 3, *scaled_size(h, w, scale)))
    assert cost.tiles == sum(p[0] for p in passes)
    assert cost.work_pixels >= sum(p[0] * p[2] * p[3] for p in passes)


def test_a_pass_over_the_pixel_limit_because_of_the_model_s_scale_says_so():
    config = AdmissionConfig(max_pixels=64_000_000)
    with pytest.raises(ImageTooLarge, match=r"2100x2100 image is 70560000 pixels once resized by 4 .*and padded"):
        config.check(_cost(2100, 2100, stride=4, scale=4.0), 2100, 2100)


PEAK_IN_FRESH_PROCESS = """
import resource, sys, torch
from segsvc.inference.admission import estimate
from segsvc.inference.tiling import make_logits_fn
side, classes, tile, flip = 1024, 16, int(sys.argv[1]), sys.argv[2] == "flip"
torch.set_num_threads(1)
fn = make_logits_fn(lambda x: x[:, :1].expand(-1, classes, -1, -1) + 1.0,  # a network holding only its logits
                    tile=(tile, tile) if tile else None, overlap=0.25, hflip=flip)
fn(torch.rand(1, 3, 64, 64))
x = torch.rand(1, 3, side, side)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn(x)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
cost = estimate(side, side, tile_size=tile, tile_overlap=0.25, flip_tta=flip, stride=1, min_size=1,
                num_classes=classes, bytes_per_pixel=4 * classes + 12)
print(grown, cost.peak_bytes)
"""


@pytest.mark.parametrize("tile, flip", [(256, "flip"), (0, "flip"), (256, "plain")])
def test_the_estimate_covers_the_logits_a_flipped_or_tiled_image_holds_at_its_peak(tile, flip):
    """Peak RSS of a fresh process within the estimate. glibc maps every block over 64 KiB (a 16-class logit
    map is 64 MiB) and unmaps it when freed, so the peak is what was alive at once, the same on every run.
    Flip TTA held four logit maps at its end (the plain pass, the mirrored one, its flip and their sum) and
    tiles two (the sum of the tiles and its division by their weights), one more than the estimate counts."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK_IN_FRESH_PROCESS, str(tile), flip], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[2], env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, estimated = map(int, out.stdout.split()[-2:])
    assert grown <= estimated, f"{grown / MIB:.0f} MiB at the peak, {estimated / MIB:.0f} MiB estimated"
