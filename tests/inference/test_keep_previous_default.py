"""The outgoing default stays loaded when a new version becomes the default.

An MLOps tester's report: a promotion (DEFAULT written by a training job, SetDefaultVersion, or a newer version
with no DEFAULT pin) unloaded the previous default at once, so clients that name its version (``version=1``)
failed ("version 1 is not loaded") and a rollback had to load it again. The current and the previous default are
kept per model; older automatic versions go as before; ``unload`` of the previous default still unloads it (and
stays in effect), and a previous default whose folder left the repository is still unloaded by the poll. Every
test calls ``poll_once`` itself (the poller is off) and waits only on the loop's own tasks.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from segsvc.errors import UnknownVersion
from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from tests.inference.managers import with_manager
from tests.server.conftest import publish


async def _settled(manager: ModelManager) -> list[int]:
    """The loaded versions of ``m`` once every retirement started so far is done."""
    await asyncio.gather(*manager._retiring)
    return sorted(manager._models.get("m") or {})


def _serves(manager: ModelManager, version: int) -> None:
    """A client naming ``version`` is served by it."""
    with manager.lease("m", version) as lm:
        assert lm.version == version


def test_a_promotion_written_to_default_keeps_the_outgoing_default_for_pinned_clients(tmp_path):
    """The report: DEFAULT moved 1 -> 2 by a training job; version 1 was unloaded and pinned clients failed."""
    publish(tmp_path, "m", seed=1)
    repo = ModelRepository(tmp_path)

    async def check(manager: ModelManager) -> None:
        assert manager.default_version("m") == 1
        publish(tmp_path, "m", seed=2)
        repo.set_default("m", 2)  # the promotion, as a training job writes it
        await manager.poll_once()
        assert manager.default_version("m") == 2 and await _settled(manager) == [1, 2]
        _serves(manager, 1)  # the pinned client goes on
        repo.set_default("m", 1)  # an instant rollback: nothing to load
        assert await manager.refresh_default("m") == 1
        assert await _settled(manager) == [1, 2]
        repo.set_default("m", 2)
        assert await manager.refresh_default("m") == 2
        publish(tmp_path, "m", seed=3)
        repo.set_default("m", 3)  # promoted again: 2 is the previous default, 1 is older and goes
        await manager.poll_once()
        assert manager.default_version("m") == 3 and await _settled(manager) == [2, 3]
        _serves(manager, 2)
        with pytest.raises(UnknownVersion):
            manager.resolve("m", 1)

    with_manager(tmp_path, check)


def test_a_newer_version_with_no_pointer_keeps_the_one_it_replaces_as_default(tmp_path):
    publish(tmp_path, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        assert await manager.poll_once() == [("m", 2)]
        assert manager.default_version("m") == 2 and await _settled(manager) == [1, 2]
        _serves(manager, 1)
        publish(tmp_path, "m", seed=3)
        assert await manager.poll_once() == [("m", 3)]
        assert manager.default_version("m") == 3 and await _settled(manager) == [2, 3]

    with_manager(tmp_path, check)


def test_a_rollback_keeps_the_version_rolled_back_from_and_the_newest(tmp_path):
    """The report: `models default m:1` (1 loaded) unloaded 2, the version rolled back from, and kept 3, never
    promoted."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    ModelRepository(tmp_path).set_default("m", 1)

    async def check(manager: ModelManager) -> None:
        await manager.set_default("m", 2)  # promoted
        publish(tmp_path, "m", seed=3)  # a candidate the gate turned down: published, not the default
        await manager.poll_once()
        assert manager.default_version("m") == 2 and await _settled(manager) == [1, 2, 3]
        await manager.set_default("m", 1)  # the rollback
        assert manager.default_version("m") == 1 and await _settled(manager) == [1, 2, 3]
        _serves(manager, 2)
        await manager.set_default("m", 3)  # 1 is the previous default now; 2 is older than the newest and goes
        assert manager.default_version("m") == 3 and await _settled(manager) == [1, 3]

    with_manager(tmp_path, check)


def test_unloading_the_previous_default_still_unloads_it_until_load(tmp_path):
    publish(tmp_path, "m", seed=1)
    repo = ModelRepository(tmp_path)

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        repo.set_default("m", 2)
        await manager.poll_once()
        assert await _settled(manager) == [1, 2]
        assert await manager.unload("m", 1) == [1]
        for _ in range(2):
            await manager.poll_once()
        assert await _settled(manager) == [2]
        with pytest.raises(UnknownVersion):
            manager.resolve("m", 1)
        await manager.retain("m", 1, job=True)  # a batch job naming it loads it for itself
        assert await _settled(manager) == [1, 2] and manager.default_version("m") == 2
        manager.release("m", 1, job=True)  # the unload stays in effect: it goes with the job
        assert await _settled(manager) == [2]
        publish(tmp_path, "m", seed=3)
        repo.set_default("m", 3)
        await manager.poll_once()  # 2 is the previous default now
        assert manager.default_version("m") == 3 and await _settled(manager) == [2, 3]
        await manager.load("m")  # LoadModel clears the marks; 1 is not loaded again (it is no default)
        assert await _settled(manager) == [2, 3]

    with_manager(tmp_path, check)


def test_a_previous_default_whose_folder_left_the_repository_is_unloaded_by_the_poll(tmp_path):
    publish(tmp_path, "m", seed=1)
    repo = ModelRepository(tmp_path)

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        repo.set_default("m", 2)
        await manager.poll_once()
        assert await _settled(manager) == [1, 2]
        shutil.rmtree(tmp_path / "m" / "1")
        await manager.poll_once()
        assert await _settled(manager) == [2] and manager.default_version("m") == 2
        assert manager._previous.get("m") is None
        assert await manager.poll_once() == []  # nothing comes back
        assert await _settled(manager) == [2]

    with_manager(tmp_path, check)
