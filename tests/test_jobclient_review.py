"""From a review of the jobs client: downloads put on disk, what a killed fetch left, server names that cannot be
files (or come twice), a stalled fetch, waits on a server that answers too early, a deadline that passed, a hung
server during ``segsvc jobs wait``, a cancelled job's message.

Durability is checked by the order of the calls (fsync, rename), never by timing; a clock is faked where a wait
is paced.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, status_pb2

from segsvc import cli_jobs, downloads, jobclient
from segsvc.client import SegmentationClient
from segsvc.downloads import FIRST_WAIT_FACTOR, _Incoming, _temp_prefix, _Watchdog
from segsvc.errors import Cancelled, DeadlineExceeded, InvalidArgument, SegsvcError
from segsvc.jobclient import JobHandle, download
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import training_pb2 as tpb
from tests.rpc_errors import StatusError


def _chunk(path: str, offset: int, data: bytes, last: bool) -> jobs_pb.FileChunk:
    return jobs_pb.FileChunk(path=path, offset=offset, data=data, last=last)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- downloads reach the disk ---------------------------------------------------------------------------------
class Disk:
    """Every fsync (the path of its descriptor) and rename or replace (its target), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, Path]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd: int) -> None:
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
            real_fsync(fd)

        def moved(real):  # type: ignore[no-untyped-def]
            def move(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
                self.events.append(("data-of", Path(src).resolve()))
                real(src, dst, *args, **kwargs)
                self.events.append(("rename", Path(dst).resolve()))
            return move

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", moved(real_replace))
        monkeypatch.setattr(os, "rename", moved(real_rename))

    def index(self, event: tuple[str, Path]) -> int:
        return max(i for i, e in enumerate(self.events) if e == event)


def test_a_downloaded_file_is_synced_before_its_rename_and_its_folders_after(tmp_path, monkeypatch):
    """``download`` closed and renamed each file without a fsync, and never synced a folder: after a power cut a
    fetched label map could be empty under its final name, or missing, while ``jobs fetch`` had said it was in."""
    dest = tmp_path / "dest"
    disk = Disk(monkeypatch)
    stream = [_chunk("a.png", 0, b"AA", False), _chunk("a.png", 2, b"BB", True), _chunk("sub/c.png", 0, b"C", True)]
    written = download(stream, dest)
    assert _files(dest) == {"a.png": b"AABB", "sub/c.png": b"C"}
    for path in written:
        temp = disk.events[disk.index(("rename", path)) - 1][1]  # the temporary renamed onto it
        assert ("fsync", temp) in disk.events[:disk.index(("rename", path))], disk.events  # its data first
        synced_after = disk.events[disk.index(("rename", path)):]
        assert ("fsync", path.parent) in synced_after, disk.events  # then the rename itself
    # the folders the download made are entries of their parents: synced too, after they were made
    assert ("fsync", tmp_path.resolve()) in disk.events, disk.events
    assert ("fsync", dest.resolve()) in disk.events[disk.index(("rename", dest.resolve() / "sub" / "c.png")):]


def test_a_fetch_run_again_removes_what_a_killed_one_left(tmp_path):
    """A fetch killed half way (kill -9, a power cut) left its temporary, up to the whole file less a chunk; the
    fetch run again replaced the file and kept the temporary beside it forever. Files the server sends, even named
    like a temporary, are kept."""
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f"{_temp_prefix('a.png')}0123456789ab",
             tmp_path / "sub" / f"{_temp_prefix('c.png')}abcdefabcdef"]
    for path in stale:
        path.write_bytes(b"half")
    other = tmp_path / f"{_temp_prefix('b.png')}0123456789ab"  # of a file this fetch does not send: not its
    other.write_bytes(b"half")
    served = ".d.png.part-0123456789ab"
    stream = [_chunk(served, 0, b"D", True), _chunk("a.png", 0, b"A", True), _chunk("sub/c.png", 0, b"C", True),
              _chunk("d.png", 0, b"d", True)]
    download(stream, tmp_path)
    assert _files(tmp_path) == {"a.png": b"A", "sub/c.png": b"C", "d.png": b"d", served: b"D", other.name: b"half"}


