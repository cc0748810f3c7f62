"""Batch jobs at scale: a cancel skips its items in a few transactions, ``segsvc batch`` registers its inputs in
bounded chunks that a rerun after ``kill -9`` completes, and a read-only output folder is named as the reason."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segsvc.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from segsvc.jobs import batch
from segsvc.jobs import inputs as inputs_module
from segsvc.jobs import outputs as outputs_module
from segsvc.jobs.batch import JobRequest, JobRunner
from segsvc.jobs.inputs import resolve_inputs
from segsvc.jobs.offline import STATE_FILE, run_batch
from segsvc.jobs.outputs import JobOutputs
from segsvc.jobs.store import Job, JobStore
from tests.jobs.conftest import cancel_inside_start, run_to_end
from tests.jobs.test_batch_runner import _Clock, _config, _images, _Service
from tests.server.conftest import encode, make_image, publish

REPO_ROOT = Path(__file__).resolve().parents[2]


def _statements(store: JobStore) -> list[str]:
    """Every SQL statement the store's connection runs from now on (``executemany``: one per row)."""
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)  # type: ignore[union-attr]
    return seen


# -- 1: a cancel skips the pending items in one transaction per chunk, not one per item -------------------
def test_cancelling_a_large_running_job_skips_its_items_in_a_few_transactions(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    names = [f"{i:04d}.png" for i in range(300)]  # never read: the cancel comes before any item runs
    spec = {"request": JobRequest(model="m", paths=(".",)).to_dict(), "model": "m", "version": 1}
    job, _ = store.submit(batch.KIND, spec, names)
    (tmp_path / "data").mkdir()
    runner = JobRunner(store, _Service(_Clock()), _config(tmp_path))  # type: ignore[arg-type]
    stale = runner.output_dir(job.id) / "labels" / "0007.png.png"  # a killed run renamed it in, never recorded it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"png of a killed run")
    statements = _statements(store)

    async def main() -> Job:
        cancel_inside_start(monkeypatch, store, runner, asyncio.get_running_loop())
        return await run_to_end(runner, job.id)

    final = asyncio.run(main())
    items = store.items(job.id)
    store.close()
    assert (final.state, final.skipped, final.done) == ("CANCELLED", 300, 0)
    assert {(i.state, i.reason) for i in items} == {("SKIPPED", "cancelled")}
    assert not stale.exists()  # no file outlives its item's record
    item_updates = [s for s in statements if s.startswith("UPDATE items")]
    commits = [s for s in statements if s == "COMMIT"]
    assert len(item_updates) <= 2, f"{len(item_updates)} item updates for 300 items"
    assert len(commits) <= 10, f"{len(commits)} transactions to cancel a 300-item job"


def test_skip_pending_moves_the_counter_once_per_item_and_leaves_finished_items(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("segmentation", {}, ["a", "b", "c", "d", "e"], failed={4: "bad"})
    store.start(job.id)
    store.finish_item(job.id, 1, "DONE", result={})
    statements = _statements(store)
    assert store.skip_pending(job.id, "cancelled", through=2) == 2  # items 0 and 2; 1 is DONE
    assert store.skip_pending(job.id, "cancelled") == 1  # item 3
    assert store.skip_pending(job.id, "cancelled") == 0
    got = store.get(job.id)
    assert (got.done, got.failed, got.skipped) == (1, 1, 3)
    assert [i.state for i in store.items(job.id)] == ["SKIPPED", "DONE", "SKIPPED", "SKIPPED", "FAILED"]
    assert statements.count("COMMIT") == 3
    store.close()


# -- 2: the store's chunked submission -----------------------------------------------------------------
def test_a_chunked_submission_inserts_at_most_a_chunk_per_transaction(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    statements = _statements(store)
    inputs = [f"{i}.png" for i in range(10)]
    job, created = store.submit("batch", {"k": 1}, inputs, failed={2: "x", 8: "y"}, request_id="r", chunk_size=3)
    per_tx, inserts = [], 0
    for sql in statements:
        if sql.startswith("INSERT INTO items"):
            inserts += 1
        elif sql == "COMMIT":
            per_tx.append(inserts)
            inserts = 0
    assert created and max(per_tx) == 3 and sum(per_tx) == 10
    assert (job.total, job.failed, store.missing_items(job.id)) == (10, 2, 0)
    assert [i.input for i in store.items(job.id)] == inputs
    statements.clear()
    again, created = store.submit("batch", {"k": 1}, inputs, failed={2: "x", 8: "y"}, request_id="r", chunk_size=3)
    assert (again.id, created, again.failed) == (job.id, False, 2)
    assert not [s for s in statements if s.startswith("INSERT")]
    store.close()


# -- 2: segsvc batch registers its inputs in chunks; a rerun after kill -9 completes them --------------------
INPUTS = [f"img{i:02d}.png" for i in range(10)]
BROKEN = "img04.png"  # FAILED when the run reads it: the counters must come out right

# Chunks of 3 inputs; the run kills itself as the third chunk starts, so two are committed.
KILLED_REGISTRATION = textwrap.dedent("""
    import os, signal, sys
    from segsvc.jobs import offline, store
    offline.REGISTER_CHUNK = 3
    init = store.JobStore.__init__
    inserted = [0]
    def trace(sql):
        if sql.startswith("INSERT INTO items"):
            inserted[0] += 1
            if inserted[0] == 7:
                os.kill(os.getpid(), signal.SIGKILL)
    def traced_init(self, path):
        init(self, path)
        self._conn.set_trace_callback(trace)
    store.JobStore.__init__ = traced_init
    offline.run_batch([sys.argv[1]], model_repo=sys.argv[2], model="tiny", out=sys.argv[3], device="cpu")
""")


@pytest.fixture(scope="module")
def killed_registration(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ``segsvc batch`` killed (SIGKILL) while registering its inputs; copied by each test that uses it."""
    root = tmp_path_factory.mktemp("registration")
    publish(root / "repo", "tiny", seed=1)
    for i, name in enumerate(INPUTS):
        (root / "in").mkdir(exist_ok=True)
        data = encode(make_image(16, 16, seed=i))
        (root / "in" / name).write_bytes(data[:40] if name == BROKEN else data)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_REGISTRATION, str(root / "in"), str(root / "repo"),
                           str(root / "out")], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    return {"repo": root / "repo", "inputs": root / "in", "out": root / "out"}


def _copy(killed: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(killed["out"], out)
    return out


def _items(out: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(out / STATE_FILE) as db:
        return db.execute("SELECT idx, input, state FROM items ORDER BY idx").fetchall()


def test_a_kill_during_registration_keeps_the_committed_chunks(killed_registration, tmp_path: Path) -> None:
    out = _copy(killed_registration, tmp_path)
    assert [(idx, name) for idx, name, _ in _items(out)] == list(enumerate(INPUTS[:6]))


def test_resume_after_a_kill_during_registration_neither_loses_nor_duplicates_inputs(killed_registration,
                                                                                     tmp_path: Path) -> None:
    out = _copy(killed_registration, tmp_path)
    summary = run_batch(None, model_repo=killed_registration["repo"], model=None, out=out, resume=True,
                        device="cpu")
    assert summary["counts"] == {"total": 10, "done": 9, "failed": 1, "skipped": 0}
    assert [(idx, name) for idx, name, _ in _items(out)] == list(enumerate(INPUTS))
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{n}.png" for n in INPUTS if n != BROKEN]


def test_the_same_command_again_after_a_kill_during_registration_completes_that_batch(killed_registration,
                                                                                     tmp_path: Path) -> None:
    out = _copy(killed_registration, tmp_path)
    summary = run_batch([str(killed_registration["inputs"])], model_repo=killed_registration["repo"],
                        model="tiny", out=out, device="cpu")
    assert summary["counts"] == {"total": 10, "done": 9, "failed": 1, "skipped": 0}
    assert [(idx, name) for idx, name, _ in _items(out)] == list(enumerate(INPUTS))
    with sqlite3.connect(out / STATE_FILE) as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_inputs_changed_after_a_kill_during_registration_are_refused(killed_registration, tmp_path: Path) -> None:
    out = _copy(killed_registration, tmp_path)
    inputs = tmp_path / "in"
    shutil.copytree(killed_registration["inputs"], inputs)
    with sqlite3.connect(out / STATE_FILE) as db:  # the batch was started on this copy of the inputs
        spec = db.execute("SELECT spec FROM jobs").fetchone()[0]
        db.execute("UPDATE jobs SET spec = ?", (spec.replace(str(killed_registration["inputs"]), str(inputs)),))
    (inputs / "img00a.png").write_bytes(encode(make_image(16, 16, seed=99)))  # shifts every later index
    with pytest.raises(InvalidArgument, match="inputs changed"):
        run_batch(None, model_repo=killed_registration["repo"], model=None, out=out, resume=True, device="cpu")
    with pytest.raises(AlreadyExists, match="interrupted"):
        run_batch([str(inputs)], model_repo=killed_registration["repo"], model="tiny", out=out, device="cpu")
    assert [(idx, name) for idx, name, _ in _items(out)] == list(enumerate(INPUTS[:6]))


# -- 3: a read-only output folder while removing an input's files ------------------------------------------
def _read_only_under(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unlink = os.unlink

    def read_only(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.fsdecode(path).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(outputs_module.os, "unlink", read_only)


def test_remove_item_on_a_read_only_folder_raises_a_domain_error_without_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_only_under(tmp_path, monkeypatch)
    with pytest.raises(FailedPrecondition) as caught:
        JobOutputs(tmp_path / "out").remove_item("a/x.png")
    message = str(caught.value)
    assert "Read-only file system" in message and "'a/x.png'" in message
    assert str(tmp_path) not in message


def test_a_read_only_output_folder_fails_the_job_with_the_reason_not_internal_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", ["a.png"])
    (tmp_path / "data" / "b.png").write_bytes(b"not an image: its item fails, so its files are removed")
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    _read_only_under(tmp_path / "out", monkeypatch)

    async def main() -> Job:
        runner = JobRunner(store, _Service(_Clock()), _config(tmp_path, window=1))  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=(".",)))
        return await run_to_end(runner, job.id)

    final = asyncio.run(main())
    store.close()
    assert final.state == "FAILED"
    assert final.error is not None and "Read-only file system" in final.error, final.error
    assert "internal error" not in final.error and str(tmp_path) not in final.error


# -- listing inputs: one huge folder is not read to its end before the entry budget refuses it -----------
def test_a_huge_folder_is_refused_before_it_is_listed_to_its_end(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(400):
        (tmp_path / f"notes{i:03d}.txt").write_text("x")
    read: list[str] = []
    scandir = os.scandir

    class CountingScandir:
        """``os.scandir`` that counts the entries its caller pulls from it."""

        def __init__(self, path: str) -> None:
            self._it = scandir(path)

        def __enter__(self) -> "CountingScandir":
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> "CountingScandir":
            return self

        def __next__(self) -> os.DirEntry:
            entry = next(self._it)
            read.append(entry.name)
            return entry

    monkeypatch.setattr(inputs_module.os, "scandir", CountingScandir)
    with pytest.raises(InvalidArgument, match="more than 40 entries"):
        resolve_inputs(tmp_path, ["."], max_files=2)
    assert len(read) <= 41, f"read {len(read)} entries of a folder to refuse it past 40"


# -- a job cancelled while QUEUED accounts for every item, as one cancelled while running does ----------------
def test_a_job_cancelled_while_queued_counts_its_items_skipped(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("segmentation", {}, ["a", "b", "c"], failed={1: "bad name"})
    statements = _statements(store)
    cancelled = store.request_cancel(job.id)
    assert (cancelled.state, cancelled.failed, cancelled.skipped) == ("CANCELLED", 1, 2)
    assert [(i.state, i.reason) for i in store.items(job.id)] == [
        ("SKIPPED", "cancelled"), ("FAILED", "bad name"), ("SKIPPED", "cancelled")]
    assert statements.count("COMMIT") == 1
    store.close()


def test_a_job_cancelled_between_the_schedulers_pick_and_its_start_ends_quietly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    spec = {"request": JobRequest(model="m", paths=(".",)).to_dict(), "model": "m", "version": 1}
    job, _ = store.submit(batch.KIND, spec, ["a.png", "b.png"])
    (tmp_path / "data").mkdir()
    runner = JobRunner(store, _Service(_Clock()), _config(tmp_path))  # type: ignore[arg-type]
    start = store.start
    reached: list[asyncio.Future] = []  # set once the job's task has called store.start

    def cancelled_first(job_id: str) -> Job:
        store.request_cancel(job_id)  # lands after the scheduler took the QUEUED job, before it starts it
        future = reached[0]
        future.get_loop().call_soon_threadsafe(future.set_result, None)
        return start(job_id)

    monkeypatch.setattr(store, "start", cancelled_first)

    async def main() -> BaseException | None:
        reached.append(asyncio.get_running_loop().create_future())
        await runner.start()
        try:
            await asyncio.wait_for(reached[0], 60)
            (task,) = runner._tasks.values()  # the job's task: it called store.start
            await asyncio.wait({task})
            return task.exception()
        finally:
            await runner.stop()

    with caplog.at_level("ERROR", logger="segsvc.jobs"):
        raised = asyncio.run(main())
    final = store.get(job.id)
    store.close()
    assert raised is None, f"the job's task raised {raised!r}"
    assert (final.state, final.skipped, final.error) == ("CANCELLED", 2, None)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
