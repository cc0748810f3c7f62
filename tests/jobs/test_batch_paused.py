"""A job paused by ``Unavailable`` (its model not accepting requests) waits before it runs again.

It used to be re-run at once, over and over: about 1,600 restarts a second, each one a
store transaction, a walk of the job's output folder and a warning in the log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from segsvc.errors import Unavailable
from segsvc.jobs import batch
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.store import JobStore
from tests.jobs.test_batch_runner import _Clock, _images, _Service

PAUSE_S = 0.3


class _Unavailable(_Service):
    """The model refuses the first ``refusals`` images (a batcher stopped or unloading), then segments."""

    def __init__(self, refusals: int) -> None:
        super().__init__(_Clock())
        self.refusals = refusals
        self.calls: list[float] = []
        self.called = asyncio.Event()

    async def segment(self, source, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(asyncio.get_running_loop().time())
        self.called.set()
        if len(self.calls) <= self.refusals:
            raise Unavailable("model m:1 is not accepting requests (stopped or unloading)")
        return await super().segment(source, **kwargs)


def _runner(tmp_path: Path, service: _Service) -> JobRunner:
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")
    return JobRunner(JobStore(tmp_path / "state" / "jobs.sqlite"), service, config)  # type: ignore[arg-type]


def test_a_paused_job_runs_again_after_a_pause_not_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "PAUSE_S", PAUSE_S, raising=False)
    _images(tmp_path / "data", ["a.png"])

    async def main() -> tuple[str, list[float]]:
        service = _Unavailable(refusals=2)
        runner = _runner(tmp_path, service)
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        await runner.start()
        try:
            final = await runner.wait(job.id, timeout_s=60)
        finally:
            await runner.stop()
            runner.store.close()
        return final.state, service.calls

    state, calls = asyncio.run(main())
    assert state == "SUCCEEDED"
    assert len(calls) == 3
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert min(gaps) >= 0.9 * PAUSE_S, f"re-run after {min(gaps):.4f} s"


def test_a_cancel_ends_a_paused_job_without_waiting_out_the_pause(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "PAUSE_S", 600.0, raising=False)
    _images(tmp_path / "data", ["a.png", "b.png"])

    async def main() -> tuple[str, int, int]:
        service = _Unavailable(refusals=1_000_000)
        runner = _runner(tmp_path, service)
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        await runner.start()
        try:
            await asyncio.wait_for(service.called.wait(), 60)
            await runner.cancel(job.id)
            final = await runner.wait(job.id, timeout_s=60)
        finally:
            await runner.stop()
            runner.store.close()
        return final.state, final.skipped, final.done

    assert asyncio.run(main()) == ("CANCELLED", 2, 0)