def test_a_fetch_leaves_the_temporaries_another_fetch_still_writes(tmp_path):
    """Two fetches into one folder (a retry started in a second terminal): the one that finished a file removed
    the other's open temporary of it, whose rename then failed; and every name alike in its first 32 characters
    shared one temporary prefix, so finishing one file removed the others' temporaries too."""
    names = ["frontcamera_2026-11-25T10-00-00_000001.png", "frontcamera_2026-11-25T10-00-00_000002.png"]
    other = [_Incoming(tmp_path / name, name) for name in names]  # the other fetch, still writing both
    try:
        download([_chunk(name, 0, b"mine", True) for name in names], tmp_path)
        for incoming in other:
            incoming.write(_chunk(incoming.name, 0, b"theirs", True))
            incoming.finish()  # its temporary is still there to rename
    finally:
        for incoming in other:
            incoming.file.close()
    assert _files(tmp_path) == {name: b"theirs" for name in names}


def test_the_wait_for_the_first_chunk_has_a_longer_limit():
    """Before its first chunk the server lists the job's outputs (minutes for millions of files on slow storage):
    the idle limit cut every fetch of such a job at that point, and every retry again. Waiting for it without any
    limit instead hung a fetch whose connection died before then, for ever."""
    seen: list[tuple[float | None, float]] = []
    chunks = [_chunk("a.png", 0, b"A", True), _chunk("b.png", 0, b"B", True)]

    class Stream(_Call):
        def __next__(self) -> jobs_pb.FileChunk:
            seen.append((dog._waiting_since, dog._limit_s))
            return super().__next__()

    dog = _Watchdog(Stream(chunks, stall=False), 60.0)
    try:
        assert [c.path for c in dog.chunks()] == ["a.png", "b.png"]
    finally:
        dog.stop()
    assert all(since is not None for since, _ in seen), seen  # every wait is timed
    assert [limit for _, limit in seen] == [60.0 * FIRST_WAIT_FACTOR, 60.0, 60.0]


def test_a_server_silent_before_its_first_chunk_ends_the_fetch_at_the_longer_limit(tmp_path):
    call = _Call([])  # it sends nothing at all
    outcome = _in_thread(lambda: download(call, tmp_path / "dest", idle_timeout_s=0.02))
    assert outcome and isinstance(outcome[0], DeadlineExceeded), outcome
    assert str(outcome[0]).startswith(f"the server sent nothing for {0.02 * FIRST_WAIT_FACTOR:g} s; 0 whole files")


# -- names a server may send ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a\x00b.png", "sub/\x00"], ids=["nul-in-name", "nul-in-last-part"])
def test_a_name_with_a_nul_byte_is_refused_in_one_line(tmp_path, name):
    """A name with a NUL byte raised ValueError ("embedded null byte") out of ``Path.resolve``: a traceback
    from `segsvc jobs fetch` instead of the one-line refusal of any other bad name."""
    dest = tmp_path / "dest"
    with pytest.raises(InvalidArgument, match="the server sent a file name with a NUL byte"):
        download([_chunk(name, 0, b"x", True)], dest)
    assert not dest.exists() or _files(dest) == {}


@pytest.mark.parametrize("second", ["a.png", "sub/../a.png"])
def test_a_file_sent_twice_is_refused(tmp_path, second):
    """A second copy of a name replaced the first without a word, and `jobs fetch` counted both ("fetched 2
    files")."""
    stream = [_chunk("a.png", 0, b"first", True), _chunk(second, 0, b"second", True)]
    with pytest.raises(InvalidArgument, match=f"the server sent {second!r} twice"):
        download(stream, tmp_path)
    assert _files(tmp_path) == {"a.png": b"first"}


def test_a_name_near_the_length_limit_is_fetched(tmp_path):
    """A 250-byte name (an input named at length, plus ".png") failed with "File name too long": the temporary
    it was written under added 19 bytes to it."""
    name = "n" * 246 + ".png"
    assert download([_chunk(name, 0, b"x", True)], tmp_path) == [tmp_path.resolve() / name]
    assert _files(tmp_path) == {name: b"x"}


