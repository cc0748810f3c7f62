"""UnloadModel in the manager: it finishes even when the call is cancelled, and the poller does not undo it."""

from __future__ import annotations

import asyncio
from typing import Callable

import pytest

from segsvc.errors import FailedPrecondition, UnknownVersion
from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from tests.inference.managers import with_manager
from tests.server.conftest import publish


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (it depends on loop steps only, never on time)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def test_an_unload_cancelled_while_draining_still_stops_the_version(tmp_path):
    """UnloadModel cancelled (a client deadline) while a request still held the version: the version had left
    the table, but its batcher (worker task, executor thread, engine) was never stopped, not even by stop()."""
    publish(tmp_path, "m", seed=1)
    stopped = []

    async def check(manager: ModelManager) -> None:
        lm = manager.resolve("m", None)
        lm.acquire()  # a request in flight
        unload = asyncio.ensure_future(manager.unload("m"))
        await _until(lambda: not manager._models)  # gone from the table, now draining
        unload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await unload
        lm.release()  # the request finishes
        await manager.stop()
        stopped.append((lm.batcher.running, lm.batcher._worker))

    with_manager(tmp_path, check)
    assert stopped == [(False, None)]  # stop() waited for the retirement the cancelled unload began


def test_the_poller_does_not_load_an_unloaded_model_again_until_it_is_loaded(tmp_path):
    """A whole model unloaded came back at the next poll."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        assert await manager.unload("m") == [2]
        publish(tmp_path, "m", seed=3)  # not even a new version brings it back
        assert await manager.poll_once() == [] and "m" not in manager._models
        with pytest.raises(UnknownVersion):  # a LoadModel that fails leaves the mark (it was cleared first)
            await manager.load("m", 99)
        assert await manager.poll_once() == [] and "m" not in manager._models
        await manager.load("m")  # LoadModel clears the mark
        assert sorted(manager._models["m"]) == [3]
        publish(tmp_path, "m", seed=4)
        assert await manager.poll_once() == [("m", 4)]

    with_manager(tmp_path, check)


def test_unloading_the_newest_version_to_roll_back_is_not_undone_by_the_poller(tmp_path):
    """LoadModel(m, 1) then UnloadModel(m, 2): the next poll loaded 2 again and served it by default."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        assert await manager.unload("m", 2) == [2]
        assert await manager.poll_once() == []
        assert sorted(manager._models["m"]) == [1] and manager.default_version("m") == 1
        publish(tmp_path, "m", seed=3)  # a newer version still loads: only version 2 was unloaded
        assert await manager.poll_once() == [("m", 3)]
        assert 2 not in manager._models["m"]
        await manager.load("m", 2)  # loading it again clears the mark
        assert sorted(manager._models["m"]) == [1, 2, 3]

    with_manager(tmp_path, check)


def test_the_version_the_default_pointer_names_is_unloaded_only_with_the_whole_model(tmp_path):
    """UnloadModel(m, 1) with DEFAULT = 1 and a (gate-rejected) version 2 loaded sent requests without a version
    to version 2 until the next poll loaded 1 again."""
    publish(tmp_path, "m", seed=1)
    ModelRepository(tmp_path).set_default("m", 1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 1
        with pytest.raises(FailedPrecondition, match=r"version 1 is the model's DEFAULT version: "
                                                     r"SetDefaultVersion to another first, or unload the whole"):
            await manager.unload("m", 1)
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 1
        assert await manager.unload("m", 2) == [2]  # any other version goes
        assert await manager.unload("m", 1) == [1]  # the last one: the whole model goes
        assert await manager.poll_once() == [] and "m" not in manager._models

    with_manager(tmp_path, check)


def test_a_batch_job_retaining_a_version_loaded_by_number_does_not_make_it_automatic(tmp_path):
    """LoadModel(m, 1) racing a batch job's retain(m, 1): the version became automatic and was unloaded when the
    job released it, although loaded by number keeps it until UnloadModel."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        building, go = asyncio.Event(), asyncio.Event()
        build = manager.loader.build

        async def gated_build(*args, **kwargs):
            building.set()
            await go.wait()
            return await build(*args, **kwargs)

        manager.loader.build = gated_build
        user = asyncio.ensure_future(manager.load("m", 1))  # LoadModel(m, 1)
        await building.wait()
        job = asyncio.ensure_future(manager.retain("m", 1))  # a batch job pinned to m:1 starts meanwhile
        await _until(lambda: manager._lock_users.get("m") == 2)  # it waits for the model's lock
        go.set()
        await asyncio.gather(user, job)
        assert manager._models["m"][1].auto is False
        manager.release("m", 1)
        await asyncio.gather(*manager._retiring)
        assert sorted(manager._models["m"]) == [1, 2]

    with_manager(tmp_path, check)


def test_a_model_unloaded_while_a_request_that_resolved_it_was_on_its_way_does_not_stay_loaded(tmp_path):
    """UnloadModel(m) while an Open Inference Protocol request that had resolved m:1 was still reading its tensors:
    the request's retain loaded m:1 again, and its release left it loaded for good, served and ready although
    unloaded (and the poller, which leaves an unloaded model alone, never took it away)."""
    publish(tmp_path, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        version = manager.resolve("m", None).version  # the request resolves its version, then reads its tensors
        assert await manager.unload("m") == [1]  # UnloadModel meanwhile
        await manager.retain("m", version)  # the request holds that version for all of its images
        with manager.lease("m", version) as lm:  # and is served by it
            assert lm.version == 1
        manager.release("m", version)
        await asyncio.gather(*manager._retiring)
        assert "m" not in manager._models and not manager.ready
        assert await manager.poll_once() == [] and "m" not in manager._models

    with_manager(tmp_path, check)


def test_a_rolled_back_version_that_a_batch_job_loads_again_is_never_the_default_and_goes_with_the_job(tmp_path):
    """LoadModel(m, 1) and UnloadModel(m, 2) to roll back, then a batch job pinned to version 2 started: its retain
    loaded 2 again, which as the newest became the default of every request without a version, and stayed so
    after the job: the rollback was undone for good."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        assert await manager.unload("m", 2) == [2]
        await manager.retain("m", 2)  # the job's version serves the job
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 1
        with manager.lease("m", None) as lm:  # requests without a version stay rolled back
            assert lm.version == 1
        manager.release("m", 2)
        await asyncio.gather(*manager._retiring)
        assert sorted(manager._models["m"]) == [1] and manager.default_version("m") == 1

    with_manager(tmp_path, check)
