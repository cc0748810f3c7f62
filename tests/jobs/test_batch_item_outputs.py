"""A batch job's files match its item states: no output for an input that was cancelled (SKIPPED) or FAILED.

Two ways such a file used to survive: a cancel (or a server stop) that lands while an
image's files are being written on an I/O thread, which the cancel did not stop; and
a file a killed run renamed into place before it could record the item DONE, when
the resumed run then fails or skips that item.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.outputs import KINDS
from segsvc.jobs.store import Job, JobStore
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import _Clock, _images, _Service


def _config(tmp_path: Path) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                      window=1)


def _outputs(runner: JobRunner, job_id: str) -> set[str]:
    return {rel for rel, _ in runner.output_files(job_id) if rel.split("/")[0] in KINDS}


class _HeldWrites(_Service):
    """Holds the first image's write on its I/O thread until ``release`` is set; ``written`` once it ran."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__(clock)
        self.writing = asyncio.Event()
        self.release = threading.Event()
        self.written = threading.Event()
        self._calls = 0

    async def run_io(self, fn, *args):  # type: ignore[no-untyped-def]
        self._calls += 1
        if self._calls > 1:
            return await super().run_io(fn, *args)

        def held():  # type: ignore[no-untyped-def]
            loop.call_soon_threadsafe(self.writing.set)
            self.release.wait(60)
            try:
                return fn(*args)
            finally:
                self.written.set()

        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(held)


def test_a_cancel_during_a_write_leaves_no_output_for_a_skipped_input(tmp_path: Path) -> None:
    _images(tmp_path / "data", ["0.png", "1.png", "2.png"])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    service = _HeldWrites(_Clock())

    async def main() -> tuple[Job, set[str]]:
        runner = JobRunner(store, service, _config(tmp_path))  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        await runner.start()
        try:
            await asyncio.wait_for(service.writing.wait(), 60)  # 0.png's files are being written
            await runner.cancel(job.id)
            release = asyncio.get_running_loop().call_later(0.2, service.release.set)  # a slow disk
            final = await runner.wait(job.id, timeout_s=60)
            service.release.set()
            release.cancel()
            await asyncio.to_thread(service.written.wait, 60)  # whatever the write thread does, it has done
        finally:
            await runner.stop()
        return final, _outputs(runner, job.id)

    final, outputs = asyncio.run(main())
    items = store.items(final.id)
    store.close()
    assert final.state == "CANCELLED"
    done = {f"labels/{i.input}.png" for i in items if i.state == "DONE"}
    assert final.done + final.skipped == 3
    assert outputs == done, f"files {sorted(outputs)} but DONE items {sorted(done)}"
    assert final.result is not None and final.result["done"] == len(outputs)


def _crashed_job(tmp_path: Path, store: JobStore, service: _Service) -> tuple[JobRunner, Job]:
    """A job whose run was killed right after renaming 1.png's label file into place, before recording it."""
    runner = JobRunner(store, service, _config(tmp_path))  # type: ignore[arg-type]
    job = asyncio.run(runner.submit(JobRequest(model="m", paths=(".",))))
    store.start(job.id)
    left = runner.output_dir(job.id) / "labels" / "1.png.png"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"a complete label png of the killed run")
    return runner, job


def test_an_input_that_fails_after_a_crash_keeps_no_output_of_the_killed_run(tmp_path: Path) -> None:
    _images(tmp_path / "data", ["0.png", "1.png", "2.png"])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    service = _Service(_Clock())
    runner, job = _crashed_job(tmp_path, store, service)
    (tmp_path / "data" / "1.png").write_bytes(b"replaced while the server was down: not an image")

    async def main() -> tuple[Job, set[str]]:
        restarted = JobRunner(store, service, _config(tmp_path))  # type: ignore[arg-type]
        return await run_to_end(restarted, job.id), _outputs(restarted, job.id)

    final, outputs = asyncio.run(main())
    store.close()
    assert (final.state, final.done, final.failed) == ("SUCCEEDED", 2, 1)
    assert outputs == {"labels/0.png.png", "labels/2.png.png"}


def test_an_input_skipped_after_a_crash_keeps_no_output_of_the_killed_run(tmp_path: Path) -> None:
    _images(tmp_path / "data", ["0.png", "1.png", "2.png"])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    service = _Service(_Clock())
    runner, job = _crashed_job(tmp_path, store, service)
    store.request_cancel(job.id)  # cancelled while the server was down: every item is skipped on restart

    async def main() -> tuple[Job, set[str]]:
        restarted = JobRunner(store, service, _config(tmp_path))  # type: ignore[arg-type]
        return await run_to_end(restarted, job.id), _outputs(restarted, job.id)

    final, outputs = asyncio.run(main())
    store.close()
    assert (final.state, final.done, final.skipped) == ("CANCELLED", 0, 3)
    assert outputs == set()
