"""A small model manager for the manager tests: CPU, no warm-up, tiny batches, no poller (tests call ``poll_once``)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import EngineConfig
from segsvc.inference.manager import ManagerConfig, ModelManager
from segsvc.inference.repository import ModelRepository


def quiet_manager(root) -> ModelManager:  # type: ignore[no-untyped-def]
    config = ManagerConfig(engine=EngineConfig(device="cpu", warmup=False),
                           batching=BatchingConfig(max_batch_size=2, max_delay_s=0.001), poll_interval_s=0)
    return ModelManager(ModelRepository(root), config)


def with_manager(root, check: Callable[[ModelManager], Awaitable[None]],  # type: ignore[no-untyped-def]
                 make: Callable[..., ModelManager] | None = None) -> None:
    """Run ``check`` against a started manager of the repository at ``root`` (``make(root)``, by default
    ``quiet_manager``); it is stopped after."""
    async def main() -> None:
        manager = (make or quiet_manager)(root)
        await manager.start()
        try:
            await check(manager)
        finally:
            await manager.stop()

    asyncio.run(main())