def test_a_symlink_in_the_folder_is_not_followed_out_and_the_refusal_says_so(tmp_path):
    """A symlink in the output folder leading out of it was refused (nothing written through it), but the
    refusal blamed the server ("the server sent a file outside the folder: 'labels/a.png'") for a name that is
    fine: the user looked for a hostile server instead of at their own link."""
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "labels").symlink_to(elsewhere)
    with pytest.raises(InvalidArgument, match=r"'labels/a.png' leads out of the folder through a symlink in it"):
        download([_chunk("labels/a.png", 0, b"x", True)], dest)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("where", ["inside", "the-folder"])
def test_a_symlink_loop_is_refused_in_one_line(tmp_path, where):
    """A symlink loop in the output folder (or the folder itself one) raised RuntimeError ("Symlink loop from
    ...") out of ``Path.resolve``: a traceback from `segsvc jobs fetch`."""
    dest = tmp_path / "dest"
    if where == "inside":
        dest.mkdir()
        (dest / "labels").symlink_to("labels")
    else:
        dest.symlink_to("dest")
    with pytest.raises(InvalidArgument, match="a symlink loop"):
        download([_chunk("labels/a.png", 0, b"x", True)], dest)


# -- a stream that ends early, or stalls ----------------------------------------------------------------------
class _Call:
    """A server stream as gRPC's call object: iterable, with ``cancel``; after ``chunks`` it stalls until
    cancelled (then it raises CANCELLED, as gRPC does)."""

    def __init__(self, chunks: list[jobs_pb.FileChunk], stall: bool = True) -> None:
        self._chunks = iter(chunks)
        self.stall = stall
        self.cancelled = threading.Event()

    def __iter__(self) -> "_Call":
        return self

    def __next__(self) -> jobs_pb.FileChunk:
        for chunk in self._chunks:
            return chunk
        if not self.stall:
            raise StopIteration
        self.cancelled.wait()
        raise StatusError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


def test_a_download_refused_half_way_cancels_the_stream(tmp_path):
    """A refused name left the call running: the server went on reading and sending the job's outputs (and held
    a stream of --max-concurrent-rpcs) until the call object was garbage collected; in a notebook, that is as
    long as the traceback is kept."""
    call = _Call([_chunk("a.png", 0, b"A", True), _chunk("../x.png", 0, b"x", True), _chunk("b.png", 0, b"B", True)],
                 stall=False)
    with pytest.raises(InvalidArgument, match="outside the folder"):
        download(call, tmp_path / "dest")
    assert call.cancelled.is_set()


