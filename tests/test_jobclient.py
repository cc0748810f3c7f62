"""``jobclient``: what a server streams back is checked before it is written, and written atomically; a job's
status carries why it failed."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, status_pb2

from segsvc.errors import InvalidArgument, Unavailable
from segsvc import cli_jobs, jobclient
from segsvc.jobclient import download
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import training_pb2 as tpb


def _chunk(path: str, offset: int, data: bytes, last: bool) -> jobs_pb.FileChunk:
    return jobs_pb.FileChunk(path=path, offset=offset, data=data, last=last)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_files_arrive_whole_in_their_layout(tmp_path):
    stream = [_chunk("a.png", 0, b"AA", False), _chunk("a.png", 2, b"BB", True), _chunk("sub/c.png", 0, b"C", True)]
    assert [p.name for p in download(stream, tmp_path)] == ["a.png", "c.png"]
    assert _files(tmp_path) == {"a.png": b"AABB", "sub/c.png": b"C"}


@pytest.mark.parametrize("stream, message", [
    ([_chunk("a.png", 0, b"AAAA", False), _chunk("b.png", 4, b"BBBB", True)], "'b.png' at offset 4 while 'a.png'"),
    ([_chunk("c.png", 5, b"x", True)], "'c.png' at offset 5 while 'c.png' was at 0 bytes"),
    ([_chunk("a.png", 0, b"AA", False), _chunk("a.png", 1, b"B", True)], "offset 1 while 'a.png' was at 2"),
    ([_chunk("", 0, b"x", True)], "outside the folder"),
    ([_chunk("../x.png", 0, b"x", True)], "outside the folder"),
    ([_chunk("a.png", 0, b"AA", False)], "the stream ended in the middle of 'a.png'"),
], ids=["another-file-mid-file", "first-chunk-not-at-0", "gap", "the-folder-itself", "dotdot", "cut-short"])
def test_names_and_offsets_the_server_sends_are_checked(tmp_path, stream, message):
    """Before, a chunk of b.png went into a.png, an offset first raised AttributeError, and an empty name turned
    the destination folder into a file."""
    dest = tmp_path / "dest"
    with pytest.raises(InvalidArgument, match=message):
        download(stream, dest)
    assert not dest.exists() or _files(dest) == {}


class _Reset(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"

    def trailing_metadata(self) -> tuple:
        return ()


def test_an_interrupted_download_leaves_no_half_file(tmp_path):
    def stream():
        yield _chunk("done.png", 0, b"whole", True)
        yield _chunk("big.png", 0, b"x" * 10, False)
        raise _Reset()

    with pytest.raises(Unavailable):
        download(stream(), tmp_path)
    assert _files(tmp_path) == {"done.png": b"whole"}  # no big.png, no temporary


@pytest.mark.parametrize("metadata, status_of", [
    (jobs_pb.JobMetadata(total=3, done=1, model="m", model_version=1), jobclient._status),
    (tpb.TrainingJobMetadata(epochs=3, epoch=1, recipe="r", dataset="d", model="m"), jobclient._training_status),
], ids=["batch", "training"])
def test_a_failed_job_s_status_says_why(capsys, metadata, status_of):
    """``segsvc jobs status`` printed FAILED and no reason; the reason reached only ``--wait`` (result())."""
    op = operations_pb2.Operation(name="jobs/j1", done=True)
    op.metadata.Pack(metadata)
    op.error.CopyFrom(status_pb2.Status(code=code_pb2.ABORTED, message="training failed: data.crp: unknown key"))
    status = status_of(op)
    assert status.error == "training failed: data.crp: unknown key"
    cli_jobs._print_status(status)
    reason = f"  {status.state.lower()}: training failed: data.crp: unknown key"
    assert capsys.readouterr().out.splitlines()[1:] == [reason]
    running = operations_pb2.Operation(name="jobs/j2", done=False)
    running.metadata.Pack(metadata)
    assert status_of(running).error == ""

