"""The persistent default: ``<model>/DEFAULT`` in the repository, honoured by resolve_version and the manager."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from segsvc.errors import FailedPrecondition, UnknownModel
from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import DEFAULT_FILE, ModelRepository
from tests.inference.managers import with_manager
from tests.server.conftest import publish


def test_default_file_moves_resolve_version_and_is_not_a_skipped_entry(tmp_path):
    for seed in (1, 2, 3):
        publish(tmp_path, "m", seed=seed)
    repo = ModelRepository(tmp_path)
    assert repo.resolve_version("m", None) == 3 and repo.default_version("m") is None
    repo.set_default("m", 2)
    assert (tmp_path / "m" / DEFAULT_FILE).read_text() == "2\n"
    assert repo.resolve_version("m", None) == 2 and repo.versions("m") == [1, 2, 3]
    assert repo.skipped == ()
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")] == []  # no temporaries left
    repo.set_default("m", None)
    assert repo.resolve_version("m", None) == 3


def test_a_pointer_to_a_missing_version_or_garbage_falls_back_to_the_newest(tmp_path):
    publish(tmp_path, "m", seed=1)
    repo = ModelRepository(tmp_path)
    for text in ("7\n", "two\n", ""):
        (tmp_path / "m" / DEFAULT_FILE).write_text(text)
        assert repo.resolve_version("m", None) == 1


def test_manager_serves_the_pointer_polls_new_versions_without_switching_and_follows_a_moved_pointer(tmp_path):
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    ModelRepository(tmp_path).set_default("m", 1)

    async def check(manager: ModelManager) -> None:
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 1
        publish(tmp_path, "m", seed=3)
        assert await manager.poll_once() == [("m", 3)]
        assert manager.default_version("m") == 1  # loaded, not default
        assert 1 in manager._models["m"]  # the pinned default is never retired by a newer version
        ModelRepository(tmp_path).set_default("m", 3)
        assert await manager.refresh_default("m") == 3
        await asyncio.gather(*manager._retiring)
        assert sorted(manager._models["m"]) == [1, 3]  # 1, the outgoing default, stays; 2 (automatic, older) goes
        ModelRepository(tmp_path).set_default("m", 2)  # e.g. a rollback written by hand
        publish(tmp_path, "m", seed=4)
        await manager.poll_once()
        assert manager.default_version("m") == 2 and 4 in manager._models["m"]
        await manager.set_default("m", 4)  # SetDefaultVersion writes the pointer
        assert manager.default_version("m") == 4 and ModelRepository(tmp_path).default_version("m") == 4

    with_manager(tmp_path, check)


def test_without_a_pointer_nothing_changes(tmp_path):
    publish(tmp_path, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        publish(tmp_path, "m", seed=2)
        await manager.poll_once()
        await asyncio.gather(*manager._retiring)
        assert manager.default_version("m") == 2 and sorted(manager._models["m"]) == [1, 2]  # 1: the previous default

    with_manager(tmp_path, check)


def _sample_default(manager: ModelManager, name: str, work) -> set[int]:
    """Run ``work`` on the loop and record the default version between every one of its steps."""
    async def sample() -> set[int]:
        seen: set[int] = set()
        task = asyncio.ensure_future(work)
        while not task.done():
            seen.add(manager.default_version(name))
            await asyncio.sleep(0)
        await task
        return seen | {manager.default_version(name)}
    return sample()


def test_a_pointer_written_with_a_new_version_is_honoured_before_the_new_version_loads(tmp_path):
    """A pointer pinning the old version, written together with a newer version (what a training job's gate does
    with a rejected candidate when the model had no pointer yet): requests never reach the newer version, and the
    pinned one is never retired. Loading the newest first served the rejected candidate until the pointer was read."""
    publish(tmp_path, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        ModelRepository(tmp_path).set_default("m", 1)
        publish(tmp_path, "m", seed=2)
        assert await _sample_default(manager, "m", manager.poll_once()) == {1}
        await asyncio.gather(*manager._retiring)
        assert sorted(manager._models["m"]) == [1, 2]
        publish(tmp_path, "m", seed=3)  # the same through an explicit load of the newest
        ModelRepository(tmp_path).set_default("m", 2)
        assert await _sample_default(manager, "m", manager.load("m")) == {1, 2}
        assert manager.default_version("m") == 2 and 3 in manager._models["m"]

    with_manager(tmp_path, check)


def test_a_model_unloaded_and_loaded_again_follows_the_pointer(tmp_path):
    """Unloading forgets the stored default with the model: loading again reads the pointer anew.

    Before, the stale stored default (1) equalled the pointer, so the pointer was never followed again and
    the newest version (2) served by default."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    ModelRepository(tmp_path).set_default("m", 1)

    async def check(manager: ModelManager) -> None:
        assert manager.default_version("m") == 1
        assert await manager.unload("m") == [1, 2]
        await manager.load("m")
        assert manager.default_version("m") == 1 and sorted(manager._models["m"]) == [1, 2]
        assert await manager.unload("m", 2) == [2]
        assert await manager.unload("m", 1) == [1]  # the default goes with the last version
        assert await manager.refresh_default("m") == 0  # unloaded: followed when loaded again
        await manager.load("m")
        assert manager.default_version("m") == 1 and sorted(manager._models["m"]) == [1, 2]

    with_manager(tmp_path, check)


