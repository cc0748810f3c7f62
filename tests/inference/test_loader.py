"""VersionLoader: each loaded version's batcher gets the memory budget as pixels, by its own bytes per pixel."""

from __future__ import annotations

import asyncio

import torch

from segsvc.config import ModelSpec
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import EngineConfig
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import save_artifact
from segsvc.models.registry import build_model
from tests.server.conftest import publish

BUDGET = 64 << 20


def test_a_memory_budget_gives_wider_models_fewer_pixels_per_batch(tmp_path):
    publish(tmp_path, "narrow", seed=1)  # U-Net base 4, depth 2
    spec = ModelSpec("unet", 3, params={"base_channels": 16, "depth": 2})
    torch.manual_seed(0)
    save_artifact(build_model(spec), tmp_path, "wide", spec=spec, class_names=["a", "b", "c"])
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False), poll_interval_s=0,
                           batching=BatchingConfig(max_batch_size=8, max_batch_bytes=BUDGET))

    async def main() -> dict[str, tuple[float, int | None, int | None]]:
        manager = ModelManager(ModelRepository(tmp_path), config)
        await manager.start()
        try:
            loaded = {name: manager.resolve(name, None) for name in ("narrow", "wide")}
            return {name: (lm.engine.bytes_per_pixel, lm.batcher.config.max_batch_pixels,
                           lm.batcher.config.max_batch_bytes) for name, lm in loaded.items()}
        finally:
            await manager.stop()

    budgets = asyncio.run(main())
    for bytes_per_pixel, pixels, unresolved in budgets.values():
        assert unresolved is None and pixels == int(BUDGET // bytes_per_pixel)
    assert budgets["wide"][0] > budgets["narrow"][0]
    assert budgets["wide"][1] < budgets["narrow"][1]


def test_a_pixel_budget_tighter_than_the_memory_budget_stays(tmp_path):
    publish(tmp_path, "m", seed=2)
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False), poll_interval_s=0,
                           batching=BatchingConfig(max_batch_size=8, max_batch_bytes=BUDGET, max_batch_pixels=100))

    async def main() -> int | None:
        manager = ModelManager(ModelRepository(tmp_path), config)
        await manager.start()
        try:
            return manager.resolve("m", None).batcher.config.max_batch_pixels
        finally:
            await manager.stop()

    assert asyncio.run(main()) == 100
