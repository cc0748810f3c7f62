"""SetDefaultVersion loads the version it names when it is not loaded, as a DEFAULT written by hand is followed.

The report: `segsvc models default m-d:1` right after a promotion (version 1 unloaded) failed with "version 1 is
not loaded (loaded: [2]); load it first", while writing DEFAULT by hand loaded 1 and switched within a poll.
A version that does not load is refused with its reason, and the default is left as it was.
"""

from __future__ import annotations

import asyncio

import pytest

from segsvc.errors import ArtifactError, FailedPrecondition, UnknownModel, UnknownVersion
from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import WEIGHTS_FILE
from tests.inference.managers import with_manager
from tests.server.conftest import publish


async def _settled(manager: ModelManager) -> list[int]:
    await asyncio.gather(*manager._retiring)
    return sorted(manager._models.get("m") or {})


def test_set_default_loads_a_version_that_is_not_loaded_then_switches(tmp_path):
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        assert await _settled(manager) == [2]  # only the newest is loaded at start
        await manager.set_default("m", 1)
        assert manager.default_version("m") == 1 and ModelRepository(tmp_path).default_version("m") == 1
        assert await _settled(manager) == [1, 2]
        with manager.lease("m", None) as lm:
            assert lm.version == 1
        assert await manager.poll_once() == []  # the poll agrees: nothing to follow
        assert manager.default_version("m") == 1 and await _settled(manager) == [1, 2]
        assert not manager._holds  # set_default's own hold is gone

    with_manager(tmp_path, check)


def test_set_default_to_a_version_that_does_not_load_is_refused_with_its_reason(tmp_path):
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    (tmp_path / "m" / "1" / WEIGHTS_FILE).write_bytes(b"not safetensors")  # corrupt: the build fails

    async def check(manager: ModelManager) -> None:
        with pytest.raises(ArtifactError, match="m/1/"):
            await manager.set_default("m", 1)
        assert manager.default_version("m") == 2 and await _settled(manager) == [2]
        assert ModelRepository(tmp_path).default_version("m") is None  # nothing written
        assert [(n, v) for n, v, _ in manager.failed_versions()] == [("m", 1)]
        with pytest.raises(UnknownVersion, match="has no version 9"):
            await manager.set_default("m", 9)
        assert manager.default_version("m") == 2 and not manager._holds

    with_manager(tmp_path, check)


def test_set_default_refuses_a_version_unloaded_with_unload_and_a_model_not_loaded(tmp_path):
    """``unload`` stays in effect until ``load``, as for a DEFAULT written by hand naming that version."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        assert await manager.unload("m", 1) == [1]
        with pytest.raises(FailedPrecondition, match="unloaded"):
            await manager.set_default("m", 1)
        assert manager.default_version("m") == 2 and await _settled(manager) == [2]
        assert ModelRepository(tmp_path).default_version("m") is None
        await manager.load("m", 1)  # LoadModel clears the mark
        await manager.set_default("m", 1)
        assert manager.default_version("m") == 1
        await manager.unload("m")
        with pytest.raises(UnknownModel):
            await manager.set_default("m", 2)

    with_manager(tmp_path, check)


def test_set_default_right_after_a_promotion_rolls_back_and_keeps_both(tmp_path):
    """The report's steps: promoted 1 -> 2 by DEFAULT (with the previous default kept), then two promotions
    later a rollback to 1, no longer loaded."""
    publish(tmp_path, "m", seed=1)
    repo = ModelRepository(tmp_path)

    async def check(manager: ModelManager) -> None:
        for seed in (2, 3):
            publish(tmp_path, "m", seed=seed)
            repo.set_default("m", seed)
            await manager.poll_once()
        assert await _settled(manager) == [2, 3]
        await manager.set_default("m", 1)
        assert manager.default_version("m") == 1 and await _settled(manager) == [1, 3]

    with_manager(tmp_path, check)


def test_a_whole_model_unloaded_while_the_version_loads_stays_unloaded(tmp_path):
    """UnloadModel of the model queued before SetDefaultVersion's load of an unloaded version (both waiting for
    the model, a poll's build holding it): the unload ran, then the load put the version back, and the check
    after it (the version now in the table) let it through: the unloaded model served again, with DEFAULT
    written (a reviewer's find). The unload stands and nothing is written."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        assert sorted(manager._models["m"]) == [2]
        lock = manager._locks.setdefault("m", asyncio.Lock())
        await lock.acquire()  # a slow build holds the model
        unload = asyncio.create_task(manager.unload("m"))
        while not lock._waiters:  # type: ignore[attr-defined]  # the unload waits first
            await asyncio.sleep(0)
        set_default = asyncio.create_task(manager.set_default("m", 1))
        while len(lock._waiters) < 2:  # type: ignore[attr-defined]  # then the load of version 1
            await asyncio.sleep(0)
        lock.release()
        assert await unload == [2]
        with pytest.raises(UnknownModel, match="not loaded"):
            await set_default
        await asyncio.gather(*manager._retiring)
        assert not manager._models.get("m") and ModelRepository(tmp_path).default_version("m") is None

    with_manager(tmp_path, check)
