"""An input's failure reason is one line of at most ``store.MAX_REASON_CHARS`` characters.

Reasons are exception messages (a decoder's, the OS's), stored as they came: a message of megabytes, or one
spanning lines, went whole into the job store, ``failures.jsonl``, ``summary.json`` and ``GetOperation``. The
store, which every reason passes through, now makes each one line and cuts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from segsvc.errors import InvalidImage
from segsvc.inference.service import ImageFile, Segmentation
from segsvc.jobs.store import MAX_ERROR_CHARS, MAX_REASON_CHARS, JobStore
from segsvc.server import convert
from segsvc.v1 import jobs_pb2 as jobs_pb
from tests.jobs.test_batch_runner import _images, _run_one_job, _Service, clock  # noqa: F401  (clock: a fixture)

LONG = "libpng error: IDAT: invalid distance too far back\n" + "\n".join(f"  at chunk {i}: " + "x" * 90
                                                                        for i in range(200))


def _bounded(reason: str | None) -> str:
    assert reason is not None
    assert len(reason) <= MAX_REASON_CHARS and "\n" not in reason and "\r" not in reason, reason[:200]
    return reason


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_a_long_reason_is_stored_as_one_cut_line(store: JobStore) -> None:
    job, _ = store.submit("segmentation", {}, ["a.png", "b.png"])
    store.finish_item(job.id, 0, "FAILED", reason=LONG)
    store.finish_item(job.id, 1, "FAILED", reason="PNG data could not be decoded")
    long, short = store.items(job.id)
    reason = _bounded(long.reason)
    assert reason.startswith("libpng error: IDAT: invalid distance too far back at chunk 0: xxx")
    assert reason.endswith("...") and len(reason) == MAX_REASON_CHARS
    assert short.reason == "PNG data could not be decoded"  # a short one-line reason is kept as it is


def test_reasons_given_at_submit_and_to_skipped_items_are_bounded_too(store: JobStore) -> None:
    job, _ = store.submit("segmentation", {}, ["a.png", "b.png", "c.png"], failed={0: LONG, 1: "a\r\nb"})
    assert store.skip_pending(job.id, "cancelled:\n" + "y" * 10_000) == 1
    first, second, third = store.items(job.id)
    assert _bounded(first.reason).startswith("libpng error")
    assert second.reason == "a b"
    assert _bounded(third.reason).startswith("cancelled: yyy")
    assert store.get(job.id).failed == 2 and store.get(job.id).skipped == 1


def test_an_empty_reason_stays_empty(store: JobStore) -> None:
    job, _ = store.submit("segmentation", {}, ["a.png"])
    store.finish_item(job.id, 0, "FAILED", reason="")  # str(KeyError()) is ''
    assert store.item(job.id, 0).reason == ""


def test_no_reason_stays_none_where_the_store_takes_one(store: JobStore) -> None:
    """The store's checks let a reason be None (stored as NULL); bounding it raised AttributeError instead."""
    job, _ = store.submit("segmentation", {}, ["a.png", "b.png", "c.png"], failed={0: None})  # type: ignore[dict-item]
    store.finish_item(job.id, 1, "FAILED", reason=None)
    assert store.skip_pending(job.id, None) == 1  # type: ignore[arg-type]
    assert [item.reason for item in store.items(job.id)] == [None, None, None]


def test_a_jobs_error_keeps_its_lines_and_is_cut_to_the_bound(store: JobStore) -> None:
    """A job's error went into the store whole, however long: every listing and GetOperation carried it."""
    report = "the dataset has 3 problems:\n" + "\n".join(f"masks/{i:06d}.png: value 7 is no class" for i in range(500))
    long_job, _ = store.submit("segmentation", {}, ["a.png"])
    short_job, _ = store.submit("segmentation", {}, ["b.png"])
    store.finish(long_job.id, "FAILED", error=report)
    store.finish(short_job.id, "FAILED", error="line one\nline two")
    error = store.get(long_job.id).error
    assert error is not None and len(error) == MAX_ERROR_CHARS and error.endswith("...")
    assert error.startswith("the dataset has 3 problems:\nmasks/000000.png: value 7 is no class\n")
    assert store.get(short_job.id).error == "line one\nline two"  # a short error is kept as it is, lines and all


class _Undecodable(_Service):
    """Every input fails with a long, many-line decoder message."""

    async def segment(self, source: ImageFile, **_: object) -> Segmentation:
        raise InvalidImage(f"{source.name}: {LONG}")


def test_a_jobs_failures_file_summary_and_operation_carry_the_bounded_reason(tmp_path: Path,
                                                                             clock: Any) -> None:  # noqa: F811
    _images(tmp_path / "data", ["a.png", "b.png"])
    job = _run_one_job(tmp_path, _Undecodable(clock))
    assert (job.state, job.failed) == ("SUCCEEDED", 2), job.error
    out = tmp_path / "out" / job.id
    lines = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [row["input"] for row in lines] == ["a.png", "b.png"]
    for row in lines:
        assert _bounded(row["reason"]).startswith(f"{row['input']}: libpng error: IDAT")
    summary = json.loads((out / "summary.json").read_text())
    assert [_bounded(f["reason"]) for f in summary["failures"]] == [row["reason"] for row in lines]
    response = jobs_pb.SegmentationJobResult()
    assert convert.operation(job).response.Unpack(response)  # what GetOperation sends
    assert [_bounded(f.reason) for f in response.failures] == [row["reason"] for row in lines]
