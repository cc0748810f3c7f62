"""A server job whose outputs cannot be written: one input's clash fails that input; a read-only or failing disk
fails the job with the reason (not "internal error"). A full one pauses it: test_batch_disk_full.py."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from segsvc.jobs import outputs as outputs_module
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.outputs import KINDS
from segsvc.jobs.store import Job, JobStore
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import _Clock, _images, _Service


def _run(tmp_path: Path, **request: object) -> tuple[Job, list, set[str]]:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                        window=1)

    async def main() -> tuple[Job, set[str]]:
        runner = JobRunner(store, _Service(_Clock()), config)  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",), **request))  # type: ignore[arg-type]
        final = await run_to_end(runner, job.id)
        return final, {rel for rel, _ in runner.output_files(job.id) if rel.split("/")[0] in KINDS}

    try:
        final, files = asyncio.run(main())
        return final, store.items(final.id), files
    finally:
        store.close()


def test_two_inputs_clashing_on_an_output_name_fail_one_input_not_the_job(tmp_path: Path) -> None:
    # labels/a.png.png is a's label file and the folder of a.png.png/b.png's: one of the two cannot be written
    _images(tmp_path / "data", ["a.png", "a.png.png/b.png", "c.png"])
    final, items, files = _run(tmp_path, color=True)
    assert (final.state, final.total, final.done, final.failed) == ("SUCCEEDED", 3, 2, 1), final.error
    (failed,) = [i for i in items if i.state == "FAILED"]
    assert "a.png.png" in (failed.reason or "") and "another input" in (failed.reason or "")
    done = {i.input for i in items if i.state == "DONE"}
    assert {f for f in files if f.startswith("labels/")} == {f"labels/{rel}.png" for rel in done}
    assert {f for f in files if f.startswith("color/")} == {f"color/{rel}.png" for rel in done}


def test_a_read_only_output_disk_fails_the_job_with_the_reason(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", ["a.png", "b.png"])

    def read_only(path: Path, data: bytes) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(outputs_module, "atomic_write", read_only)
    final, items, files = _run(tmp_path)
    assert final.state == "FAILED"
    assert final.error is not None and "Read-only file system" in final.error, final.error
    assert str(tmp_path) not in final.error  # the server's folders are not the client's business
    assert files == set() and final.done == 0


def test_an_io_error_at_the_summary_fails_the_job_with_the_reason(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", ["a.png"])
    write = outputs_module.atomic_write

    def failing_at_the_summary(path: Path, data: bytes) -> None:
        if path.name == outputs_module.RESULTS_FILE:
            raise OSError(errno.EIO, "Input/output error", str(path))
        write(path, data)

    monkeypatch.setattr(outputs_module, "atomic_write", failing_at_the_summary)
    final, _, files = _run(tmp_path)
    assert final.state == "FAILED"
    assert final.error is not None and "Input/output error" in final.error, final.error
    assert str(tmp_path) not in final.error
