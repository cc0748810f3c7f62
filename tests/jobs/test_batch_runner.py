"""The batch job runner against a stand-in inference service: outputs, elapsed time, cancel races, input limits.

The stand-in decodes each input (so bad files fail as they would) and returns
an all-background label map at once; a test may hold one image in ``segment``
to interrupt a job at a known point. Everything runs in one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Awaitable, Callable

import numpy as np
import pytest

from segsvc.errors import InvalidArgument
from segsvc.inference.engine import Output
from segsvc.inference.service import ImageFile, Segmentation
from segsvc.jobs import batch, inputs
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.store import Job, JobStore
from tests.jobs.conftest import MANIFEST, FakeManager, cancel_inside_start, run_to_end
from tests.server.conftest import encode, make_image

SECONDS_PER_IMAGE = 10.0


class _Clock:
    """A monotonic clock that moves only when told to (``batch`` reads it as ``time.monotonic``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Service:
    """What ``JobRunner`` uses of ``InferenceService``; each image advances ``clock`` by SECONDS_PER_IMAGE."""

    def __init__(self, clock: _Clock, hold: Callable[[ImageFile], Awaitable[None]] | None = None) -> None:
        self.manager = FakeManager()
        self.clock = clock
        self.hold = hold

    def resolve(self, model: str | None, version: int | None) -> tuple[str, int, SimpleNamespace]:
        return "m", 1, MANIFEST

    async def run_io(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, *args)

    async def segment(self, source: ImageFile, **_: object) -> Segmentation:
        image = await asyncio.to_thread(source.load, 1 << 24)
        if self.hold is not None:
            await self.hold(source)
        self.clock.now += SECONDS_PER_IMAGE
        labels = np.zeros(image.shape[:2], np.uint8)
        counts = np.bincount(labels.ravel(), minlength=2).astype(np.int64)
        return Segmentation(image, Output(labels, class_counts=counts), MANIFEST, "m", 1, 0.0, 0.0, 1)  # type: ignore[arg-type]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(batch, "time", SimpleNamespace(monotonic=fake.monotonic, perf_counter=time.perf_counter,
                                                       time=time.time))
    return fake


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(make_image(8, 8, seed=i)))


def _config(tmp_path: Path, **overrides: object) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                      **overrides)  # type: ignore[arg-type]


def _run_one_job(tmp_path: Path, service: object, **overrides: object) -> Job:
    """One job over every image under ``tmp_path/data``, run to its end by a runner on ``service``; the job."""
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> Job:
        runner = JobRunner(store, service, _config(tmp_path, **overrides))  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        return await run_to_end(runner, job.id)

    try:
        return asyncio.run(main())
    finally:
        store.close()


# -- FetchJobOutputs lists every output, only real temporaries are left out ---------------------------
def test_output_files_keep_inputs_whose_name_contains_tmp(tmp_path: Path, clock: _Clock) -> None:
    _images(tmp_path / "data", ["scan.tmp-1.png", "plain.png"])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> list[str]:
        runner = JobRunner(store, _Service(clock), _config(tmp_path))  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        assert (await run_to_end(runner, job.id)).state == "SUCCEEDED"
        leftover = runner.output_dir(job.id) / "labels" / ".plain.png.png.tmp-0123456789ab"
        leftover.write_bytes(b"half")  # what a killed writer leaves behind
        return [rel for rel, _ in runner.output_files(job.id)]

    listed = asyncio.run(main())
    store.close()
    assert "labels/scan.tmp-1.png.png" in listed
    assert "labels/plain.png.png" in listed
    assert not [rel for rel in listed if ".tmp-0123456789ab" in rel]


# -- elapsed time and throughput survive a restart -----------------------------------------------------
def test_elapsed_time_accumulates_across_a_restart(tmp_path: Path, clock: _Clock) -> None:
    names = [f"{i}.png" for i in range(6)]
    _images(tmp_path / "data", names)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = _config(tmp_path, window=1)  # one image at a time: image 2 starts after image 1 is published
    held, never = asyncio.Event(), asyncio.Event()

    async def hold_third(source: ImageFile) -> None:
        if source.name == "2.png":
            held.set()
            await never.wait()  # the "crash" comes while this image is in flight

    async def main() -> Job:
        first = JobRunner(store, _Service(clock, hold_third), config)  # type: ignore[arg-type]
        job = await first.submit(JobRequest(model="m", paths=(".",)))
        await first.start()
        await asyncio.wait_for(held.wait(), 60)
        await first.stop()  # like kill -9: the job stays RUNNING with its last progress
        interrupted = store.get(job.id)
        assert (interrupted.state, interrupted.done) == ("RUNNING", 2)
        assert interrupted.progress["elapsed_s"] == 2 * SECONDS_PER_IMAGE
        clock.now += 3600.0  # the server is down for an hour: not part of the job's time
        second = JobRunner(store, _Service(clock), config)  # type: ignore[arg-type]
        return await run_to_end(second, job.id)

    job = asyncio.run(main())
    store.close()
    assert job.state == "SUCCEEDED" and job.done == 6
    assert job.result is not None
    assert job.result["elapsed_seconds"] == pytest.approx(6 * SECONDS_PER_IMAGE)
    assert job.result["images_per_second"] == pytest.approx(1 / SECONDS_PER_IMAGE)


# -- a cancel that lands while the job is starting is not lost -----------------------------------------
def test_cancel_between_start_and_registration_stops_the_job(tmp_path: Path, clock: _Clock,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", [f"{i}.png" for i in range(4)])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    async def main() -> tuple[Job, Job]:
        runner = JobRunner(store, _Service(clock), _config(tmp_path))  # type: ignore[arg-type]
        acknowledged = cancel_inside_start(monkeypatch, store, runner, asyncio.get_running_loop())
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        final = await run_to_end(runner, job.id)
        return acknowledged[0], final

    acknowledged, final = asyncio.run(main())
    store.close()
    assert acknowledged.cancel_requested and acknowledged.state == "RUNNING"
    assert (final.state, final.done, final.skipped) == ("CANCELLED", 0, 4)


# -- the number of input specs is bounded before anything is walked ------------------------------------
def test_too_many_input_specs_are_refused_by_the_configured_limit(tmp_path: Path, clock: _Clock,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", ["a.png"])
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    walked: list[str] = []
    real_expand = inputs._expand

    def counting_expand(real_root: Path, rel: str, shown: str, budget):  # type: ignore[no-untyped-def]
        walked.append(rel)
        return real_expand(real_root, rel, shown, budget)

    monkeypatch.setattr(inputs, "_expand", counting_expand)

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path, max_input_specs=3))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=r"4 input paths.*limit of 3"):
            await runner.submit(JobRequest(model="m", paths=(".",) * 4))
        assert walked == []
        job = await runner.submit(JobRequest(model="m", paths=(".",) * 3))
        assert job.total == 1 and walked == ["."]

    asyncio.run(main())
    assert [j.total for j in store.list()] == [1]
    store.close()


def test_the_input_spec_limit_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="max_input_specs"):
        _config(tmp_path, max_input_specs=0)
