"""Uploads live as long as a job uses them: deleting the last job removes its upload, and uploads that
no job references are swept once older than ``upload_ttl_s`` (at start-up and periodically).

The runner runs against the stand-in inference service of ``test_batch_runner``; everything runs in
one ``asyncio.run`` per test.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from segsvc.errors import InvalidArgument, NotFound
from segsvc.jobs import batch
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.staging import StagingArea
from segsvc.jobs.store import JobStore
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import _Clock, _Service, clock  # noqa: F401  (a fixture)
from tests.server.conftest import encode, make_image

DAY_S = 24 * 3600.0


def _config(tmp_path: Path, **overrides: object) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", **overrides)  # type: ignore[arg-type]


def _upload(staging: StagingArea, names: tuple[str, ...] = ("a.png", "b.png"), age_s: float = 0.0) -> str:
    """Commit an upload of small images; with ``age_s`` it looks committed that long ago."""
    up = staging.open()
    for i, name in enumerate(names):
        up.write(name, 0, encode(make_image(8, 8, seed=i)), last=True)
    upload_id = up.commit().upload_id
    if age_s:
        stamp = time.time() - age_s
        os.utime(staging.root / upload_id, (stamp, stamp))
    return upload_id


def _exists(staging: StagingArea, upload_id: str) -> bool:
    try:
        staging.path(upload_id)
    except NotFound:
        return False
    return True


def _leftovers(staging: StagingArea) -> list[str]:
    return sorted(p.name for p in staging.root.iterdir())


# -- commit leaves the commit time as the folder's mtime (what the sweep measures age by) ---------------
def test_a_committed_upload_is_stamped_with_its_commit_time(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "uploads")
    up = staging.open()
    up.write("a.png", 0, b"x", last=True)
    os.utime(staging.root / (up.upload_id + ".partial"), (1.0, 1.0))  # received long ago ...
    before = time.time()
    upload_id = up.commit().upload_id  # ... committed now
    assert (staging.root / upload_id).stat().st_mtime >= before - 1.0


# -- deleting a job deletes its upload once no job uses it ----------------------------------------------
def test_deleting_the_last_job_that_uses_an_upload_removes_it(tmp_path: Path, clock: _Clock) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path))  # type: ignore[arg-type]
        upload_id = _upload(runner.staging)
        job = await runner.submit(JobRequest(model="m", upload_id=upload_id))
        assert (await run_to_end(runner, job.id)).state == "SUCCEEDED"
        await runner.delete(job.id, delete_outputs=True)
        assert not _exists(runner.staging, upload_id)
        assert _leftovers(runner.staging) == []

    asyncio.run(main())
    assert store.list() == []
    store.close()


def test_deleting_one_of_two_jobs_sharing_an_upload_keeps_it(tmp_path: Path, clock: _Clock) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path))  # type: ignore[arg-type]
        upload_id = _upload(runner.staging)
        first = await runner.submit(JobRequest(model="m", upload_id=upload_id))
        second = await runner.submit(JobRequest(model="m", upload_id=upload_id, color=True))
        assert (await run_to_end(runner, first.id)).state == "SUCCEEDED"
        assert (await run_to_end(runner, second.id)).state == "SUCCEEDED"
        await runner.delete(first.id)
        assert _exists(runner.staging, upload_id)
        await runner.delete(second.id, delete_outputs=True)
        assert not _exists(runner.staging, upload_id)

    asyncio.run(main())
    store.close()


def test_a_queued_job_keeps_its_upload_when_another_job_is_deleted(tmp_path: Path, clock: _Clock) -> None:
    """Any state counts as a reference: the queued job has not read its inputs yet."""
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path))  # type: ignore[arg-type]
        upload_id = _upload(runner.staging)
        first = await runner.submit(JobRequest(model="m", upload_id=upload_id))
        assert (await run_to_end(runner, first.id)).state == "SUCCEEDED"
        queued = await runner.submit(JobRequest(model="m", upload_id=upload_id, overlay=True))
        await runner.delete(first.id)
        assert _exists(runner.staging, upload_id)
        assert (await run_to_end(runner, queued.id)).done == 2

    asyncio.run(main())
    store.close()


# -- uploads no job references are swept once older than the TTL --------------------------------------
def test_start_up_sweeps_old_unreferenced_uploads_only(tmp_path: Path, clock: _Clock) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path, upload_ttl_s=DAY_S))  # type: ignore[arg-type]
        abandoned = _upload(runner.staging, age_s=DAY_S + 60)  # the client died before SubmitJob
        fresh = _upload(runner.staging, age_s=DAY_S - 60)
        used = _upload(runner.staging, age_s=DAY_S + 60)
        job = await runner.submit(JobRequest(model="m", upload_id=used))
        assert (await run_to_end(runner, job.id)).state == "SUCCEEDED"  # start() sweeps
        assert not _exists(runner.staging, abandoned)
        assert _exists(runner.staging, fresh)
        assert _exists(runner.staging, used)
        assert sorted(_leftovers(runner.staging)) == sorted([fresh, used])

    asyncio.run(main())
    store.close()


def test_uploads_are_swept_periodically(tmp_path: Path, clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "SWEEP_EVERY_S", 0.05)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path, upload_ttl_s=0.2))  # type: ignore[arg-type]
        await runner.start()
        try:
            upload_id = _upload(runner.staging)
            deadline = time.monotonic() + 60  # swept within 0.25 s; only a dead sweeper takes this long
            while _exists(runner.staging, upload_id) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not _exists(runner.staging, upload_id)
        finally:
            await runner.stop()

    asyncio.run(main())
    store.close()


def test_the_sweeper_outlives_an_error_that_is_not_a_domain_error(tmp_path: Path, clock: _Clock,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A locked database (sqlite3.OperationalError) ended the sweeper for good, and silently."""
    monkeypatch.setattr(batch, "SWEEP_EVERY_S", 0.05)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path, upload_ttl_s=0.05))  # type: ignore[arg-type]
        rounds: list[int] = []
        second_round = asyncio.Event()
        loop = asyncio.get_running_loop()

        def flaky_sweep() -> list[str]:
            rounds.append(1)
            if len(rounds) == 2:  # the first periodic round (the first is the start-up sweep)
                raise sqlite3.OperationalError("database is locked")
            if len(rounds) >= 3:
                loop.call_soon_threadsafe(second_round.set)
            return []

        monkeypatch.setattr(runner, "sweep_uploads", flaky_sweep)
        await runner.start()
        try:
            await asyncio.wait_for(second_round.wait(), timeout=60)  # only a dead sweeper trips this
        finally:
            await runner.stop()

    asyncio.run(main())
    store.close()


