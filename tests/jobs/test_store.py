"""JobStore: SQLite (WAL) job and item state that survives restarts and kill -9."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from segsvc.errors import AlreadyExists, InvalidArgument, JobNotFound, NotFound, Unavailable
from segsvc.jobs.store import FINISHED_STATES, JOB_STATES, Item, Job, JobStore

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = {"model": "unet", "version": 3, "options": {"tile": 512, "tta": ["hflip"]}, "output_dir": "/out"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "jobs.db"


@pytest.fixture
def store(db_path: Path):
    s = JobStore(db_path)
    yield s
    s.close()


def _raw(path: Path) -> sqlite3.Connection:
    """A connection of our own, to check what is really on disk, not what the store says."""
    return sqlite3.connect(path)


def test_constants() -> None:
    assert JOB_STATES == ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
    assert FINISHED_STATES == {"SUCCEEDED", "FAILED", "CANCELLED"}


def test_file_is_wal_with_schema_version(store: JobStore, db_path: Path) -> None:
    assert db_path.is_file()  # parent directories were created
    with _raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]


def test_submit_get_round_trip(store: JobStore) -> None:
    before = time.time()
    job, created = store.submit("segmentation", SPEC, ["a.png", "b.png", "c.png"], request_id="req-1")
    assert created is True
    assert len(job.id) == 32 and int(job.id, 16) >= 0  # uuid4 hex
    assert (job.kind, job.state, job.request_id, job.spec) == ("segmentation", "QUEUED", "req-1", SPEC)
    assert (job.total, job.done, job.failed, job.skipped) == (3, 0, 0, 0)
    assert (job.started_at, job.finished_at, job.error, job.result) == (None, None, None, None)
    assert job.progress == {} and job.cancel_requested is False and job.finished is False
    assert before <= job.created_at == job.updated_at <= time.time()
    assert job.seq == 1
    assert store.get(job.id) == job
    assert store.items(job.id) == [
        Item(job.id, 0, "a.png", "PENDING", None, None),
        Item(job.id, 1, "b.png", "PENDING", None, None),
        Item(job.id, 2, "c.png", "PENDING", None, None),
    ]
    second, _ = store.submit("training", {}, [], job_id="my-job")
    assert (second.id, second.seq, second.total, second.request_id) == ("my-job", 2, 0, None)
    assert store.items("my-job") == []


def test_idempotent_resubmit_returns_same_job_without_new_items(store: JobStore, db_path: Path) -> None:
    first, created = store.submit("segmentation", SPEC, ["a.png", "b.png"], request_id="req-1")
    # The same spec with keys in another order is the same spec.
    again, created_again = store.submit("segmentation", dict(reversed(SPEC.items())), ["a.png", "b.png"],
                                        request_id="req-1")
    assert (created, created_again) == (True, False)
    assert again == first
    with _raw(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2
    # request_id is unique per kind, not globally.
    other, created_other = store.submit("training", SPEC, ["a.png", "b.png"], request_id="req-1")
    assert created_other is True and other.id != first.id


def test_conflicting_resubmit_raises_already_exists(store: JobStore) -> None:
    job, _ = store.submit("segmentation", SPEC, ["a.png", "b.png"], request_id="req-7")
    with pytest.raises(AlreadyExists, match="req-7"):
        store.submit("segmentation", {**SPEC, "version": 4}, ["a.png", "b.png"], request_id="req-7")
    with pytest.raises(AlreadyExists, match="req-7"):
        store.submit("segmentation", SPEC, ["b.png", "a.png"], request_id="req-7")
    with pytest.raises(AlreadyExists, match=job.id):
        store.submit("segmentation", SPEC, ["x.png"], job_id=job.id)
    assert [j.id for j in store.list()] == [job.id]
    assert [i.input for i in store.items(job.id)] == ["a.png", "b.png"]


def test_finish_item_moves_counters_once(store: JobStore) -> None:
    job, _ = store.submit("segmentation", SPEC, [f"{i}.png" for i in range(5)])
    store.start(job.id)
    assert store.finish_item(job.id, 0, "DONE", result={"mask": "0.mask.png"}) is True
    assert store.finish_item(job.id, 1, "DONE") is True
    assert store.finish_item(job.id, 2, "FAILED", reason="cannot decode") is True
    assert store.finish_item(job.id, 3, "SKIPPED", reason="exists") is True
    # Finishing an item twice (a resumed runner, a racing worker) changes nothing.
    assert store.finish_item(job.id, 0, "FAILED", reason="late") is False
    assert store.finish_item(job.id, 2, "DONE") is False
    got = store.get(job.id)
    assert (got.done, got.failed, got.skipped, got.total) == (2, 1, 1, 5)
    assert store.items(job.id)[0] == Item(job.id, 0, "0.png", "DONE", {"mask": "0.mask.png"}, None)
    assert store.items(job.id, "FAILED") == [Item(job.id, 2, "2.png", "FAILED", None, "cannot decode")]
    assert [i.index for i in store.pending_items(job.id)] == [4]

    store.reset_item(job.id, 2)  # retry the failed one
    store.reset_item(job.id, 4)  # already PENDING: no-op
    got = store.get(job.id)
    assert (got.done, got.failed, got.skipped) == (2, 0, 1)
    assert store.items(job.id)[2] == Item(job.id, 2, "2.png", "PENDING", None, None)
    assert [i.index for i in store.pending_items(job.id)] == [2, 4]
    assert [i.index for i in store.pending_items(job.id, limit=1)] == [2]
    assert store.finish_item(job.id, 2, "DONE") is True
    assert store.get(job.id).done == 3


def test_finish_item_errors(store: JobStore) -> None:
    job, _ = store.submit("segmentation", SPEC, ["a.png"])
    with pytest.raises(InvalidArgument, match="PENDING"):
        store.finish_item(job.id, 0, "PENDING")
    with pytest.raises(NotFound, match="no item 5") as info:
        store.finish_item(job.id, 5, "DONE")
    assert not isinstance(info.value, JobNotFound)
    with pytest.raises(JobNotFound, match="nope"):
        store.finish_item("nope", 0, "DONE")
    with pytest.raises(NotFound, match="no item 1"):
        store.reset_item(job.id, 1)
    assert store.get(job.id).done == 0


def test_concurrent_workers_never_double_count(store: JobStore) -> None:
    job, _ = store.submit("segmentation", SPEC, [f"{i}.png" for i in range(200)])
    wins: list[int] = []

    def worker() -> None:
        wins.extend(i for i in range(200) if store.finish_item(job.id, i, "DONE"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(200))
    assert store.get(job.id).done == 200


def test_list_pages_by_seq_and_filters(store: JobStore) -> None:
    jobs = [store.submit("segmentation" if i % 2 == 0 else "training", {"i": i}, [])[0] for i in range(5)]
    assert [j.seq for j in jobs] == [1, 2, 3, 4, 5]
    page1 = store.list(limit=2)
    page2 = store.list(after_seq=page1[-1].seq, limit=2)
    page3 = store.list(after_seq=page2[-1].seq, limit=2)
    assert [[j.spec["i"] for j in page] for page in (page1, page2, page3)] == [[0, 1], [2, 3], [4]]
    assert store.list(after_seq=5) == []
    assert [j.spec["i"] for j in store.list(kind="segmentation")] == [0, 2, 4]
    assert [j.spec["i"] for j in store.list(kind="training", after_seq=2)] == [3]
    store.start(jobs[1].id)
    store.start(jobs[2].id)
    store.finish(jobs[2].id, "SUCCEEDED")
    assert [j.spec["i"] for j in store.list(states=["RUNNING"])] == [1]
    assert [j.spec["i"] for j in store.list(states={"QUEUED", "SUCCEEDED"})] == [0, 2, 3, 4]
    assert [j.spec["i"] for j in store.list(kind="segmentation", states=["QUEUED"])] == [0, 4]
    assert store.list(states=[]) == []
    assert [j.spec["i"] for j in store.unfinished()] == [0, 1, 3, 4]
    assert [j.spec["i"] for j in store.unfinished("training")] == [1, 3]
    assert store.next_queued().spec["i"] == 0
    assert store.next_queued("training").spec["i"] == 3
    # A deleted job's seq is never handed out again, so paging cursors stay valid.
    store.delete(jobs[4].id)
    assert store.submit("training", {"i": 5}, [])[0].seq == 6


def test_start_and_finish(store: JobStore) -> None:
    job, _ = store.submit("segmentation", SPEC, ["a.png"])
    running = store.start(job.id)
    assert running.state == "RUNNING" and running.started_at is not None and running.finished_at is None
    assert store.start(job.id).started_at == running.started_at  # resuming does not restart the clock
    done = store.finish(job.id, "SUCCEEDED", result={"outputs": ["a.mask.png"]})
    assert (done.state, done.finished, done.error) == ("SUCCEEDED", True, None)
    assert done.result == {"outputs": ["a.mask.png"]}
    assert done.finished_at >= done.started_at
    assert store.get(job.id) == done
    with pytest.raises(InvalidArgument, match="already finished as SUCCEEDED"):
        store.finish(job.id, "FAILED", error="late")
    with pytest.raises(InvalidArgument, match="SUCCEEDED"):
        store.start(job.id)
    other, _ = store.submit("segmentation", SPEC, ["a.png"])
    with pytest.raises(InvalidArgument, match="RUNNING"):
        store.finish(other.id, "RUNNING")
    failed = store.finish(other.id, "FAILED", error="")  # str(KeyError()) is '': still a valid error
    assert (failed.state, failed.error, failed.started_at) == ("FAILED", "", None)
    assert store.next_queued() is None


def test_request_cancel_queued_running_finished(store: JobStore) -> None:
    queued, _ = store.submit("segmentation", SPEC, ["a.png"])
    running, _ = store.submit("segmentation", SPEC, ["a.png"])
    finished, _ = store.submit("segmentation", SPEC, ["a.png"])
    store.start(running.id)
    store.start(finished.id)
    finished = store.finish(finished.id, "SUCCEEDED")

    cancelled = store.request_cancel(queued.id)
    assert (cancelled.state, cancelled.cancel_requested, cancelled.finished) == ("CANCELLED", True, True)
    assert cancelled.finished_at is not None
    with pytest.raises(InvalidArgument, match="CANCELLED"):
        store.start(queued.id)  # a runner that picked it up just before must not run it

    flagged = store.request_cancel(running.id)
    assert (flagged.state, flagged.cancel_requested, flagged.finished_at) == ("RUNNING", True, None)
    assert store.finish(running.id, "CANCELLED").state == "CANCELLED"

    assert store.request_cancel(finished.id) == finished  # unchanged, flag not set
    assert store.get(finished.id).cancel_requested is False
    assert store.next_queued() is None and store.unfinished() == []


def test_set_progress_replaces_and_bumps_updated_at(store: JobStore) -> None:
    job, _ = store.submit("training", {"recipe": "unet.yaml"}, [])
    store.set_progress(job.id, {"epoch": 1, "eta_s": 30.5})
    store.set_progress(job.id, {"epoch": 2})
    got = store.get(job.id)
    assert got.progress == {"epoch": 2}
    assert got.updated_at >= job.updated_at
    with pytest.raises(InvalidArgument, match="JSON"):
        store.set_progress(job.id, {"eta_s": float("inf")})
    with pytest.raises(InvalidArgument, match="dict"):
        store.set_progress(job.id, [1, 2])  # type: ignore[arg-type]
    assert store.get(job.id).progress == {"epoch": 2}


def test_reopen_sees_the_same_state(db_path: Path) -> None:
    first = JobStore(db_path)
    a, _ = first.submit("segmentation", SPEC, ["a.png", "b.png", "c.png"], request_id="r")
    b, _ = first.submit("training", {"recipe": "x"}, [])
    c, _ = first.submit("segmentation", SPEC, ["d.png"])
    first.start(a.id)
    first.finish_item(a.id, 0, "DONE", result={"mask": "a"})
    first.finish_item(a.id, 1, "SKIPPED", reason="exists")
    first.set_progress(a.id, {"images_per_s": 12.5})
    first.request_cancel(c.id)
    snapshot = {j.id: j for j in first.list()}
    items_before = first.items(a.id)
    first.close()
    with pytest.raises(Unavailable, match="closed"):
        first.get(a.id)

    second = JobStore(db_path)
    try:
        assert {j.id: j for j in second.list()} == snapshot
        assert [(j.id, j.state) for j in second.unfinished()] == [(a.id, "RUNNING"), (b.id, "QUEUED")]
        resumed = second.get(a.id)
        assert (resumed.done, resumed.skipped, resumed.progress) == (1, 1, {"images_per_s": 12.5})
        assert second.items(a.id) == items_before
        assert [i.input for i in second.pending_items(a.id)] == ["c.png"]
        again = second.submit("segmentation", SPEC, ["a.png", "b.png", "c.png"], request_id="r")
        assert again == (snapshot[a.id], False)
    finally:
        second.close()


def test_other_schema_version_is_refused(db_path: Path) -> None:
    JobStore(db_path).close()
    with _raw(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(InvalidArgument, match="schema version 99"):
        JobStore(db_path)


CHILD = textwrap.dedent("""
    import os, random, signal, sys, threading
    from segsvc.jobs.store import JobStore

    path, mode, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = JobStore(path)
    job, _ = store.submit("segmentation", {"model": "unet"}, [f"{i}.png" for i in range(total)], request_id="crash")
    store.start(job.id)
    print("job", job.id, flush=True)
    if mode == "timer":  # die at an arbitrary moment, quite possibly inside a transaction
        threading.Timer(random.uniform(0.05, 0.3), os.kill, (os.getpid(), signal.SIGKILL)).start()
    for i in range(total):
        store.finish_item(job.id, i, "DONE", result={"i": i})
        store.set_progress(job.id, {"done": i + 1})
        print(i, flush=True)  # only after the commit: every printed index must survive
        if mode == "loop" and i == 36:
            os.kill(os.getpid(), signal.SIGKILL)
    print("finished without being killed", flush=True)
