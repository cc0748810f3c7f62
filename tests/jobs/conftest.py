"""Helpers shared by the job runner tests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from segsvc.jobs.runner import StoreRunner
from segsvc.jobs.store import Job, JobStore


def cancel_inside_start(monkeypatch: pytest.MonkeyPatch, store: JobStore, runner: StoreRunner,
                        loop: asyncio.AbstractEventLoop) -> list[Job]:
    """Make ``store.start`` land a ``CancelOperation`` right after it commits RUNNING, before the runner has
    registered the job (the window a cancel used to be lost in); returns the jobs the cancels acknowledged."""
    acknowledged: list[Job] = []
    real_start = store.start

    def start_then_cancel(job_id: str) -> Job:
        job = real_start(job_id)  # RUNNING is committed; the runner has not registered the job yet
        acknowledged.append(asyncio.run_coroutine_threadsafe(runner.cancel(job_id), loop).result(60))
        return job

    monkeypatch.setattr(store, "start", start_then_cancel)
    return acknowledged


MANIFEST = SimpleNamespace(class_names=["bg", "fg"], palette=[(0, 0, 0), (255, 255, 255)])


class FakeManager:
    """What ``JobRunner`` uses of the model manager: every version is there and stays."""

    async def retain(self, name: str, version: int, *, job: bool = False) -> None:
        pass

    def release(self, name: str, version: int, *, job: bool = False) -> None:
        pass

    def resolve(self, name: str, version: int) -> SimpleNamespace:
        return SimpleNamespace(manifest=MANIFEST)


async def run_to_end(runner: StoreRunner, job_id: str, timeout_s: float = 60) -> Job:
    """Start ``runner``, wait for job ``job_id`` to finish (``timeout_s`` at most: only a hang should reach it),
    stop the runner; the job."""
    await runner.start()
    try:
        job = await runner.wait(job_id, timeout_s=timeout_s)
    finally:
        await runner.stop()
    assert job.finished, f"job still {job.state} after {timeout_s:g} s"
    return job
