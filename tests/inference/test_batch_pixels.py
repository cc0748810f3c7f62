"""``Prepared.pixels`` is what the batcher budgets a batch by: the largest forward pass an item adds to.

Multi-scale TTA runs the image enlarged, the minimum input size pads a small
image up, and sliding windows run up to ``tile_batch`` padded tiles at a time:
counting the prepared tensor's own pixels let a batch's forward pass run 4x
over ``max_batch_pixels`` (what ``max_batch_bytes`` becomes).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from segsvc.config import InferenceSpec
from segsvc.inference.batcher import BatchingConfig, DynamicBatcher
from segsvc.inference.contract import padded_size
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions, Prepared
from segsvc.inference.predictor import Predictor
from segsvc.models.artifact import load_artifact, save_artifact
from tests.inference.test_contract import TINY, calibrated_model, smooth_image

# name: (manifest contract, image (H, W)); the tiny U-Net pads to a stride of 4
CASES = {
    "multi-scale": (InferenceSpec(tta_scales=(1.0, 2.0)), (64, 64)),
    "half-scale-multi-scale": (InferenceSpec(scale=0.5, stride=4, min_input_size=1, tta_scales=(0.5, 1.5)), (70, 50)),
    "flip-min-size": (InferenceSpec(flip_tta=True, stride=4, min_input_size=128), (64, 64)),
    "tiled": (InferenceSpec(tile_size=32, tile_overlap=0.25), (32, 48)),
    "overlap-tiles": (InferenceSpec(tile_size=32, tile_overlap=0.5, tile_padding="reflect"), (32, 48)),
    "tiled-flip-multi-scale": (InferenceSpec(tile_size=32, tile_overlap=0.25, flip_tta=True, tta_scales=(1.0, 1.5)),
                               (40, 40)),
    "plain": (InferenceSpec(), (30, 50)),
    "plain-half-scale": (InferenceSpec(scale=0.5, stride=4, min_input_size=1), (70, 50)),
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Engine]:
    root, model = tmp_path_factory.mktemp("batch-pixels"), calibrated_model()
    out = {}
    for name, (spec, _) in CASES.items():
        loaded, manifest = load_artifact(save_artifact(model, root, name, spec=TINY, inference=spec))
        out[name] = Engine(Predictor(loaded, manifest), EngineConfig(device="cpu", warmup=False))
    return out


def _record_passes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pixels of every forward pass from now on: batch size x the backend's padded size."""
    seen: list[int] = []
    forward = engine.forward

    def recorded(batch: torch.Tensor) -> torch.Tensor:
        ph, pw = padded_size(batch.shape[-2], batch.shape[-1], engine.predictor.stride, engine.predictor.min_size)
        seen.append(batch.shape[0] * ph * pw)
        return forward(batch)

    monkeypatch.setattr(engine, "forward", recorded)
    return seen


def _jobs(engine: Engine, size: tuple[int, int], n: int) -> list[Prepared]:
    return [engine.prepare(smooth_image(*size, seed=i), InferenceOptions()) for i in range(n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_is_the_largest_forward_pass_of_the_item_alone(case, engines, monkeypatch):
    engine, (_, size) = engines[case], CASES[case]
    [job] = _jobs(engine, size, 1)
    seen = _record_passes(engine, monkeypatch)
    engine.run([job])
    assert job.pixels == max(seen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_agrees_with_the_cost_estimate(case, engines):
    engine, (spec, size) = engines[case], CASES[case]
    [job] = _jobs(engine, size, 1)
    cost = engine.cost(*size, InferenceOptions())
    tiles_per_pass = min(engine.predictor.geometry.tile_batch, cost.tiles) if spec.tile_size else 1
    assert job.pixels == cost.pixels * tiles_per_pass


@pytest.mark.parametrize("fit", [1.5, 2.0], ids=["one-fits", "two-fit"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_forward_pass_of_a_batch_exceeds_the_pixel_budget(case, fit, engines, monkeypatch):
    engine, (_, size) = engines[case], CASES[case]
    seen = _record_passes(engine, monkeypatch)
    engine.run(_jobs(engine, size, 1))
    budget = int(fit * max(seen))  # room for the passes of ``fit`` images
    seen.clear()

    async def run_batched() -> list[int]:
        batcher = DynamicBatcher(engine.run, BatchingConfig(max_batch_size=8, max_batch_pixels=budget,
                                                            max_delay_s=0.05),
                                 key=lambda job: job.key, pixels=lambda job: job.pixels)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(job) for job in _jobs(engine, size, 4)))
        finally:
            await batcher.stop()
        return [r.batch_size for r in results]

    sizes = asyncio.run(run_batched())
    assert max(seen) <= budget, f"a forward pass of {max(seen)} pixels, over the budget of {budget}"
    assert max(sizes) == int(fit), "as many images as fit the budget share a batch"


def test_plain_requests_still_count_their_padded_size(engines):
    [job] = _jobs(engines["plain"], (30, 50), 1)
    assert job.key[0] == "padded" and job.pixels == 32 * 52 == np.prod(job.key[1:3])