def test_names_that_never_load_leave_no_lock_behind(tmp_path):
    """Every LoadModel of an unknown name kept a lock in the manager for good (2001 after 2000 random names)."""
    publish(tmp_path, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        for i in range(50):
            with pytest.raises(UnknownModel):
                await manager.load(f"nothing-{i}")
        await manager.refresh_default("m")
        assert set(manager._locks) <= {"m"}

    with_manager(tmp_path, check)


def test_a_load_racing_a_job_that_pins_the_default_then_publishes_keeps_the_pinned_default(tmp_path):
    """LoadModel(m) read DEFAULT (absent), then a gate-rejected training job pinned DEFAULT = 1 and published
    version 2, then LoadModel's scan found 2 and served it by default. The pointer is read after the scan now."""
    publish(tmp_path, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        scan = manager.loader.scan
        job_ran = []

        async def scan_after_the_job(name):
            if not job_ran:  # the job's pin and publish land between the load's first step and its scan
                job_ran.append(True)
                ModelRepository(tmp_path).set_default("m", 1)
                publish(tmp_path, "m", seed=2)
            return await scan(name)

        manager.loader.scan = scan_after_the_job
        await manager.load("m")
        assert 2 in manager._models["m"] and manager.default_version("m") == 1
        with manager.lease("m", None) as lm:
            assert lm.version == 1

    with_manager(tmp_path, check)


def test_set_default_writes_the_pointer_so_a_later_promotion_wins_and_a_restart_keeps_it(tmp_path):
    """SetDefaultVersion pinned in memory only: a training job's promotion (which writes DEFAULT) reported
    "promoted" while requests stayed on the pinned version, and the pin was lost at restart."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def pin(manager: ModelManager) -> None:
        await manager.load("m", 1)
        await manager.set_default("m", 1)
        assert ModelRepository(tmp_path).default_version("m") == 1 and manager.default_version("m") == 1

    with_manager(tmp_path, pin)

    async def restarted(manager: ModelManager) -> None:
        assert manager.default_version("m") == 1  # kept over a restart
        publish(tmp_path, "m", seed=3)  # a promotion: publish, write DEFAULT, refresh
        ModelRepository(tmp_path).set_default("m", 3)
        assert await manager.refresh_default("m") == 3 and manager.default_version("m") == 3
        await manager.set_default("m", 0)  # no pointer: the newest loaded version
        assert ModelRepository(tmp_path).default_version("m") is None

    with_manager(tmp_path, restarted)


def _read_only(self, name, version):  # ModelRepository.set_default on a repository mounted read-only
    raise OSError(30, "Read-only file system")


def test_with_a_read_only_repository_set_default_pins_in_memory_and_says_so(tmp_path, monkeypatch, caplog):
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        monkeypatch.setattr(ModelRepository, "set_default", _read_only)
        await manager.set_default("m", 1)
        assert manager.default_version("m") == 1 and (await manager.describe("m")).default_pinned
        await manager.set_default("m", 0)
        assert manager.default_version("m") == 2

    with_manager(tmp_path, check)
    assert "in memory only" in caplog.text


def test_a_default_that_does_not_load_is_retried_only_when_its_files_change(tmp_path):
    """A DEFAULT naming a broken version was built again at every poll (and logged an error each time);
    other failed versions are retried only when their files change."""
    publish(tmp_path, "m", seed=1)
    v2 = publish(tmp_path, "m", seed=2)
    ModelRepository(tmp_path).set_default("m", 2)
    weights = (v2 / "weights.safetensors").read_bytes()
    (v2 / "weights.safetensors").write_bytes(b"garbage")

    async def check(manager: ModelManager) -> None:
        builds: list[int] = []
        build_engine = manager.loader._build_engine

        def counted(name, version):
            builds.append(version)
            return build_engine(name, version)

        manager.loader._build_engine = counted
        for _ in range(3):
            await manager.poll_once()
        assert builds == [] and manager.default_version("m") == 1
        (v2 / "weights.safetensors").write_bytes(weights)  # the copy completes: its files changed
        await manager.poll_once()
        assert builds == [2] and manager.default_version("m") == 2

    with_manager(tmp_path, check)


def test_with_a_read_only_repository_the_pinned_default_is_unloaded_only_with_the_whole_model(tmp_path, monkeypatch):
    """UnloadModel of the version SetDefaultVersion had pinned in memory (the repository mounted read-only) went
    through and sent requests without a version to the newest, where the DEFAULT pointer's version is refused."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        monkeypatch.setattr(ModelRepository, "set_default", _read_only)
        await manager.set_default("m", 1)
        with pytest.raises(FailedPrecondition, match="version 1 is the model's DEFAULT version"):
            await manager.unload("m", 1)
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 1
        assert await manager.unload("m") == [1, 2]  # the whole model goes

    with_manager(tmp_path, check)


def test_a_version_a_batch_job_releases_while_set_default_writes_the_pointer_stays_loaded_as_the_default(
        tmp_path, monkeypatch):
    """SetDefaultVersion(m, 1) while a batch job held the outdated automatic version 1: the job's release during
    the write retired version 1, and the stored default then named a version no longer loaded. Requests without
    a version went to 2 while DEFAULT said 1, and no poll followed the pointer again (it equalled the stored one)."""
    publish(tmp_path, "m", seed=1)
    publish(tmp_path, "m", seed=2)
    writing, written = threading.Event(), threading.Event()
    write = ModelRepository.set_default

    def gated(self, name, version):
        writing.set()
        assert written.wait(60), "the test never opened its gate"  # a hang bound: the test opens it at once
        write(self, name, version)

    async def check(manager: ModelManager) -> None:
        await manager.retain("m", 1)  # a batch job pinned to version 1 loads it next to the newest
        assert manager._models["m"][1].auto
        monkeypatch.setattr(ModelRepository, "set_default", gated)
        setting = asyncio.ensure_future(manager.set_default("m", 1))
        assert await asyncio.to_thread(writing.wait, 60)
        manager.release("m", 1)  # the job ends while the pointer is written
        written.set()
        await setting
        await asyncio.gather(*manager._retiring)
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 1
        with manager.lease("m", None) as lm:
            assert lm.version == 1
        assert await manager.poll_once() == [] and manager.default_version("m") == 1

    with_manager(tmp_path, check)


def test_a_pointer_to_a_missing_version_is_reported_once_and_followed_once_the_version_arrives(tmp_path, caplog):
    """DEFAULT naming a version that is not in the repository (a hand edit, a pointer copied before its version):
    every poll took the model's lock, scanned the model twice and logged the same error again."""
    publish(tmp_path, "m", seed=1)
    (tmp_path / "m" / DEFAULT_FILE).write_text("2\n")  # version 2 is not there yet

    async def check(manager: ModelManager) -> None:
        scans: list[str] = []
        scan = manager.loader.scan

        async def counted(name):
            scans.append(name)
            return await scan(name)

        manager.loader.scan = counted
        for _ in range(3):
            await manager.poll_once()
        assert scans == [] and manager.default_version("m") == 1
        publish(tmp_path, "m", seed=2)  # the version arrives
        assert await manager.poll_once() == [("m", 2)]
        assert manager.default_version("m") == 2

    with caplog.at_level(logging.ERROR, logger="segsvc.inference.manager"):
        with_manager(tmp_path, check)
    missing = [r for r in caplog.records if "DEFAULT names version 2, which is not in the repository" in r.getMessage()]
    assert len(missing) == 1  # said once, at the start