def _in_thread(fn) -> list:  # type: ignore[no-untyped-def]
    """Run ``fn`` on a thread; its result or exception, or an empty list when it still blocks after long."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)  # only bounds a hang (the bug); the passing path ends as soon as the idle limit passes
    return outcome


def test_a_stalled_download_ends_after_the_idle_limit_and_keeps_the_whole_files(tmp_path):
    """A server that stopped sending (hung, or a network that dropped silently) kept `segsvc jobs fetch` waiting
    forever: the stream had no deadline, and --timeout-s did not apply to it."""
    dest = tmp_path / "dest"
    call = _Call([_chunk("a.png", 0, b"whole", True), _chunk("b.png", 0, b"half", False)])
    outcome = _in_thread(lambda: download(call, dest, idle_timeout_s=0.2))
    assert outcome, "the download still waits on a server that sends nothing"
    [error] = outcome
    assert isinstance(error, DeadlineExceeded), error
    assert str(error).startswith("the server sent nothing for 0.2 s while 'b.png' was at 4 bytes"), error
    assert call.cancelled.is_set()
    assert _files(dest) == {"a.png": b"whole"}  # no half b.png, no temporary


def test_a_fetch_from_a_real_server_that_stalls_ends_with_the_idle_limit(tmp_path):
    """The same with gRPC's own call: a server that sends one file, then nothing (it waits until the test ends)."""
    release = threading.Event()

    def fetch(request, context):  # type: ignore[no-untyped-def]
        yield _chunk("a.png", 0, b"whole", True)
        release.wait(600)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("segsvc.v1.JobService", {
        "FetchJobOutputs": grpc.unary_stream_rpc_method_handler(
            fetch, request_deserializer=jobs_pb.FetchJobOutputsRequest.FromString,
            response_serializer=jobs_pb.FileChunk.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with SegmentationClient(f"127.0.0.1:{port}", timeout_s=0.5) as client:
            job = JobHandle(client, operations_pb2.Operation(name="jobs/j1"))
            outcome = _in_thread(lambda: job.fetch(tmp_path / "dest"))  # the client's timeout_s is the idle limit
        assert outcome and isinstance(outcome[0], DeadlineExceeded), outcome
        # a loaded host may take longer than the limit to deliver even the first file: whole or absent, never half
        dest = tmp_path / "dest"
        assert not dest.exists() or _files(dest) in ({}, {"a.png": b"whole"})
    finally:
        release.set()
        server.stop(None)


@pytest.mark.parametrize("metadata, handle", [
    (jobs_pb.JobMetadata(total=3, done=2, state=jobs_pb.JOB_STATE_CANCELLED), jobclient.JobHandle),
    (tpb.TrainingJobMetadata(epochs=3, epoch=1, state=jobs_pb.JOB_STATE_CANCELLED), jobclient.TrainingJobHandle),
], ids=["batch", "training"])
def test_a_cancelled_job_s_result_names_the_job(metadata, handle):
    """`segsvc jobs wait J` of a cancelled job printed "segsvc: error: cancelled while training": no job named,
    unlike a failed one ("job J failed: ...")."""
    op = operations_pb2.Operation(name="jobs/j1", done=True)
    op.metadata.Pack(metadata)
    op.error.CopyFrom(status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled while training"))
    with pytest.raises(Cancelled) as info:
        handle(None, op).result()
    assert str(info.value) == "job j1: cancelled while training"


# -- waits ----------------------------------------------------------------------------------------------------
class _Clock:
    """``time`` for jobclient: a clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class _EarlyServer:
    """A client whose WaitOperation answers at once with a job that is not done (a proxy, or a server that
    ignores the timeout: google.longrunning allows an earlier answer)."""

    def __init__(self) -> None:
        self.waits = 0

    def _ops_call(self, method, request, timeout_s=None):  # type: ignore[no-untyped-def]
        self.waits += method == "WaitOperation"
        if self.waits > 100:
            raise AssertionError("the wait keeps calling a server that answers at once")
        op = operations_pb2.Operation(name=request.name, done=False)
        op.metadata.Pack(jobs_pb.JobMetadata(total=10, done=1, state=jobs_pb.JOB_STATE_RUNNING))
        return op


def _running(client) -> JobHandle:  # type: ignore[no-untyped-def]
    op = operations_pb2.Operation(name="jobs/j1", done=False)
    op.metadata.Pack(jobs_pb.JobMetadata(total=10, done=1, state=jobs_pb.JOB_STATE_RUNNING))
    return JobHandle(client, op)


def test_a_wait_on_a_server_that_answers_at_once_is_paced_by_the_step(monkeypatch):
    """Each early answer was followed by the next WaitOperation at once: a loop of calls as fast as the network
    allows (a CPU and the server busy), for as long as the job ran."""
    clock, server = _Clock(), _EarlyServer()
    monkeypatch.setattr(jobclient, "time", clock)
    status = _running(server).wait(timeout_s=5 * jobclient.WAIT_STEP_S)
    assert not status.done_flag and status.state == "RUNNING"
    assert server.waits <= 6, server.waits  # one call per step of the 5 steps the deadline allows


def test_a_result_whose_deadline_passes_raises_deadline_exceeded():
    """``result(timeout_s=...)`` of a job still running raised a bare SegsvcError: a caller could not tell a
    deadline from any other failure (errors.DeadlineExceeded says "the caller's deadline passed")."""
    with pytest.raises(DeadlineExceeded, match=r"^job j1 is not done after 0 s$"):
        _running(_EarlyServer()).result(timeout_s=0)


# -- what a finished job's operation carries ------------------------------------------------------------------
def test_a_batch_result_says_when_more_failed_than_it_lists_and_where_they_all_are(capsys):
    """A job's result lists its first failures (``outputs.FAILURES_SHOWN``); the client kept no sign that more
    failed, nor where the job's failures.jsonl is, and ``jobs wait`` printed 20 as if they were all."""
    failures = [jobs_pb.ItemFailure(input=f"bad-{i:03d}.png", reason="not an image") for i in range(100)]
    op = operations_pb2.Operation(name="jobs/j1", done=True)
    op.metadata.Pack(jobs_pb.JobMetadata(total=500, done=0, failed=500, state=jobs_pb.JOB_STATE_SUCCEEDED))
    op.response.Pack(jobs_pb.SegmentationJobResult(output_location="j1", total=500, failed=500, failures=failures,
                                                   failures_truncated=True, failures_file="failures.jsonl"))
    result = JobHandle(None, op).result()
    assert (result.failures_truncated, result.failures_file, len(result.failures)) == (True, "failures.jsonl", 100)
    assert cli_jobs._print_result(JobHandle(None, op)) == 1
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["failures"]) == 20 and printed["failures_not_shown"] == 480
    assert printed["failures_file"] == "j1/failures.jsonl"


def test_a_training_status_shows_the_trainer_and_evaluation_restarts():
    op = operations_pb2.Operation(name="jobs/t1")
    op.metadata.Pack(tpb.TrainingJobMetadata(epochs=3, epoch=2, state=jobs_pb.JOB_STATE_RUNNING, attempts=2,
                                             trainer_restarts=1, eval_restarts=2))
    status = jobclient.TrainingJobHandle(None, op).status(refresh=False)
    assert (status.trainer_restarts, status.eval_restarts, status.attempts) == (1, 2, 2)


def test_listing_jobs_stops_when_the_server_repeats_a_page_token():
    """``jobs list`` against a server that hands the same next_page_token back looped for ever."""
    client = SegmentationClient.__new__(SegmentationClient)
    page = operations_pb2.ListOperationsResponse(next_page_token="p2")
    op = page.operations.add(name="jobs/j1")
    op.metadata.Pack(jobs_pb.JobMetadata(total=1, state=jobs_pb.JOB_STATE_RUNNING))
    calls = []
    client._ops_call = lambda method, request: calls.append(request.page_token) or page  # type: ignore[method-assign]
    listed = []
    with pytest.raises(SegsvcError, match="page token 'p2' twice"):
        for status in client.list_jobs():
            listed.append(status.name)
    assert calls == ["", "p2"] and listed == ["jobs/j1", "jobs/j1"]


def test_a_temporary_stays_locked_until_it_is_renamed(tmp_path, monkeypatch):
    """Closed before its rename, a finished temporary was unlocked for a moment: another fetch's clean-up could
    remove it there, and the rename failed with a raw FileNotFoundError."""
    locked_at_rename = []
    real_replace = os.replace

    def replace(src, dst):  # type: ignore[no-untyped-def]
        locked_at_rename.append(downloads._in_use(Path(src)))
        real_replace(src, dst)

    monkeypatch.setattr(downloads.os, "replace", replace)
    download([_chunk("a.png", 0, b"A", True)], tmp_path)
    assert locked_at_rename == [True] and _files(tmp_path) == {"a.png": b"A"}


def test_a_folder_without_locks_still_downloads_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A file system without locks (NFS with no lockd: ENOLCK) failed the whole fetch at its first file, leaving
    that file's temporary behind."""
    def flock(fd, operation):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(downloads.fcntl, "flock", flock)
    download([_chunk("a.png", 0, b"A", True), _chunk("b.png", 0, b"B", True)], tmp_path)
    assert _files(tmp_path) == {"a.png": b"A", "b.png": b"B"}


def test_a_temporary_that_cannot_be_judged_is_left(tmp_path, monkeypatch):
    """Another user's temporary (unreadable), or one on a file system where the probe's lock fails, may be a live
    download's: it was taken for a killed one's and removed."""
    other = tmp_path / f"{_temp_prefix('a.png')}0123456789ab"
    other.write_bytes(b"half")
    real_open = open

    def unreadable(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == other:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unreadable)
    download([_chunk("a.png", 0, b"A", True)], tmp_path)
    monkeypatch.undo()
    assert other.exists()
