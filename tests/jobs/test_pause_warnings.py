"""A job paused by a full output volume logs one warning for the pause, not one per image in flight per retry.

With several images in flight, the first write refused for lack of space pauses the job and the run cancels the
writes still going; those were refused too, and each logged "an image's write failed while its job was
stopping: cannot write the job's outputs: No space left on device", again at every retry of the pause (5 copies
in 45 s on a 4 MiB tmpfs), on top of the one "job ... paused: no space left ..." warning the README promises. The
job was pausing, not stopping. The full volume is ``outputs.atomic_write`` refusing writes; the pauses and the
images in flight are driven by events.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
from pathlib import Path
from typing import Any, Callable

import pytest

from segsvc.jobs import batch
from segsvc.jobs import outputs as outputs_module
from segsvc.jobs import runner as job_runner
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.store import JobStore
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_disk_full import _Disk
from tests.jobs.test_batch_runner import _Clock, _images, _Service

NAMES = ["a.png", "b.png", "c.png", "d.png"]
WINDOW = len(NAMES)  # every image in flight at once
FULL_RUNS = 3  # runs that find the volume full: a row of 3 pauses, then space is freed


def _writes_cancelled() -> bool:
    """Whether the job's run has cancelled its images in flight (the tasks running ``JobRunner._run_item``)."""
    return any(task.cancelling() for task in asyncio.all_tasks() if task.get_coro().__name__ == "_run_item")


class _InFlight(_Service):
    """While the volume is full, each run's writes wait until all ``WINDOW`` images have reached theirs; the
    first then writes (and is refused), the others once the run has cancelled them for that refusal: each run
    has ``WINDOW - 1`` writes that end after the cancel, as on a real server with a window of images in flight."""

    def __init__(self, disk: _Disk) -> None:
        super().__init__(_Clock())
        self.disk = disk
        self.arrived = 0
        self.late = 0  # writes that ran after their run had cancelled them
        self._cond: asyncio.Condition | None = None

    async def run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        if getattr(fn, "__name__", "") != "_write" or not self.disk.full:
            return await asyncio.to_thread(fn, *args)
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            self.arrived += 1
            mine = self.arrived
            self._cond.notify_all()
            await self._cond.wait_for(lambda: self.arrived >= math.ceil(mine / WINDOW) * WINDOW)
        if mine % WINDOW != 1:  # not the first of its run: wait for the first's refusal to cancel this write
            while not _writes_cancelled():
                await asyncio.sleep(0.005)
            self.late += 1
        return await asyncio.to_thread(fn, *args)


def test_a_row_of_pauses_for_a_full_volume_logs_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path / "data", NAMES)
    disk = _Disk(full=True, code=errno.ENOSPC)
    service = _InFlight(disk)
    monkeypatch.setattr(outputs_module, "atomic_write", disk)
    pauses: list[float] = []

    async def pause_for(cancel: asyncio.Event, pause_s: float) -> None:
        pauses.append(pause_s)
        if len(pauses) == FULL_RUNS:
            disk.full = False  # space freed during the last pause of the row

    monkeypatch.setattr(job_runner, "pause_for", pause_for)
    caplog.set_level(logging.DEBUG, logger="segsvc.jobs")
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                        window=WINDOW)

    async def main() -> str:
        runner = JobRunner(store, service, config)  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        return (await run_to_end(runner, job.id)).id

    try:
        final = store.get(asyncio.run(main()))
    finally:
        store.close()
    # the scenario happened: 3 runs met the full volume, each with writes ending after their cancel
    assert len(pauses) == FULL_RUNS, pauses
    assert service.late == FULL_RUNS * (WINDOW - 1)
    # nothing lost: every image written once, the job finished
    assert (final.state, final.done, final.failed, final.skipped) == ("SUCCEEDED", len(NAMES), 0, 0), final.error
    assert all(disk.written[f"labels/{name}.png"] == 1 for name in NAMES), disk.written
    # the log: the pause's one warning, and no image's write reported as failing "while its job was stopping"
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "segsvc.jobs" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"job {final.id} paused: {batch.NO_SPACE_REASON}" in warnings[0]
    assert not any("stopping" in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