def test_a_swept_upload_cannot_be_submitted(tmp_path: Path, clock: _Clock) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path, upload_ttl_s=DAY_S))  # type: ignore[arg-type]
        upload_id = _upload(runner.staging, age_s=2 * DAY_S)
        assert runner.sweep_uploads() == [upload_id]
        with pytest.raises(NotFound, match=upload_id):
            await runner.submit(JobRequest(model="m", upload_id=upload_id))

    asyncio.run(main())
    assert store.list() == []
    store.close()


def test_a_sweep_racing_a_submission_cannot_leave_a_job_without_its_upload(
        tmp_path: Path, clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep lands after SubmitJob checked and listed the upload but before the job is committed:
    the submission is refused with NotFound, and no job is left pointing at a deleted upload."""
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    real_resolve = batch.resolve_inputs
    runner = JobRunner(store, _Service(clock), _config(tmp_path, upload_ttl_s=DAY_S))  # type: ignore[arg-type]

    def resolve_then_sweep(*args, **kwargs):  # type: ignore[no-untyped-def]
        files = real_resolve(*args, **kwargs)
        assert runner.sweep_uploads() != []
        return files

    monkeypatch.setattr(batch, "resolve_inputs", resolve_then_sweep)

    async def main() -> None:
        upload_id = _upload(runner.staging, age_s=2 * DAY_S)
        with pytest.raises(NotFound, match=upload_id):
            await runner.submit(JobRequest(model="m", upload_id=upload_id))

    asyncio.run(main())
    assert store.list() == []
    store.close()


def test_a_job_committed_before_the_sweep_keeps_its_upload(tmp_path: Path, clock: _Clock,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: the job commits, then the sweep runs; it sees the reference and keeps the upload."""
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    runner = JobRunner(store, _Service(clock), _config(tmp_path, upload_ttl_s=DAY_S))  # type: ignore[arg-type]
    real_submit = store.submit

    def submit_then_sweep(*args, **kwargs):  # type: ignore[no-untyped-def]
        made = real_submit(*args, **kwargs)
        assert runner.sweep_uploads() == []
        return made

    monkeypatch.setattr(store, "submit", submit_then_sweep)

    async def main() -> None:
        upload_id = _upload(runner.staging, age_s=2 * DAY_S)
        job = await runner.submit(JobRequest(model="m", upload_id=upload_id))
        assert _exists(runner.staging, upload_id)
        assert (await run_to_end(runner, job.id)).done == 2

    asyncio.run(main())
    store.close()


# -- a delete interrupted by kill -9 leaves nothing half-visible ---------------------------------------
def test_a_detached_upload_is_gone_at_once_and_cleaned_at_the_next_start(tmp_path: Path) -> None:
    staging = StagingArea(tmp_path / "uploads")
    upload_id = _upload(staging)
    staging.detach(upload_id)  # the rename is done; the process dies before removing the files
    assert not _exists(staging, upload_id)
    assert _leftovers(staging) == [upload_id + ".deleting"]
    assert StagingArea(tmp_path / "uploads").clean_partial() == 1
    assert _leftovers(staging) == []


def test_the_upload_ttl_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="upload_ttl_s"):
        _config(tmp_path, upload_ttl_s=0)
