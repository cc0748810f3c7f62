"""``jobclient``: what a server streams back is checked before it is written, and written atomically; a job's
status carries why it failed."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, status_pb2

from segsvc.errors import InvalidArgument, JobFailed, Unavailable
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



@pytest.mark.parametrize("metadata, handle", [
    (jobs_pb.JobMetadata(total=3, done=1, model="m", model_version=1), jobclient.JobHandle),
    (tpb.TrainingJobMetadata(epochs=3, epoch=1, recipe="r", dataset="d", model="m"), jobclient.TrainingJobHandle),
], ids=["batch", "training"])
def test_a_failed_job_s_result_names_the_job_not_a_grpc_code(metadata, handle):
    """`segsvc train --wait` of a job that failed printed "segsvc: error: ABORTED: training failed: ..."."""
    op = operations_pb2.Operation(name="jobs/j1", done=True)
    op.metadata.Pack(metadata)
    op.error.CopyFrom(status_pb2.Status(code=code_pb2.ABORTED, message="training failed: data.crp: unknown key"))
    with pytest.raises(JobFailed) as info:
        handle(None, op).result()
    assert str(info.value) == "job j1 failed: training failed: data.crp: unknown key"
    assert info.value.code == grpc.StatusCode.ABORTED


def _done(metadata) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name="jobs/j1", done=True)
    op.metadata.Pack(metadata)
    return op


def test_a_training_bar_shows_its_fields_after_the_bar_without_a_leading_comma(capsys):
    """The bar read "b970557b: 100%|██████████| , phase=done, epoch=23/23, ..." (tqdm's postfix begins with ", ")."""
    op = _done(tpb.TrainingJobMetadata(epochs=2, epoch=2, loss=0.5, val_miou=0.25, phase=tpb.TRAINING_PHASE_DONE))
    jobclient.TrainingJobHandle(None, op).wait(progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.endswith("| phase=done, epoch=2/2, loss=0.5000, val_mIoU=0.2500"), last


def test_the_bar_of_a_job_already_done_does_not_show_a_rate_of_all_its_images_at_once(capsys):
    """`segsvc jobs status` of a finished 200-image job drew "200/200 [00:00<00:00, 3728270.22img/s ...]"."""
    op = _done(jobs_pb.JobMetadata(total=200, done=200, model="m", model_version=1,
                                   state=jobs_pb.JOB_STATE_SUCCEEDED))
    jobclient.JobHandle(None, op).wait(progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "200/200" in last and "?img/s" in last, last


def test_a_job_whose_cancel_is_requested_says_so_while_it_stops(capsys):
    """`segsvc jobs cancel ID` printed "RUNNING 80/200 ... eta 3 s": nothing said the cancel was taken."""
    op = operations_pb2.Operation(name="jobs/j1", done=False)
    op.metadata.Pack(jobs_pb.JobMetadata(total=200, done=80, model="m", model_version=1, eta_seconds=3,
                                         state=jobs_pb.JOB_STATE_RUNNING, cancel_requested=True))
    cli_jobs._print_status(jobclient._status(op))
    assert capsys.readouterr().out.rstrip().endswith("img/s, cancel requested")


def test_a_paused_job_says_why_in_its_status_and_its_bar(capsys):
    """A job paused on a full output volume showed RUNNING with nothing moving: JobMetadata.paused_reason
    reached neither ``segsvc jobs status`` nor the bar of ``jobs wait``."""
    reason = "no space left on the output volume; the job continues when space is freed"
    paused = operations_pb2.Operation(name="jobs/j1", done=False)
    paused.metadata.Pack(jobs_pb.JobMetadata(total=200, done=80, model="m", model_version=1, paused_reason=reason,
                                             state=jobs_pb.JOB_STATE_RUNNING))
    status = jobclient._status(paused)
    assert status.paused_reason == reason
    cli_jobs._print_status(status)
    assert capsys.readouterr().out.splitlines()[1:] == [f"  paused: {reason}"]
    done = _done(jobs_pb.JobMetadata(total=200, done=200, model="m", model_version=1, paused_reason=reason,
                                     state=jobs_pb.JOB_STATE_SUCCEEDED))
    jobclient.JobHandle(None, paused).wait(progress=True, timeout_s=0)
    assert "state=paused" in capsys.readouterr().err
    jobclient.JobHandle(None, done).wait(progress=True)
    assert "state=succeeded" in capsys.readouterr().err  # a finished job is never shown paused


def test_a_time_budget_job_s_status_shows_unknown_epochs_until_the_trainer_knows(capsys):
    """A time-budget trainer announces no epoch count before it has timed an epoch: the status read "epoch 0/0"."""
    op = operations_pb2.Operation(name="jobs/j1", done=False)
    op.metadata.Pack(tpb.TrainingJobMetadata(epochs=0, epoch=1, step=3, recipe="r", dataset="d", model="m"))
    cli_jobs._print_status(jobclient._training_status(op))
    assert " epoch 1/? " in capsys.readouterr().out


def test_a_queued_training_job_shows_no_progress_and_an_ended_one_its_end(capsys):
    """`jobs list` showed a queued job as "train queued  epoch 0/? step 0/0  loss 0.0000" (a loss before any
    step), a cancelled one as "CANCELLED  train done", and a failed job's bar said phase=done before its error."""
    queued = operations_pb2.Operation(name="jobs/q", done=False)
    queued.metadata.Pack(tpb.TrainingJobMetadata(state=jobs_pb.JOB_STATE_QUEUED, phase=tpb.TRAINING_PHASE_QUEUED,
                                                 recipe="r", dataset="d", model="m"))
    cli_jobs._print_status(jobclient._training_status(queued))
    line = capsys.readouterr().out
    assert "train queued" in line and "epoch" not in line and "loss" not in line, line
    for state in (jobs_pb.JOB_STATE_CANCELLED, jobs_pb.JOB_STATE_FAILED):
        ended = operations_pb2.Operation(name="jobs/e", done=True)
        ended.metadata.Pack(tpb.TrainingJobMetadata(state=state, phase=tpb.TRAINING_PHASE_DONE, epoch=2, epochs=5,
                                                    step=4, steps_per_epoch=9, loss=0.5, recipe="r", dataset="d",
                                                    model="m"))
        status = jobclient._training_status(ended)
        cli_jobs._print_status(status)
        name = status.state.lower()
        out = capsys.readouterr().out
        assert f" {status.state} " in out and f" train {name} " in out and status.shown_phase == name, out


def test_a_wait_step_sends_a_well_formed_duration():
    """WaitOperation's timeout was Duration(seconds=0, nanos=step * 1e9): the default 1 s step sent nanos
    1000000000, outside the [0, 999999999] that google.protobuf.Duration allows (a strict server refuses it)."""
    sent: list[operations_pb2.WaitOperationRequest] = []

    class Client:
        def _ops_call(self, method, request, timeout_s=None):  # type: ignore[no-untyped-def]
            sent.append(request)
            return operations_pb2.Operation(name=request.name, done=True)

    handle = jobclient.JobHandle(Client(), operations_pb2.Operation(name="jobs/j1"))
    for step in (jobclient.WAIT_STEP_S, 2.5, 0.25):
        handle._wait_step(step)
    assert [(r.timeout.seconds, r.timeout.nanos) for r in sent] == [(1, 0), (2, 500_000_000), (0, 250_000_000)]
