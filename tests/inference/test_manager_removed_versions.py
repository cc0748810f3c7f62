"""The poller unloads a version whose folder left the repository, as Triton's poll mode does.

QA: with polling on, ``rm -rf repo/m/4`` after the poller had loaded version 4 left it serving as the default
for good, with nothing logged, and GetModel said ``default 4, loaded [1, 4], versions [1, 2, 3, 5]``. Every
test calls ``poll_once`` itself (the manager's poller is off) and waits only on the loop's own tasks.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from segsvc.errors import UnknownModel, UnknownVersion
from segsvc.inference.engine import InferenceOptions
from segsvc.inference.manager import REMOVED_HELD, ModelManager
from segsvc.inference.repository import ModelRepository
from tests.inference.managers import with_manager
from tests.server.conftest import make_image, publish

LOGGER = "segsvc.inference.manager"


async def _retired(manager: ModelManager) -> None:
    """Wait for the retirements in progress (their requests drain; nothing here holds them)."""
    await asyncio.gather(*manager._retiring)


async def _served_by(manager: ModelManager, name: str, version: int | None) -> int:
    """Segment one small image as a request does (lease, prepare, batch); the version that served it."""
    with manager.lease(name, version) as lm:
        result = await lm.batcher.submit(lm.engine.prepare(make_image(16, 16), InferenceOptions()))
        assert result.value.labels.shape == (16, 16)
        return lm.version


def _left(caplog: pytest.LogCaptureFixture, name: str, version: int) -> list[logging.LogRecord]:
    text = f"model {name}: version {version} left the repository; unloading it"
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_a_removed_newest_version_is_unloaded_and_requests_fall_back_to_the_remaining_one(tmp_path, caplog):
    """The QA report: version 2, copied in and polled, then removed, served on as the default."""
    root = tmp_path / "repo"
    publish(root, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)  # by number: it stays next to newer versions
        two = publish(root, "m", seed=2)
        assert await manager.poll_once() == [("m", 2)]
        old = manager.resolve("m", None)
        assert old.version == 2
        scan_all = manager.repository.scan_all

        def racing_scan():  # a scan that misses version 2 (a transient): the fresh scan finds it
            found = scan_all()
            found["m"] = [e for e in found["m"] if e.version != 2]
            return found

        manager.repository.scan_all = racing_scan
        assert await manager.poll_once() == []
        assert sorted(manager._models["m"]) == [1, 2] and manager.default_version("m") == 2
        manager.repository.scan_all = scan_all
        old.acquire()  # a request on version 2 is in flight
        shutil.rmtree(two)
        assert await manager.poll_once() == []
        assert sorted(manager._models["m"]) == [1] and old.batcher.running  # it drains: the request finishes
        result = await old.batcher.submit(old.engine.prepare(make_image(16, 16), InferenceOptions()))
        assert result.value.labels.shape == (16, 16)
        old.release()
        await _retired(manager)
        assert not old.batcher.running
        assert manager.default_version("m") == 1 and await _served_by(manager, "m", None) == 1
        with pytest.raises(UnknownVersion):
            manager.resolve("m", 2)
        status = await manager.describe("m")  # GetModel agrees with itself
        assert (status.versions, status.loaded_versions, status.default_version) == ((1,), (1,), 1)
        assert [(s.version, s.state.value) for s in status.version_status] == [(1, "READY")]
        assert not manager._unloaded_versions and not manager._unloaded_models
        assert await manager.poll_once() == []  # said once

    with caplog.at_level(logging.INFO, logger=LOGGER):
        with_manager(root, check)
    assert len(_left(caplog, "m", 2)) == 1


def test_when_the_removed_version_was_the_only_one_loaded_the_newest_left_is_loaded_before_it_goes(tmp_path):
    """Only the newest version is loaded (the older one retired when it came): removing it must not leave the
    model without a version; the newest left on disk is loaded in the same poll and serves by default."""
    root = tmp_path / "repo"
    publish(root, "m", seed=1)
    two = publish(root, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        assert sorted(manager._models["m"]) == [2]
        shutil.rmtree(two)
        assert await manager.poll_once() == [("m", 1)]
        await _retired(manager)
        assert sorted(manager._models["m"]) == [1] and await _served_by(manager, "m", None) == 1

    with_manager(root, check)


@pytest.mark.parametrize("how", ["pointer", "pin"])
def test_a_removed_default_version_is_no_longer_the_default(tmp_path, monkeypatch, caplog, how):
    """Version 2 is the default (DEFAULT pointer, or the in-memory pin of a read-only repository) and is removed:
    requests without a version go where a DEFAULT naming a missing version sends them, the newest loaded."""
    root = tmp_path / "repo"
    publish(root, "m", seed=1)
    two = publish(root, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        if how == "pin":
            def read_only(self, name, version):  # ModelRepository.set_default on a read-only mount
                raise OSError(30, "Read-only file system")

            monkeypatch.setattr(ModelRepository, "set_default", read_only)
        await manager.set_default("m", 2)
        assert manager.default_version("m") == 2
        shutil.rmtree(two)
        await manager.poll_once()
        await _retired(manager)
        assert sorted(manager._models["m"]) == [1] and manager.default_version("m") == 1
        assert await _served_by(manager, "m", None) == 1
        status = await manager.describe("m")
        assert (status.versions, status.loaded_versions, status.default_version) == ((1,), (1,), 1)
        assert not status.default_pinned
        for _ in range(2):
            assert await manager.poll_once() == [] and manager.default_version("m") == 1

    with caplog.at_level(logging.INFO, logger=LOGGER):
        with_manager(root, check)
    assert len(_left(caplog, "m", 2)) == 1
    if how == "pointer":  # DEFAULT still says 2: reported once, as a pointer to any missing version is
        missing = [r for r in caplog.records if "DEFAULT names version 2, which is not in the repository" in
                   r.getMessage()]
        assert len(missing) == 1


def test_a_removal_is_not_sticky_the_folder_back_is_loaded_again(tmp_path):
    root = tmp_path / "repo"
    publish(root, "m", seed=1)
    two = publish(root, "m", seed=2)
    aside = tmp_path / "aside"

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        shutil.move(two, aside)
        await manager.poll_once()
        await _retired(manager)
        assert sorted(manager._models["m"]) == [1]
        shutil.move(aside, two)  # back in the repository
        assert await manager.poll_once() == [("m", 2)]
        assert sorted(manager._models["m"]) == [1, 2] and await _served_by(manager, "m", None) == 2

    with_manager(root, check)


def test_a_removed_version_a_batch_job_holds_serves_the_job_until_released_then_goes(tmp_path, caplog):
    root = tmp_path / "repo"
    publish(root, "m", seed=1)
    two = publish(root, "m", seed=2)

    async def check(manager: ModelManager) -> None:
        await manager.retain("m", 2)  # a batch job pinned to version 2
        held = manager.resolve("m", 2)
        shutil.rmtree(two)
        assert await manager.poll_once() == [("m", 1)]  # the newest left serves requests without a version
        assert await _served_by(manager, "m", None) == 1
        assert await _served_by(manager, "m", 2) == 2 and held.batcher.running  # the job goes on with 2
        assert manager.default_version("m") == 1
        status = await manager.describe("m")
        assert (status.versions, status.loaded_versions, status.default_version) == ((1,), (1, 2), 1)
        assert [(s.version, s.state.value, s.reason) for s in status.version_status] == [
            (1, "READY", ""), (2, "READY", REMOVED_HELD)]
        with pytest.raises(UnknownVersion, match="left the repository"):
            await manager.set_default("m", 2)
        assert await manager.poll_once() == [] and manager.default_version("m") == 1  # said once
        manager.release("m", 2)  # the job ends
        await _retired(manager)
        assert sorted(manager._models["m"]) == [1] and not held.batcher.running
        with pytest.raises(UnknownVersion):
            manager.resolve("m", 2)
        assert await manager.poll_once() == [] and not manager._removed

    with caplog.at_level(logging.INFO, logger=LOGGER):
        with_manager(root, check)
    assert len([r for r in caplog.records if "version 2 left the repository" in r.getMessage()]) == 2
    assert "it goes now that nothing holds it" in caplog.text


def test_a_removed_model_folder_unloads_its_versions_and_resolve_refuses(tmp_path):
    root = tmp_path / "repo"
    publish(root, "m", seed=1)
    publish(root, "n", seed=2)
    aside = tmp_path / "aside"

    async def check(manager: ModelManager) -> None:
        m = manager.resolve("m", None)
        root.rename(aside)  # the repository root itself is gone (an unmounted volume): nothing is unloaded
        assert await manager.poll_once() == [] and sorted(manager._models) == ["m", "n"]
        aside.rename(root)
        shutil.move(root / "m", aside)  # the model's folder leaves
        assert await manager.poll_once() == []
        await _retired(manager)
        assert sorted(manager._models) == ["n"] and not m.batcher.running
        with pytest.raises(UnknownModel, match="model 'm' is not loaded"):
            manager.resolve("m", None)
        with pytest.raises(UnknownModel):
            await manager.describe("m")
        assert await _served_by(manager, "n", None) == 1
        assert [s.name for s in await manager.describe_all()] == ["n"]
        shutil.move(aside, root / "m")  # back: loaded again
        assert await manager.poll_once() == [("m", 1)]

    with_manager(root, check)


def test_a_removed_model_folder_while_a_job_holds_a_version_refuses_requests_without_a_version(tmp_path):
    root = tmp_path / "repo"
    publish(root, "m", seed=1)

    async def check(manager: ModelManager) -> None:
        await manager.retain("m", 1)
        shutil.rmtree(root / "m")
        assert await manager.poll_once() == []
        with pytest.raises(UnknownModel, match="left the repository"):
            manager.resolve("m", None)
        assert await _served_by(manager, "m", 1) == 1  # the job's images still are
        status = await manager.describe("m")
        assert (status.versions, status.loaded_versions, status.default_version) == ((), (1,), 0)
        manager.release("m", 1)
        await _retired(manager)
        assert "m" not in manager._models and not manager.ready

    with_manager(root, check)


def test_an_explicit_unload_stays_sticky_beside_a_removal(tmp_path):
    """Version 2 unloaded by the user and version 3 removed from disk: 3 goes and comes back with its folder;
    2 stays unloaded through both polls, and so does a whole model unloaded."""
    root = tmp_path / "repo"
    for seed in (1, 2, 3):
        publish(root, "m", seed=seed)
    three = root / "m" / "3"
    aside = tmp_path / "aside"

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        await manager.load("m", 2)
        assert await manager.unload("m", 2) == [2]
        shutil.move(three, aside)
        assert await manager.poll_once() == []  # 2, unloaded, is not the version loaded in 3's place
        await _retired(manager)
        assert sorted(manager._models["m"]) == [1] and manager.default_version("m") == 1
        assert manager._unloaded_versions == {"m": {2}}
        shutil.move(aside, three)
        assert await manager.poll_once() == [("m", 3)]
        assert sorted(manager._models["m"]) == [1, 3]
        assert await manager.unload("m") == [1, 3]
        shutil.move(three, aside)
        assert await manager.poll_once() == []
        shutil.move(aside, three)
        assert await manager.poll_once() == [] and "m" not in manager._models

    with_manager(root, check)