""")


@pytest.mark.parametrize("mode, total", [("loop", 100), ("timer", 50_000)])
def test_kill_9_loses_nothing_committed(db_path: Path, mode: str, total: int) -> None:
    db_path.parent.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(db_path), mode, str(total)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-500:] + proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    job_id = lines[0].split()[1]
    # The last line may have been cut by the kill; every complete one was printed after its commit.
    printed = [int(line) for line in lines[1:-1]]
    assert printed == list(range(len(printed)))

    store = JobStore(db_path)
    try:
        job = store.get(job_id)
        done = store.items(job_id, "DONE")
        n_done = len(done)
        # Items commit in order, so the DONE ones are a prefix: every printed one, plus at most
        # the one whose commit landed just before the kill.
        assert [i.index for i in done] == list(range(n_done))
        assert len(printed) <= n_done <= len(printed) + 1
        if mode == "loop":
            assert n_done == 37
        assert all(i.result == {"i": i.index} for i in done)
        assert (job.state, job.total, job.done, job.failed, job.skipped) == ("RUNNING", total, n_done, 0, 0)
        assert job.progress in ({"done": n_done}, {"done": n_done - 1}, {})
        items = store.items(job_id)
        assert [i.index for i in items] == list(range(total))  # each item exactly once, none half-written
        assert len(store.pending_items(job_id)) == total - n_done
        assert [j.id for j in store.unfinished()] == [job_id]
        with _raw(db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # The runner resumes where it stopped and the counters come out exact.
        for item in store.pending_items(job_id, limit=5):
            assert store.finish_item(job_id, item.index, "DONE")
        assert store.get(job_id).done == n_done + min(5, total - n_done)
    finally:
        store.close()


def test_unknown_ids_raise_job_not_found(store: JobStore) -> None:
    calls = [
        lambda: store.get("missing-id"),
        lambda: store.start("missing-id"),
        lambda: store.finish("missing-id", "FAILED"),
        lambda: store.request_cancel("missing-id"),
        lambda: store.set_progress("missing-id", {}),
        lambda: store.pending_items("missing-id"),
        lambda: store.items("missing-id"),
        lambda: store.reset_item("missing-id", 0),
        lambda: store.delete("missing-id"),
    ]
    for call in calls:
        with pytest.raises(JobNotFound, match="missing-id") as info:
            call()
        assert isinstance(info.value, NotFound)


def test_delete_removes_job_and_items(store: JobStore, db_path: Path) -> None:
    gone, _ = store.submit("segmentation", SPEC, ["a.png", "b.png"], request_id="r")
    kept, _ = store.submit("segmentation", SPEC, ["c.png"])
    store.start(gone.id)
    store.delete(gone.id)
    with pytest.raises(JobNotFound):
        store.get(gone.id)
    with pytest.raises(JobNotFound):
        store.delete(gone.id)
    with _raw(db_path) as conn:
        assert conn.execute("SELECT job_id, input FROM items").fetchall() == [(kept.id, "c.png")]
    assert [j.id for j in store.list()] == [kept.id]
    # The request_id is free again once its job is deleted.
    assert store.submit("segmentation", SPEC, ["z.png"], request_id="r")[1] is True


def test_submit_10000_items_is_one_transaction(store: JobStore) -> None:
    """The statements SQLite runs are counted, not timed: one transaction (one commit, one fsync) and one
    repeated INSERT, not a transaction or a query per item."""
    inputs = [f"images/{i:05d}.png" for i in range(10_000)]
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    try:
        job, _ = store.submit("segmentation", SPEC, inputs)
    finally:
        store._connection().set_trace_callback(None)
    items = [s for s in statements if s.startswith("INSERT INTO items")]
    others = [s for s in statements if not s.startswith("INSERT INTO items")]
    assert len(items) == 10_000
    assert [s for s in others if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
    assert len(others) <= 5, others
    assert store.get(job.id).total == 10_000
    pending = store.pending_items(job.id)
    assert len(pending) == 10_000 and pending[-1] == Item(job.id, 9_999, "images/09999.png", "PENDING", None, None)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.submit("", {}, []), "kind"),
    (lambda s: s.submit("segmentation", {}, "a.png"), "sequence of strings"),
    (lambda s: s.submit("segmentation", {}, ["a.png", 3]), r"inputs\[1\]"),
    (lambda s: s.submit("segmentation", ["not", "a", "dict"], []), "dict"),
    (lambda s: s.submit("segmentation", {"x": float("nan")}, []), "JSON"),
    (lambda s: s.submit("segmentation", {"x": object()}, []), "JSON"),
    (lambda s: s.submit("segmentation", {}, [], request_id=""), "request_id"),
    (lambda s: s.list(states=["DONE"]), "unknown job state 'DONE'"),
    (lambda s: s.list(states="QUEUED"), "not the string"),
    (lambda s: s.list(limit=0), "limit"),
    (lambda s: s.list(after_seq=-1), "after_seq"),
    (lambda s: s.items("x", state="RUNNING"), "unknown item state"),
    (lambda s: s.pending_items("x", limit=0), "limit"),
])
def test_arguments_are_validated(store: JobStore, call, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        call(store)
    assert store.list() == []


def test_job_is_a_frozen_snapshot(store: JobStore) -> None:
    job, _ = store.submit("segmentation", SPEC, [])
    assert isinstance(job, Job)
    with pytest.raises(AttributeError):
        job.state = "RUNNING"  # type: ignore[misc]


def test_find_by_request_id(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("segmentation", {"a": 1}, ["x.png"], request_id="r-1")
    store.submit("training", {"a": 2}, [], request_id="r-1")
    assert store.find("segmentation", "r-1").id == job.id
    assert store.find("training", "r-1").id != job.id
    assert store.find("segmentation", "r-2") is None


# -- a resource named in specs is released only while no job references it ----------------------------
def test_release_unreferenced_checks_every_job_in_the_same_transaction(store: JobStore) -> None:
    released: list[str] = []
    job, _ = store.submit("segmentation", {"request": {"upload_id": "u1"}}, ["a.png"])
    store.submit("training", {"request": "not an object"}, [])  # other spec shapes simply do not match
    assert not store.release_unreferenced("$.request.upload_id", "u1", lambda: released.append("u1"))
    store.finish(job.id, "SUCCEEDED")  # any state references it
    assert not store.release_unreferenced("$.request.upload_id", "u1", lambda: released.append("u1"))
    store.delete(job.id)
    assert store.release_unreferenced("$.request.upload_id", "u1", lambda: released.append("u1"))
    assert released == ["u1"]
    with pytest.raises(InvalidArgument, match="JSON path"):
        store.release_unreferenced("request.upload_id", "u1", lambda: None)


def test_a_failing_precondition_refuses_the_submission(store: JobStore) -> None:
    def gone() -> None:
        raise NotFound("upload gone")

    with pytest.raises(NotFound, match="upload gone"):
        store.submit("segmentation", SPEC, ["a.png"], precondition=gone)
    assert store.list() == []
    job, created = store.submit("segmentation", SPEC, ["a.png"], precondition=lambda: None)
    assert created and store.get(job.id).total == 1


def test_item_reads_one_item_and_names_a_missing_one(store: JobStore) -> None:
    job, _ = store.submit("segmentation", {}, ["a.png", "b.png"])
    assert store.finish_item(job.id, 1, "FAILED", reason="undecodable")
    item = store.item(job.id, 1)
    assert (item.index, item.input, item.state, item.reason) == (1, "b.png", "FAILED", "undecodable")
    with pytest.raises(NotFound, match="no item 2"):
        store.item(job.id, 2)
    with pytest.raises(JobNotFound):
        store.item("nope", 0)
