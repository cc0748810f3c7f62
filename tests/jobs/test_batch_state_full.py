"""A job whose store refuses writes ("database or disk is full") backs off instead of being re-run at once.

By default a job's outputs are under the state folder, so the volume that fills up holds ``jobs.sqlite`` too.
The pause's progress write failed before the pause began: the exception killed the job's task ("Task
exception was never retrieved"), the job stayed RUNNING and the scheduler ran it again at once (a reviewer
counted 1789 runs and 3558 images segmented, and thrown away, in 8 s). The same when a cancel met a full
volume (the outcome could not be recorded). Now the pause's write is best effort and the pause always
happens, and any run that raises waits ``runner.BACK_OFF_S`` (growing) before its job can be picked again,
for every kind of job. Pauses are counted through ``runner.pause_for``; none sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import json
import sqlite3
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from segsvc.jobs import outputs as outputs_module
from segsvc.jobs import runner as job_runner
from segsvc.jobs.batch import NO_SPACE_REASON, JobRequest, JobRunner, JobsConfig
from segsvc.jobs.runner import StoreRunner
from segsvc.jobs.store import Job, JobStore
from tests.jobs.test_batch_disk_full import _Disk
from tests.jobs.test_batch_runner import _Clock, _images, _Service

NAMES = ["a.png", "b.png", "c.png", "d.png"]
SPIN = 40  # runs of one job that mean it spins (before the fix): the volume is freed so that the test ends


class _Volume:
    """One full volume under the outputs and the store: while ``full``, a write of an output raises ENOSPC
    (``disk``) and the store's ``set_progress`` and ``finish`` raise SQLite's "database or disk is full"."""

    def __init__(self, store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.disk = _Disk()
        self.refused: list[str] = []  # the store writes refused
        monkeypatch.setattr(outputs_module, "atomic_write", self.disk)
        for name in ("set_progress", "finish"):
            monkeypatch.setattr(store, name, self._refusing(name, getattr(store, name)))

    @property
    def full(self) -> bool:
        return self.disk.full

    @full.setter
    def full(self, value: bool) -> None:
        self.disk.full = value

    def _refusing(self, name, real):  # type: ignore[no-untyped-def]
        def write(*args, **kwargs):  # type: ignore[no-untyped-def]
            if self.full:
                self.refused.append(name)
                raise sqlite3.OperationalError("database or disk is full")
            return real(*args, **kwargs)
        return write


class _Pauses:
    """Stands in for ``runner.pause_for``: records each pause's length, calls ``then`` with their count, and
    returns at once (no sleep), or with ``hold`` waits for the cancel (``paused`` is set as a pause begins)."""

    def __init__(self, then: Callable[[int], Awaitable[None]] | None = None, hold: bool = False) -> None:
        self.then, self.hold = then, hold
        self.asked: list[float] = []
        self.paused: asyncio.Event | None = None

    async def __call__(self, cancel: asyncio.Event, pause_s: float) -> None:
        self.asked.append(pause_s)
        if self.then is not None:
            await self.then(len(self.asked))
        if self.paused is not None:
            self.paused.set()
        if self.hold:
            await cancel.wait()


def _patch(monkeypatch: pytest.MonkeyPatch, pauses: _Pauses) -> None:
    monkeypatch.setattr(job_runner, "pause_for", pauses, raising=False)  # raising: absent before the fix


def _results(out: Path) -> list[str]:
    return [json.loads(line)["input"] for line in (out / outputs_module.RESULTS_FILE).read_text().splitlines()]


class _Counted(JobRunner):
    """A ``JobRunner`` that counts its runs; one that spins (``SPIN`` runs) frees the volume, so the test ends."""

    def __init__(self, *args, volume: _Volume, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.volume, self.runs = volume, 0

    async def _run_job(self, job: Job) -> None:
        self.runs += 1
        if self.runs >= SPIN:
            self.volume.full = False
        await super()._run_job(job)


def _config(tmp_path: Path) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "state" / "outputs",
                      data_root=tmp_path / "data", window=1)


def _service(segmented: list[str]) -> _Service:
    async def count(source) -> None:  # type: ignore[no-untyped-def]
        segmented.append(source.rel)
    return _Service(_Clock(), hold=count)


async def _run_on_a_full_volume(runner: "_Counted", volume: "_Volume",
                                submitted: Callable[[str], None] = lambda _id: None) -> tuple[Job, int]:
    """Submit a job over the images, fill the volume, run the job to its end: its final state and how many runs."""
    job = await runner.submit(JobRequest(model="m", paths=(".",)))
    submitted(job.id)
    volume.full = True
    await runner.start()
    try:
        return await runner.wait(job.id, timeout_s=60), runner.runs
    finally:
        await runner.stop()


def test_a_full_volume_that_holds_the_store_pauses_the_job_with_growing_waits_then_it_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path / "data", NAMES)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    volume = _Volume(store, monkeypatch)

    async def free_at_the_4th(count: int) -> None:
        if count == 4:
            volume.full = False

    pauses = _Pauses(free_at_the_4th)
    _patch(monkeypatch, pauses)
    caplog.set_level(logging.INFO, logger="segsvc.jobs")
    segmented: list[str] = []

    runner = _Counted(store, _service(segmented), _config(tmp_path), volume=volume)  # type: ignore[arg-type]
    try:
        final, runs = asyncio.run(_run_on_a_full_volume(runner, volume))
    finally:
        store.close()
    # before: 40 runs without a pause (the volume freed by the test), 40 images segmented for nothing
    assert (runs, len(segmented), pauses.asked) == (5, 8, [5.0, 10.0, 20.0, 40.0])
    assert (final.state, final.done, final.failed) == ("SUCCEEDED", 4, 0), final.error
    assert volume.refused == ["set_progress"] * 4  # each pause's progress, refused; the pause happened anyway
    assert "paused_reason" not in final.progress
    assert _results(tmp_path / "state" / "outputs" / final.id) == NAMES
    assert all(volume.disk.written[f"labels/{name}.png"] == 1 for name in NAMES), volume.disk.written
    # once per row of pauses: the pause and its progress not stored; never "Task exception was never retrieved"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2 and NO_SPACE_REASON in warned[0] and "database or disk is full" in warned[1], warned


def test_a_cancel_on_a_full_volume_backs_off_until_its_outcome_can_be_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path / "data", NAMES)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    volume = _Volume(store, monkeypatch)
    segmented: list[str] = []
    runner = _Counted(store, _service(segmented), _config(tmp_path), volume=volume)  # type: ignore[arg-type]
    job_id = ""

    async def cancel_then_free(count: int) -> None:
        if count == 1:  # the job pauses on the full volume: cancel it
            await runner.cancel(job_id)
        if count == 4:
            volume.full = False

    pauses = _Pauses(cancel_then_free)
    _patch(monkeypatch, pauses)
    caplog.set_level(logging.INFO, logger="segsvc.jobs")

    def submitted(job_id_: str) -> None:
        nonlocal job_id
        job_id = job_id_

    try:
        final, runs = asyncio.run(_run_on_a_full_volume(runner, volume, submitted))
    finally:
        store.close()
    # the pause (5 s), then the cancelled outcome refused 3 times: 3 growing waits, nothing more segmented
    assert (runs, segmented, pauses.asked) == (5, ["a.png"], [5.0, 5.0, 10.0, 20.0])
    assert (final.state, final.skipped) == ("CANCELLED", 4), final.error
    # one error (with its traceback) for the row of failed runs, not one per run
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "database or disk is full" in errors[0].getMessage(), errors
    assert "Task exception was never retrieved" not in caplog.text


class _Failing(StoreRunner):
    """A kind of job (not a batch one) whose runs raise until ``fails`` is 0, then finish it."""

    def __init__(self, store: JobStore, fails: int) -> None:
        super().__init__(store, "other", 1)
        self.fails, self.runs = fails, 0

    def files_dir(self, job_id: str) -> Path:
        raise AssertionError("not used")

    async def _run_job(self, job: Job) -> None:
        self.runs += 1
        started = await self._start(job)
        if started is None:
            return
        await self._register(job.id, _Cancel())
        if self.fails and self.runs < SPIN:
            self.fails -= 1
            raise OSError(errno.EIO, "the store is gone")
        await asyncio.to_thread(self.store.finish, job.id, "SUCCEEDED", result={})
        self._notify(job.id)


class _Cancel:
    def __init__(self) -> None:
        self.cancel = asyncio.Event()


def test_every_kind_of_job_whose_run_raises_backs_off_growing_and_a_cancel_ends_the_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    pauses = _Pauses()
    _patch(monkeypatch, pauses)
    caplog.set_level(logging.INFO, logger="segsvc.jobs")

    async def growing() -> tuple[Job, int]:
        runner = _Failing(store, fails=6)
        job, _ = store.submit("other", {}, ["x"])
        await runner.start()
        try:
            return await runner.wait(job.id, timeout_s=60), runner.runs
        finally:
            await runner.stop()

    async def cancelled() -> tuple[Job, int]:
        pauses.hold, pauses.paused = True, asyncio.Event()  # only the cancel ends this wait
        runner = _Failing(store, fails=1)
        job, _ = store.submit("other", {}, ["x"])
        await runner.start()
        try:
            await asyncio.wait_for(pauses.paused.wait(), 60)
            await runner.cancel(job.id)
            return await runner.wait(job.id, timeout_s=60), runner.runs
        finally:
            await runner.stop()

    try:
        final, runs = asyncio.run(growing())
        assert (final.state, runs) == ("SUCCEEDED", 7)
        assert pauses.asked == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "the store is gone" in errors[0].getMessage(), errors
        pauses.asked.clear()
        final, runs = asyncio.run(cancelled())
    finally:
        store.close()
    # the cancel ended the wait: the job ran again at once and, its cancel asked for, succeeded (this fake
    # runner ignores cancels: the point is that it ran again without waiting out the pause)
    assert (final.state, runs, pauses.asked) == ("SUCCEEDED", 2, [5.0])
