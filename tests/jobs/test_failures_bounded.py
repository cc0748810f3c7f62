"""A job's failures: every one in ``failures.jsonl``, the first few (and an exact count) in its summary and result.

A job whose inputs all fail (a wrong model, unreadable files) used to hold every failure, list them all in
``summary.json`` and in the job's stored result, and send them all in ``GetOperation``: unbounded, and past
gRPC's message limit for a large job. The tests shrink ``outputs.FAILURES_SHOWN`` instead of failing a
million files, and count what finalize holds (``tracemalloc``), never how long anything takes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from segsvc.inference.service import ImageFile
from segsvc.jobs import outputs
from segsvc.jobs.batch import JobRequest, JobRunner
from segsvc.jobs.offline import run_batch
from segsvc.jobs.outputs import JobOutputs
from segsvc.jobs.store import Job, JobStore
from segsvc.server import convert
from segsvc.v1 import jobs_pb2 as jobs_pb
from tests.jobs.conftest import run_to_end
from tests.jobs.test_batch_runner import (_config, _images, _run_one_job, _Service,  # noqa: F401
                                         clock)  # clock: a fixture
from tests.jobs.test_jobs_scale import _peak
from tests.server.conftest import encode, make_image, publish

NAMES = ["sky", "road", "car"]
PALETTE = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]
SHOWN = 5  # outputs.FAILURES_SHOWN in these tests (100 in a server)
FAILURES_FILE = "failures.jsonl"
BROKEN = [f"bad-{i:02d}.png" for i in range(12)]  # sorted before GOOD
GOOD = ["good-0.png", "good-1.png", "good-2.png"]


class Killed(BaseException):
    """What ``kill -9`` leaves: the run stops, with no cleanup of its own."""


def _failures_file(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]


def _no_temporaries(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if ".tmp-" in p.name]


# -- finalize ---------------------------------------------------------------------------------------------
def _failures(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"input": f"{i:07d}.png", "reason": "PNG data could not be decoded"}


def test_finalize_lists_every_failure_in_its_file_and_the_first_in_the_summary(tmp_path: Path) -> None:
    summary = JobOutputs(tmp_path).finalize([], _failures(250), class_names=NAMES, palette=PALETTE,
                                            summary_fields={"job_id": "j"}, failures_shown=SHOWN)
    assert summary["counts"] == {"total": 250, "done": 0, "failed": 250, "skipped": 0}
    assert summary["failures"] == list(_failures(SHOWN))
    assert summary["failures_truncated"] is True and summary["failures_file"] == FAILURES_FILE
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert _failures_file(tmp_path) == list(_failures(250))
    assert _no_temporaries(tmp_path) == []


def test_finalize_shows_the_first_failures_by_input_whatever_order_they_come_in(tmp_path: Path) -> None:
    given = [{"input": name, "reason": f"reason {name}"} for name in ["m.png", "c.png", "z.png", "a.png", "k.png"]]
    summary = JobOutputs(tmp_path / "few").finalize([], iter(given), class_names=NAMES, palette=PALETTE,
                                                    summary_fields={}, failures_shown=2)
    assert [f["input"] for f in summary["failures"]] == ["a.png", "c.png"] and summary["failures_truncated"]
    assert [f["input"] for f in _failures_file(tmp_path / "few")] == [f["input"] for f in given]  # as they came
    listed = JobOutputs(tmp_path / "list").finalize([], given, class_names=NAMES, palette=PALETTE,
                                                    summary_fields={}, failures_shown=10)
    assert [f["input"] for f in listed["failures"]] == ["a.png", "c.png", "k.png", "m.png", "z.png"]
    assert listed["failures_truncated"] is False
    assert _failures_file(tmp_path / "list") == listed["failures"]  # a sequence is sorted, like records


def test_finalize_holds_no_failure_it_does_not_show(tmp_path: Path) -> None:
    def run(out: Path, n: int) -> Callable[[], object]:
        return lambda: JobOutputs(out).finalize([], _failures(n), class_names=NAMES, palette=PALETTE,
                                                summary_fields={"job_id": "j"})

    small = _peak(run(tmp_path / "small", 1_000))
    large = _peak(run(tmp_path / "large", 21_000))
    assert large - small < 20_000 * 16, (small, large)  # under 16 bytes per further failure: none is held
    summary = json.loads((tmp_path / "large" / "summary.json").read_text())
    assert summary["counts"]["failed"] == 21_000 and len(summary["failures"]) == 100
    assert len((tmp_path / "large" / FAILURES_FILE).read_text().splitlines()) == 21_000


# -- the server's job runner ------------------------------------------------------------------------------
def _broken(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"not a PNG")


def test_the_job_runner_keeps_the_first_failures_and_their_exact_count(tmp_path: Path, clock: Any,  # noqa: F811
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "FAILURES_SHOWN", SHOWN, raising=False)
    _images(tmp_path / "data", GOOD)
    _broken(tmp_path / "data", BROKEN)
    job = _run_one_job(tmp_path, _Service(clock), window=2)
    assert (job.state, job.done, job.failed) == ("SUCCEEDED", len(GOOD), len(BROKEN)), job.error
    assert job.result is not None
    assert [f["input"] for f in job.result["failures"]] == BROKEN[:SHOWN]
    assert job.result["failures_truncated"] is True and job.result["failures_file"] == FAILURES_FILE
    out = tmp_path / "out" / job.id
    assert [f["input"] for f in _failures_file(out)] == BROKEN
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == job.result["failures"] and summary["counts"]["failed"] == len(BROKEN)
    response = jobs_pb.SegmentationJobResult()
    assert convert.operation(job).response.Unpack(response)  # what GetOperation sends
    assert [f.input for f in response.failures] == BROKEN[:SHOWN] and response.failed == len(BROKEN)
    assert response.failures_truncated and response.failures_file == FAILURES_FILE  # a client sees there are more


def test_a_job_stopped_mid_run_lists_each_failure_once_after_it_resumes(tmp_path: Path, clock: Any,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "FAILURES_SHOWN", SHOWN, raising=False)
    broken = [f"{i:02d}-bad.png" for i in range(0, 12, 2)]  # broken and good inputs interleaved
    good = [f"{i:02d}-good.png" for i in range(1, 12, 2)]
    _images(tmp_path / "data", good)
    _broken(tmp_path / "data", broken)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = _config(tmp_path, window=1)
    held, never = asyncio.Event(), asyncio.Event()

    async def hold_middle(source: ImageFile) -> None:
        if source.name == "05-good.png":
            held.set()
            await never.wait()  # the "crash" comes while this image is in flight

    async def main() -> tuple[Job, Job]:
        first = JobRunner(store, _Service(clock, hold_middle), config)  # type: ignore[arg-type]
        job = await first.submit(JobRequest(model="m", paths=(".",)))
        await first.start()
        await asyncio.wait_for(held.wait(), 60)
        await first.stop()  # like kill -9: the job stays RUNNING with the failures recorded so far
        interrupted = store.get(job.id)
        second = JobRunner(store, _Service(clock), config)  # type: ignore[arg-type]
        return interrupted, await run_to_end(second, job.id)

    try:
        interrupted, job = asyncio.run(main())
    finally:
        store.close()
    assert interrupted.state == "RUNNING" and 0 < interrupted.failed < len(broken)
    assert (job.state, job.done, job.failed) == ("SUCCEEDED", len(good), len(broken)), job.error
    out = tmp_path / "out" / job.id
    assert [f["input"] for f in _failures_file(out)] == broken  # none lost, none twice
    assert job.result is not None and [f["input"] for f in job.result["failures"]] == broken[:SHOWN]
    assert _no_temporaries(out) == []


# -- segsvc batch (the local engine; the Ray engine records its outcomes and finalizes the same way) ------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("failures")
    publish(root / "repo", "tiny", seed=1)
    return root / "repo"


def _batch_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate(GOOD):
        (folder / name).write_bytes(encode(make_image(32, 32, seed=i)))
    _broken(folder, BROKEN)


def test_segsvc_batch_killed_mid_run_and_mid_finalize_lists_each_failure_once(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "FAILURES_SHOWN", SHOWN, raising=False)
    _batch_inputs(tmp_path / "in")
    out = tmp_path / "out"
    real_finish_item, real_iter_items = JobStore.finish_item, JobStore.iter_items

    def killed_at_the_fifth_failure(self: JobStore, job_id: str, index: int, state: str, **kw: Any) -> bool:
        if state == "FAILED" and self.get(job_id).failed == 4:
            raise Killed
        return real_finish_item(self, job_id, index, state, **kw)

    monkeypatch.setattr(JobStore, "finish_item", killed_at_the_fifth_failure)
    with pytest.raises(Killed):
        run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=out, device="cpu", batch_size=1,
                  io_threads=1)
    monkeypatch.setattr(JobStore, "finish_item", real_finish_item)

    def killed_writing_failures(self: JobStore, job_id: str, state: str | None = None) -> Iterator[Any]:
        for n, item in enumerate(real_iter_items(self, job_id, state)):
            if state == "FAILED" and n == 7:
                raise Killed  # failures.jsonl is half written
            yield item

    monkeypatch.setattr(JobStore, "iter_items", killed_writing_failures)
    with pytest.raises(Killed):
        run_batch(None, model_repo=repo, model=None, out=out, resume=True, device="cpu")
    monkeypatch.setattr(JobStore, "iter_items", real_iter_items)
    (out / f".{FAILURES_FILE}.tmp-0123456789ab").write_text('{"input": "bad-00.png"}\n')  # what kill -9 leaves

    summary = run_batch(None, model_repo=repo, model=None, out=out, resume=True, device="cpu")
    assert summary["counts"] == {"total": len(GOOD) + len(BROKEN), "done": len(GOOD), "failed": len(BROKEN),
                                 "skipped": 0}
    assert [f["input"] for f in summary["failures"]] == BROKEN[:SHOWN] and summary["failures_truncated"]
    failures = _failures_file(out)
    assert [f["input"] for f in failures] == BROKEN  # none lost, none twice
    assert all(f["reason"] for f in failures)
    assert _no_temporaries(out) == []


def test_the_ray_engine_lists_every_failure_in_its_file_and_the_first_in_the_summary(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'segsvc[ray]'")
    monkeypatch.setattr(outputs, "FAILURES_SHOWN", SHOWN, raising=False)  # finalize runs in the driver
    _batch_inputs(tmp_path / "in")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = run_batch([str(tmp_path / "in")], model_repo=repo, model="tiny", out=tmp_path / "out",
                            engine="ray", batch_size=2, device="cpu")
    finally:
        ray.shutdown()
    assert summary["counts"]["failed"] == len(BROKEN) and summary["counts"]["done"] == len(GOOD)
    assert [f["input"] for f in summary["failures"]] == BROKEN[:SHOWN] and summary["failures_truncated"]
    assert [f["input"] for f in _failures_file(tmp_path / "out")] == BROKEN


def test_segsvc_batch_says_how_many_failures_it_did_not_print_and_where_they_are(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from segsvc.cli import main

    monkeypatch.setattr(outputs, "FAILURES_SHOWN", SHOWN, raising=False)
    _batch_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--model-repo", str(repo), "--model", "tiny", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines() if ": error: " in line] == BROKEN[:SHOWN]
    assert f"... and {len(BROKEN) - SHOWN} more failed inputs: all are listed in {out / FAILURES_FILE}" in err
