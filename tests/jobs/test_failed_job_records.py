"""A job that fails on an unwritable output keeps the records of what it did, as a cancelled job does.

It used to leave only labels/ in its folder (``FAILED 249/2100 ... Operation not permitted`` after labels/ files
were made immutable mid-job): no results.jsonl, failures.jsonl or summary.json, though the job's folder was
writable, so ``jobs fetch`` gave label files and no record of which inputs were done. Now a failing job writes them
when it can (the summary saying it failed and why); when they cannot be written either, the job still ends FAILED
with its own error. The refused writes are ``outputs.atomic_write`` raising.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from pathlib import Path

import pytest

from segsvc.jobs import outputs as outputs_module
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.outputs import FAILURES_FILE, RESULTS_FILE, SUMMARY_FILE
from segsvc.jobs.store import Job, JobStore
from segsvc.server.jobs import check_finished
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import _Clock, _images, _Service

NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png"]
RECORDS = (RESULTS_FILE, FAILURES_FILE, SUMMARY_FILE)


class _Disk:
    """``outputs.atomic_write`` refusing the label maps of ``refused_labels`` with EPERM (immutable files) and,
    when ``records_error`` is set, the job's records (anything outside labels/) with that errno."""

    def __init__(self, refused_labels: set[str], records_error: int | None = None) -> None:
        self.refused_labels, self.records_error = refused_labels, records_error
        self.real = outputs_module.atomic_write

    def __call__(self, path: Path, data: object) -> None:
        if path.parent.name == "labels" and path.name in self.refused_labels:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        if path.parent.name != "labels" and self.records_error is not None:
            raise OSError(self.records_error, os.strerror(self.records_error), str(path))
        self.real(path, data)  # type: ignore[arg-type]


def _run(tmp_path: Path) -> tuple[Job, list[str]]:
    """One job over NAMES (one image at a time, in order), run to its end; the job and what a fetch lists."""
    (tmp_path / "data" / "bad.png").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "bad.png").write_bytes(b"not a png")  # a failed input, for failures.jsonl
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                        window=1)

    async def main() -> tuple[Job, list[str]]:
        runner = JobRunner(store, _Service(_Clock()), config)  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        final = await run_to_end(runner, job.id)
        check_finished(final)  # FetchJobOutputs serves it ...
        return final, [rel for rel, _ in runner.output_files(job.id)]  # ... these files

    try:
        return asyncio.run(main())
    finally:
        store.close()


def test_a_job_failing_on_an_unwritable_output_writes_its_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", NAMES)
    monkeypatch.setattr(outputs_module, "atomic_write", _Disk(refused_labels={"c.png.png"}))
    final, fetched = _run(tmp_path)
    assert final.state == "FAILED"
    assert final.error is not None and "Operation not permitted" in final.error, final.error
    assert (final.done, final.failed) == (2, 1)  # a and b written, bad.png undecodable; c refused, d, e not run
    # the fetch serves the labels written and the records saying which inputs they are
    assert set(fetched) >= {*RECORDS, "labels/a.png.png", "labels/b.png.png"}, fetched
    out = tmp_path / "out" / final.id
    results = [json.loads(line)["input"] for line in (out / RESULTS_FILE).read_text().splitlines()]
    assert results == ["a.png", "b.png"]
    failures = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert [f["input"] for f in failures] == ["bad.png"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["counts"] == {"total": 6, "done": 2, "failed": 1, "skipped": 0}
    assert summary["state"] == "FAILED" and summary["error"] == final.error
    assert str(tmp_path) not in summary["error"]


def test_a_job_whose_records_cannot_be_written_either_fails_with_its_own_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path / "data", NAMES)
    # the job's folder refuses its records too, with another error: the job's error stays the label's refusal
    monkeypatch.setattr(outputs_module, "atomic_write", _Disk(refused_labels={"c.png.png"}, records_error=errno.EIO))
    caplog.set_level(logging.INFO, logger="segsvc.jobs")
    final, fetched = _run(tmp_path)
    assert final.state == "FAILED"
    assert final.error is not None and "Operation not permitted" in final.error, final.error
    assert "Input/output error" not in final.error
    assert (final.done, final.failed) == (2, 1)
    assert not set(fetched) & set(RECORDS), fetched
    assert set(fetched) >= {"labels/a.png.png", "labels/b.png.png"}
    # the records' trouble is in the log, next to the job's failure
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("could not be written" in m and "Input/output error" in m for m in messages), messages
    assert any(f"job {final.id} failed: " in m and "Operation not permitted" in m for m in messages), messages
