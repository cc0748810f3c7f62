"""A server job whose output volume fills up pauses, says why, and carries on once space is freed.

It used to fail as a whole ("cannot write the job's outputs: No space left on device ... submit the job
again"): the images already segmented got no results.jsonl or summary and a new job redid them all. Now
the refused item stays PENDING, the job waits (5 s doubling to 60 s while the volume stays full) with
``paused_reason`` in its progress, a cancel ends the wait, and a restart resumes it. Other write errors
(a read-only volume) still fail the job. Pauses are driven by events through ``runner.pause_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import AsyncIterator

import pytest

from segsvc.jobs import batch
from segsvc.jobs import outputs as outputs_module
from segsvc.jobs import runner as job_runner
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.store import Job, JobStore
from segsvc.server import convert
from segsvc.v1 import jobs_pb2 as jobs_pb
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import _Clock, _images, _Service

NAMES = ["a.png", "b.png", "c.png", "d.png"]


class _Disk:
    """``outputs.atomic_write`` on a volume that refuses the writes numbered in ``refused`` (1-based, every
    write counts) with ``code``, or every write while ``full``; counts the files each output really got."""

    def __init__(self, refused: set[int] = frozenset(), code: int = errno.ENOSPC, full: bool = False) -> None:
        self.refused, self.code, self.full = refused, code, full
        self.calls = 0
        self.written: Counter[str] = Counter()  # "<folder>/<file>" -> successful writes
        self.real = outputs_module.atomic_write

    def __call__(self, path: Path, data: object) -> None:
        self.calls += 1
        if self.full or self.calls in self.refused:
            raise OSError(self.code, os.strerror(self.code), str(path))
        self.real(path, data)  # type: ignore[arg-type]
        self.written[f"{path.parent.name}/{path.name}"] += 1


class _Pauses:
    """Stands in for ``runner.pause_for``: records each pause's length and the job as the pause began, sets
    ``paused``; then returns at once, waits for the cancel (``hold``: a stop cancels it), or runs the real
    pause (``real``). The event is made inside the test's loop (``arm``)."""

    def __init__(self, store: JobStore, hold: bool = False, real: bool = False) -> None:
        self.store, self.hold, self.real = store, hold, real
        self.job_id = ""
        self.asked: list[float] = []
        self.seen: list[Job] = []
        self.paused = asyncio.Event()
        self.real_pause = job_runner.pause_for

    def arm(self, job_id: str) -> asyncio.Event:
        self.job_id, self.paused = job_id, asyncio.Event()
        return self.paused

    async def __call__(self, cancel: asyncio.Event, pause_s: float) -> None:
        self.asked.append(pause_s)
        self.seen.append(self.store.get(self.job_id))
        self.paused.set()
        if self.real:
            await self.real_pause(cancel, pause_s)  # type: ignore[misc]
        elif self.hold:
            await cancel.wait()


def _config(tmp_path: Path) -> JobsConfig:
    # one image at a time: the writes come in input order, so the test knows which one each refusal hits
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                      window=1)


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: _Disk, **pauses: bool) -> tuple[JobStore, _Pauses]:
    monkeypatch.setattr(outputs_module, "atomic_write", disk)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    fake = _Pauses(store, **pauses)
    monkeypatch.setattr(job_runner, "pause_for", fake)
    return store, fake


def _run(tmp_path: Path, store: JobStore, pauses: _Pauses) -> Job:
    """One job over every image under ``tmp_path/data``, run to its end; the job."""

    async def main() -> Job:
        runner = JobRunner(store, _Service(_Clock()), _config(tmp_path))  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        pauses.arm(job.id)
        return await run_to_end(runner, job.id)

    return asyncio.run(main())


def _results(tmp_path: Path, job_id: str) -> list[str]:
    lines = (tmp_path / "out" / job_id / outputs_module.RESULTS_FILE).read_text().splitlines()
    return [json.loads(line)["input"] for line in lines]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_volume_pauses_the_job_which_then_finishes_every_image_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int) -> None:
    _images(tmp_path / "data", NAMES)
    # a's write is refused 6 times in a row (pauses 5, 10, 20, 40, 60, 60 s), b's once after a went through
    disk = _Disk(refused={1, 2, 3, 4, 5, 6, 8}, code=code)
    store, pauses = _setup(tmp_path, monkeypatch, disk)
    caplog.set_level(logging.INFO, logger="segsvc.jobs")
    try:
        final = _run(tmp_path, store, pauses)
        items = store.items(final.id)
    finally:
        store.close()
    assert (final.state, final.done, final.failed, final.skipped) == ("SUCCEEDED", 4, 0, 0), final.error
    assert pauses.asked == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 5.0]  # a new row of pauses starts short again
    assert [job.done for job in pauses.seen] == [0] * 6 + [1]
    # while paused: RUNNING, the reason in the progress and in the Operation's metadata, no ETA
    for job in pauses.seen:
        assert job.state == "RUNNING"
        assert job.progress["paused_reason"] == batch.NO_SPACE_REASON
        assert job.progress["eta_s"] is None
        metadata = jobs_pb.JobMetadata()
        assert convert.operation(job).metadata.Unpack(metadata)
        assert metadata.state == jobs_pb.JOB_STATE_RUNNING
        assert metadata.paused_reason == "no space left on the output volume; the job continues when space is freed"
    # running again: cleared, in the store and in the metadata
    assert "paused_reason" not in final.progress
    metadata = jobs_pb.JobMetadata()
    assert convert.operation(final).metadata.Unpack(metadata)
    assert metadata.paused_reason == ""
    # every image written and recorded exactly once, the job's results and summary with them
    assert {i.state for i in items} == {"DONE"}
    assert all(disk.written[f"labels/{name}.png"] == 1 for name in NAMES), disk.written
    assert all(count == 1 for count in disk.written.values()), disk.written
    assert _results(tmp_path, final.id) == NAMES
    assert (tmp_path / "out" / final.id / outputs_module.SUMMARY_FILE).is_file()
    # one warning per row of pauses, not one per retry
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "paused" in r.getMessage()]
    assert len(warnings) == 2, warnings


