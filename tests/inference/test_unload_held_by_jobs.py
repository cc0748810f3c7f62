"""``unload`` refuses while a batch job holds a version it would unload.

An operator's QA: UnloadModel succeeded while a batch job used the model (the whole model, or just the job's pinned
version), and the job then failed for good ("FAILED 164/600 ... model 'other' is not loaded"). Like ``datasets
delete`` under a training job, the unload is refused, saying how many jobs hold which version and what to do. A
batch job holds its version with ``retain``; an Open Inference Protocol request's hold (plain ``retain``; a batch job's is ``job=True``) does not
refuse an unload: requests in flight finish, as on any unloaded version.
"""

from __future__ import annotations

import asyncio

import pytest

from segsvc.errors import FailedPrecondition
from segsvc.inference.manager import ModelManager
from tests.inference.managers import with_manager
from tests.server.conftest import publish


def _two_versions(root) -> None:  # type: ignore[no-untyped-def]
    publish(root, "m", seed=1)
    publish(root, "m", seed=2)


def test_unloading_a_model_a_batch_job_holds_is_refused_until_the_job_releases_it(tmp_path):
    """The QA report, the whole model: UnloadModel(m) under a running job."""
    _two_versions(tmp_path)

    async def check(manager: ModelManager) -> None:
        await manager.retain("m", 2, job=True)  # two batch jobs pinned to m:2
        await manager.retain("m", 2, job=True)
        with pytest.raises(FailedPrecondition, match=r"^model 'm' version 2 is in use by 2 batch jobs: cancel them "
                                                     r"\(`segsvc jobs cancel JOB_ID`.*\) or wait for them to finish, "
                                                     r"then unload$"):
            await manager.unload("m")
        assert sorted(manager._models["m"]) == [2] and "m" not in manager._unloaded_models
        with manager.lease("m", 2) as lm:  # the jobs go on
            assert lm.version == 2
        manager.release("m", 2, job=True)
        with pytest.raises(FailedPrecondition, match="version 2 is in use by 1 batch job: "):
            await manager.unload("m")
        manager.release("m", 2, job=True)
        assert await manager.unload("m") == [2]
        assert "m" not in manager._models

    with_manager(tmp_path, check)


def test_unloading_the_version_a_batch_job_holds_is_refused_and_other_versions_go(tmp_path):
    """The QA report, the job's pinned version: UnloadModel(m, 1) under a job pinned to m:1."""
    _two_versions(tmp_path)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)  # by number: it stays next to 2
        await manager.retain("m", 1, job=True)
        with pytest.raises(FailedPrecondition, match="^model 'm' version 1 is in use by 1 batch job: cancel"):
            await manager.unload("m", 1)
        assert sorted(manager._models["m"]) == [1, 2]
        assert 1 not in manager._unloaded_versions.get("m", ())
        await manager.retain("m", 2, job=True)
        with pytest.raises(FailedPrecondition, match="^model 'm' version 1 is in use by 1 batch job and version 2 "
                                                     "in use by 1 batch job: cancel"):
            await manager.unload("m")
        manager.release("m", 2, job=True)
        assert await manager.unload("m", 2) == [2]  # a version no job holds goes
        manager.release("m", 1, job=True)
        assert await manager.unload("m", 1) == [1]
        await asyncio.gather(*manager._retiring)
        assert "m" not in manager._models

    with_manager(tmp_path, check)


def test_a_requests_hold_does_not_refuse_an_unload(tmp_path):
    """An Open Inference Protocol request holds its version while it reads its tensors; an unload lets it finish
    on that version (it goes when released), as before."""
    _two_versions(tmp_path)

    async def check(manager: ModelManager) -> None:
        await manager.retain("m", 2)
        assert await manager.unload("m") == [2]
        await manager.retain("m", 2)  # a request that resolved it before the unload
        manager.release("m", 2)
        manager.release("m", 2)
        await asyncio.gather(*manager._retiring)
        assert "m" not in manager._models and manager._holds == {} and manager._job_holds == {}

    with_manager(tmp_path, check)


def test_setting_the_default_keeps_a_batch_jobs_hold(tmp_path):
    """SetDefaultVersion holds the version while it writes the pointer; its release took a batch job's hold
    with it, and the unload under the running job then went through (a reviewer's find)."""
    _two_versions(tmp_path)

    async def check(manager: ModelManager) -> None:
        await manager.load("m", 1)
        await manager.retain("m", 1, job=True)
        await manager.set_default("m", 1)
        await manager.set_default("m", 2)
        with pytest.raises(FailedPrecondition, match="version 1 is in use by 1 batch job: "):
            await manager.unload("m", 1)
        manager.release("m", 1, job=True)
        assert await manager.unload("m", 1) == [1]

    with_manager(tmp_path, check)
