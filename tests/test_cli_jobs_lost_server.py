"""`segsvc jobs fetch` when the server goes mid-download: what the user reads, and the exit status.

It printed gRPC's own "segsvc: error: Stream removed (Socket closed)" (a server killed with kill -9): nothing said
that the files already written are whole, nor that running the same fetch again completes it, as `jobs wait` says
for a lost server. The count is this fetch's files (not those the folder held before), and the fetch run again
downloads every file again (it does not skip those there), so the message says so rather than "the rest"; the
command to run again keeps the user's --timeout-s.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import pytest

import segsvc.downloads
import segsvc.server.convert
from segsvc import cli_jobs
from segsvc.cli import main
from segsvc.downloads import download
from segsvc.errors import NotFound, Unavailable
from segsvc.v1 import jobs_pb2 as jobs_pb
from tests.server.conftest import start_server  # noqa: F401  (fixture)
from tests.test_cli_jobs import _one_line, scans_server
from tests.rpc_errors import StatusError  # what a gRPC stream raises when the connection goes


@pytest.fixture
def finished_job(start_server, tmp_path):  # noqa: F811
    """A real in-process server and a batch job over three images that has ended (more than two output files)."""
    server = scans_server(start_server, tmp_path)
    with server.client(timeout_s=60) as client:
        job = client.submit_job(["scans"], model="tiny")
        job.wait(timeout_s=300)
    return server, job.id


def test_a_server_lost_mid_fetch_says_how_many_files_it_wrote_and_how_to_fetch_again(finished_job, tmp_path,
                                                                                     monkeypatch, capsys):
    """The server sends two whole files, then stops (the stream is cut while it was sending) once the client has
    written them: deterministic, no timing."""
    server, job_id = finished_job
    file_chunks = segsvc.server.convert.file_chunks

    async def two_files_then_hang(files):  # type: ignore[no-untyped-def]
        sent = 0
        async for chunk in file_chunks(files):
            yield chunk
            sent += chunk.last
            if sent == 2:
                await asyncio.Event().wait()  # until the stop cancels the call

    finish = segsvc.downloads._Incoming.finish
    finished: list[Path] = []

    def finish_then_stop_at_the_second(self):  # type: ignore[no-untyped-def]
        finished.append(finish(self))
        if len(finished) == 2:
            server.stop()  # the server goes while the stream is open
        return finished[-1]

    monkeypatch.setattr(segsvc.server.convert, "file_chunks", two_files_then_hang)
    monkeypatch.setattr(segsvc.downloads._Incoming, "finish", finish_then_stop_at_the_second)
    out = tmp_path / "fetched"
    out.mkdir()
    (out / "kept.txt").write_text("there before the fetch")  # not counted: this fetch did not write it
    code = main(["jobs", "fetch", job_id, "--server", server.address, "--out", str(out), "--no-progress",
                 "--timeout-s", "300"])
    err = _one_line(capsys)
    assert code == 2, err  # as `jobs wait` for a lost server
    assert err == (f"segsvc: error: lost the server at {server.address} while fetching job {job_id}; 2 files "
                   f"written into {out} before it went: run `segsvc jobs fetch {job_id} --server {server.address} "
                   f"--out {out} --timeout-s 300` again when it is back (it fetches every file again)\n"), err
    assert sorted(p for p in out.rglob("*") if p.is_file() and p.name != "kept.txt") == sorted(finished)
    assert not [p for p in out.rglob(".*") if ".part-" in p.name]  # the file in progress was removed


def _stream(cut: StatusError):  # type: ignore[no-untyped-def]
    """One whole file, the first chunk of a second, then the cut."""
    yield jobs_pb.FileChunk(path="labels/0.png", offset=0, data=b"whole", last=True)
    yield jobs_pb.FileChunk(path="labels/1.png", offset=0, data=b"half", last=False)
    raise cut


class _Job:
    id = "j1"

    def __init__(self, cut: StatusError) -> None:
        self.cut = cut

    def fetch(self, dest: str, progress: bool) -> list[Path]:  # the real download over a stream that is cut
        return download(_stream(self.cut), dest, progress)


class _Client:
    def __init__(self, job: _Job) -> None:
        self._job = job

    def job(self, name: str) -> _Job:
        return self._job


@pytest.mark.parametrize("code, details", [
    (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),  # kill -9 of the server
    (grpc.StatusCode.CANCELLED, "Cancelled"),  # a stopping server cancels the calls in flight
], ids=["server-killed", "server-stops"])
def test_each_way_of_losing_the_server_mid_fetch_reads_the_same(tmp_path, code, details):
    args = argparse.Namespace(job="j1", server="host:1", out=str(tmp_path / "my out"), progress=False, tls=True,
                              tls_ca="ca.pem", token_file=None, timeout_s=cli_jobs.TIMEOUT_S)
    with pytest.raises(Unavailable) as info:
        cli_jobs._fetch(_Client(_Job(StatusError(code, details))), args)
    assert str(info.value) == (f"lost the server at host:1 while fetching job j1; 1 file written into {args.out} "
                               f"before it went: run `segsvc jobs fetch j1 --server host:1 --out '{args.out}' --tls "
                               "--tls-ca ca.pem` again when it is back (it fetches every file again)")
    assert details not in str(info.value)
    assert (tmp_path / "my out" / "labels" / "0.png").read_bytes() == b"whole"
    assert not (tmp_path / "my out" / "labels" / "1.png").exists()


def test_a_fetch_refused_for_another_reason_keeps_its_own_message(tmp_path):
    args = argparse.Namespace(job="j1", server="host:1", out=str(tmp_path), progress=False, tls=False,
                              tls_ca=None, token_file=None)
    with pytest.raises(NotFound, match="^job j1 has no outputs$"):
        cli_jobs._fetch(_Client(_Job(StatusError(grpc.StatusCode.NOT_FOUND, "job j1 has no outputs"))), args)


def test_a_second_fetch_into_a_folder_with_files_counts_its_own_and_does_fetch_every_file_again(tmp_path):
    """The folder holds two files of a first fetch; the second is cut after one file: it says 1 (its own), and
    the file it wrote is the server's again (rewritten, not skipped), as "it fetches every file again" says."""
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "0.png").write_bytes(b"old")
    (out / "labels" / "1.png").write_bytes(b"old")
    args = argparse.Namespace(job="j1", server="host:1", out=str(out), progress=False, tls=False, tls_ca=None,
                              token_file=None, timeout_s=2.5)
    with pytest.raises(Unavailable) as info:
        cli_jobs._fetch(_Client(_Job(StatusError(grpc.StatusCode.UNAVAILABLE, "Socket closed"))), args)
    assert str(info.value) == (f"lost the server at host:1 while fetching job j1; 1 file written into {out} before "
                               f"it went: run `segsvc jobs fetch j1 --server host:1 --out {out} --timeout-s 2.5` "
                               "again when it is back (it fetches every file again)")
    assert (out / "labels" / "0.png").read_bytes() == b"whole"  # fetched again over the first fetch's copy
    assert (out / "labels" / "1.png").read_bytes() == b"old"  # the cut came before its last chunk: kept as it was