def test_a_full_volume_at_the_summary_pauses_then_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", ["a.png"])
    disk = _Disk(refused={2})  # a's label goes through, results.jsonl is refused once
    store, pauses = _setup(tmp_path, monkeypatch, disk)
    try:
        final = _run(tmp_path, store, pauses)
    finally:
        store.close()
    assert (final.state, final.done) == ("SUCCEEDED", 1), final.error
    assert pauses.asked == [5.0] and pauses.seen[0].progress["paused_reason"] == batch.NO_SPACE_REASON
    assert disk.written["labels/a.png.png"] == 1
    assert _results(tmp_path, final.id) == ["a.png"]


@contextlib.asynccontextmanager
async def _paused_job(store: JobStore, tmp_path: Path, pauses: _Pauses) -> AsyncIterator[tuple[JobRunner, Job]]:
    """A runner with a job over the images, once the job has paused; the runner stops on leaving."""
    runner = JobRunner(store, _Service(_Clock()), _config(tmp_path))  # type: ignore[arg-type]
    job = await runner.submit(JobRequest(model="m", paths=(".",)))
    paused = pauses.arm(job.id)
    await runner.start()
    try:
        await asyncio.wait_for(paused.wait(), 60)
        yield runner, job
    finally:
        await runner.stop()


def test_a_cancel_ends_the_pause_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "SPACE_PAUSE_S", (600.0, 600.0), raising=False)  # only the cancel can end it
    _images(tmp_path / "data", NAMES)
    disk = _Disk(full=True)  # still full when the cancel comes: the job ends without its summary
    store, pauses = _setup(tmp_path, monkeypatch, disk, real=True)

    async def main() -> Job:
        async with _paused_job(store, tmp_path, pauses) as (runner, job):
            await runner.cancel(job.id)
            return await runner.wait(job.id, timeout_s=60)  # a 600 s pause: only the cancel ends it in time

    try:
        final = asyncio.run(main())
    finally:
        store.close()
    assert (final.state, final.done, final.skipped) == ("CANCELLED", 0, 4), final.error
    assert pauses.asked == [600.0]
    assert "paused_reason" not in final.progress
    assert not disk.written


def test_a_restart_during_the_pause_resumes_the_job_without_redoing_an_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", NAMES)
    disk = _Disk(refused=set(range(2, 1000)))  # a goes through, then the volume is full
    store, pauses = _setup(tmp_path, monkeypatch, disk, hold=True)

    async def first_server() -> Job:
        async with _paused_job(store, tmp_path, pauses) as (_, job):
            pass  # the server stops during the pause
        return store.get(job.id)

    async def second_server(job_id: str) -> Job:
        runner = JobRunner(store, _Service(_Clock()), _config(tmp_path))  # type: ignore[arg-type]
        return await run_to_end(runner, job_id)

    try:
        stopped = asyncio.run(first_server())
        assert (stopped.state, stopped.done) == ("RUNNING", 1)
        assert stopped.progress["paused_reason"] == batch.NO_SPACE_REASON  # still paused, as far as anyone knows
        assert [i.state for i in store.items(stopped.id)] == ["DONE", "PENDING", "PENDING", "PENDING"]
        disk.refused = set()  # space freed while the server was down
        final = asyncio.run(second_server(stopped.id))
    finally:
        store.close()
    assert (final.state, final.done, final.failed) == ("SUCCEEDED", 4, 0), final.error
    assert pauses.asked == [5.0]
    assert "paused_reason" not in final.progress
    assert all(disk.written[f"labels/{name}.png"] == 1 for name in NAMES), disk.written
    assert _results(tmp_path, final.id) == NAMES


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO, errno.EACCES])
def test_other_write_errors_still_fail_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    _images(tmp_path / "data", ["a.png", "b.png"])
    store, pauses = _setup(tmp_path, monkeypatch, _Disk(full=True, code=code))
    try:
        final = _run(tmp_path, store, pauses)
    finally:
        store.close()
    assert final.state == "FAILED" and pauses.asked == []
    assert final.error is not None and os.strerror(code) in final.error, final.error
    assert str(tmp_path) not in final.error  # the server's folders are not the client's business
