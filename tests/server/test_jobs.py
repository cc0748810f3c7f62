"""Batch jobs against a real server: JobService, the standard Operations service, the job runner."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from segsvc import errors
from segsvc.inference.batcher import BatchingConfig
from segsvc.jobs.batch import JobsConfig
from segsvc.jobs.staging import UploadLimits
from segsvc.wire import decode_png_labels
from tests.server.conftest import encode, make_image, publish, wait_for


def _image_tree(root: Path, count: int = 6) -> dict[str, np.ndarray]:
    """``count`` PNGs under ``root/scans`` (some nested, sizes vary) -> {rel under root: image}."""
    images = {}
    for i in range(count):
        rel = f"scans/{'a/' if i % 2 else ''}img{i}.png"
        image = make_image(24 + 8 * (i % 3), 32 + 4 * i, seed=i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(image))
        images[rel] = image
    return images


def _jobs(tmp_path: Path, **overrides) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                      **overrides)


def _label_png(tmp_path: Path, job_id: str, rel: str) -> np.ndarray:
    return decode_png_labels((tmp_path / "out" / job_id / "labels" / f"{rel}.png").read_bytes())


@pytest.fixture
def job_server(start_server, tmp_path):
    publish(tmp_path / "repo", "tiny", seed=11)
    images = _image_tree(tmp_path / "data")
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path))
    return server, images


def test_submit_wait_every_output_equals_segment(job_server, tmp_path):
    server, images = job_server
    with server.client(timeout_s=60) as c:
        job = c.submit_job(["scans"], model="tiny", overlay=True, confidence=True)
        assert job.status(refresh=False).state in ("QUEUED", "RUNNING")
        job.wait(timeout_s=60)
        result = job.result()
        assert (result.total, result.done, result.failed, result.skipped) == (6, 6, 0, 0)
        assert result.output_location == job.id
        pixels = 0
        for rel, image in images.items():
            expected = c.segment(image, model="tiny").mask
            assert np.array_equal(_label_png(tmp_path, job.id, rel), expected), rel
            assert (tmp_path / "out" / job.id / "overlay" / f"{rel}.png").is_file()
            assert (tmp_path / "out" / job.id / "confidence" / f"{rel}.png").is_file()
            pixels += expected.size
        assert sum(result.class_pixel_totals.values()) == pixels
        lines = [json.loads(x) for x in (tmp_path / "out" / job.id / "results.jsonl").read_text().splitlines()]
        assert sorted(r["input"] for r in lines) == sorted(images)
        assert all(r["version"] == 1 and r["model"] == "tiny" and 0 < r["mean_confidence"] <= 1 for r in lines)
        summary = json.loads((tmp_path / "out" / job.id / "summary.json").read_text())
        assert summary["counts"] == {"total": 6, "done": 6, "failed": 0, "skipped": 0}
        fetched = job.fetch(tmp_path / "fetched")
        assert {p.relative_to(tmp_path / "fetched").as_posix() for p in fetched} >= {
            "results.jsonl", "summary.json", "class_shares.png", *(f"labels/{r}.png" for r in images)}


def test_undecodable_inputs_fail_alone_and_the_job_succeeds(job_server, tmp_path):
    server, images = job_server
    (tmp_path / "data" / "scans" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with server.client() as c:
        result = c.submit_job(["scans"], model="tiny").result(timeout_s=60)
    assert (result.done, result.failed) == (len(images), 1)
    assert result.failures[0][0] == "scans/broken.png" and "PNG" in result.failures[0][1]
    assert str(tmp_path) not in result.failures[0][1]


@pytest.mark.parametrize("path", ["../secret", "/etc", "scans/../../secret", "link_out"])
def test_paths_that_escape_the_data_root_are_refused(job_server, tmp_path, path):
    server, _ = job_server
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.png").write_bytes(encode(make_image(8, 8)))
    os.symlink(tmp_path / "secret", tmp_path / "data" / "link_out")
    with server.client() as c:
        with pytest.raises(errors.InvalidArgument) as info:
            c.submit_job([path], model="tiny")
        assert str(tmp_path) not in str(info.value)
        assert list(c.list_jobs()) == []  # nothing half-submitted


def test_idempotent_resubmit_returns_the_same_operation(job_server):
    server, _ = job_server
    with server.client() as c:
        first = c.submit_job(["scans"], model="tiny", request_id="nightly-42")
        again = c.submit_job(["scans"], model="tiny", request_id="nightly-42")
        assert again.name == first.name
        with pytest.raises(errors.AlreadyExists, match="nightly-42"):
            c.submit_job(["scans/a"], model="tiny", request_id="nightly-42")
        first.wait(timeout_s=60)
        assert len(list(c.list_jobs())) == 1


def test_list_operations_pages_and_filters(start_server, tmp_path):
    publish(tmp_path / "repo", "tiny", seed=11)
    _image_tree(tmp_path / "data", count=1)
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path))
    with server.client() as c:
        names = [c.submit_job(["scans"], model="tiny").name for _ in range(5)]
        for name in names:
            c.job(name).wait(timeout_s=60)
        with grpc.insecure_channel(server.address) as channel:
            ops = operations_pb2_grpc.OperationsStub(channel)
            page1 = ops.ListOperations(operations_pb2.ListOperationsRequest(name="jobs", page_size=2))
            page2 = ops.ListOperations(operations_pb2.ListOperationsRequest(
                name="jobs", page_size=2, page_token=page1.next_page_token))
            page3 = ops.ListOperations(operations_pb2.ListOperationsRequest(
                name="jobs", page_size=2, page_token=page2.next_page_token))
            seen = [o.name for p in (page1, page2, page3) for o in p.operations]
            assert seen == names and page3.next_page_token == ""
            running = ops.ListOperations(operations_pb2.ListOperationsRequest(filter="state=RUNNING"))
            assert list(running.operations) == []
            done = ops.ListOperations(operations_pb2.ListOperationsRequest(filter="done=true AND kind=segmentation"))
            assert len(done.operations) == 5 and all(o.done for o in done.operations)
            with pytest.raises(grpc.RpcError) as info:
                ops.ListOperations(operations_pb2.ListOperationsRequest(filter="colour=red"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as info:
                ops.GetOperation(operations_pb2.GetOperationRequest(name="jobs/nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_stops_the_job_keeps_finished_outputs_and_delete_removes_it(start_server, tmp_path, gated):
    publish(tmp_path / "repo", "tiny", seed=11)
    images = _image_tree(tmp_path / "data", count=12)
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path, window=2),
                          batching=BatchingConfig(max_batch_size=1, max_delay_s=0))
    with server.client() as c:
        job = c.submit_job(["scans"], model="tiny")
        wait_for(lambda: len(gated.ran) >= 1)  # the first image is in the model, held by the gate
        with pytest.raises(errors.FailedPrecondition, match="cancel"):
            job.delete()
        job.cancel()
        assert job.status().cancel_requested
        gated.gate.set()
        status = job.wait(timeout_s=60)
        assert status.state == "CANCELLED"
        with pytest.raises(errors.Cancelled):
            job.result()
        assert status.done + status.skipped == len(images) and status.skipped >= len(images) - 3
        labels = list((tmp_path / "out" / job.id / "labels").rglob("*.png"))
        assert len(labels) == status.done
        assert json.loads((tmp_path / "out" / job.id / "summary.json").read_text())["counts"]["skipped"] == status.skipped
        assert job.delete(outputs=True) >= status.done
        assert not (tmp_path / "out" / job.id).exists()
        with pytest.raises(errors.NotFound):
            c.job(job.name)


def test_uploads_run_as_jobs_and_their_limits_hold(start_server, tmp_path):
    publish(tmp_path / "repo", "tiny", seed=11)
    local = tmp_path / "local"
    images = _image_tree(local, count=3)
    limits = UploadLimits(max_file_bytes=1 << 20, max_total_bytes=1 << 20, max_files=3)
    server = start_server(tmp_path / "repo", jobs=JobsConfig(state_dir=tmp_path / "state",
                                                            output_root=tmp_path / "out", upload=limits))
    with server.client() as c:
        job = c.submit_job(upload=[local / "scans"], model="tiny")
        result = job.result(timeout_s=60)
        assert result.done == 3
        for rel, image in images.items():
            inner = rel.removeprefix("scans/")
            assert np.array_equal(_label_png(tmp_path, job.id, inner), c.segment(image, model="tiny").mask)
        with pytest.raises(errors.FailedPrecondition, match="data-root"):
            c.submit_job(["scans"], model="tiny")
        (local / "scans" / "one-too-many.png").write_bytes(encode(make_image(8, 8)))
        with pytest.raises(errors.InvalidArgument, match="files"):
            c.upload_images([local / "scans"])
        big = tmp_path / "big"
        big.mkdir()
        (big / "huge.png").write_bytes(b"\x89PNG" + os.urandom((1 << 20) + 10))
        with pytest.raises(errors.InvalidArgument, match="bytes"):
            c.upload_images([big])
    assert [p.name for p in (tmp_path / "state" / "uploads").iterdir()] == [job_id_dir(tmp_path)]


def job_id_dir(tmp_path: Path) -> str:
    """The one committed upload (the refused ones left nothing behind)."""
    committed = [p.name for p in (tmp_path / "state" / "uploads").iterdir() if not p.name.endswith(".partial")]
    assert len(committed) == 1
    return committed[0]


def test_interactive_segment_is_answered_while_a_job_runs(start_server, tmp_path, monkeypatch):
    from segsvc.jobs.batch import JobRunner

    publish(tmp_path / "repo", "tiny", seed=11)
    _image_tree(tmp_path / "data", count=40)
    # The job's last image waits until the interactive requests are answered: on a loaded host the test could
    # otherwise first see the job's progress when all 40 images were done, and never segment while it runs.
    answered_all, started = threading.Event(), []
    real_segment = JobRunner._segment

    async def segment(self, run, source):  # type: ignore[no-untyped-def]
        started.append(source)
        if len(started) == 40:
            while not answered_all.is_set():
                await asyncio.sleep(0.01)
        return await real_segment(self, run, source)

    monkeypatch.setattr(JobRunner, "_segment", segment)
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path, window=8))
    image = make_image(40, 40, seed=99)
    with server.client(timeout_s=60) as c:
        job = c.submit_job(["scans"], model="tiny")
        wait_for(lambda: job.status().done >= 1)
        answered = []
        while not job.status(refresh=False).done_flag and len(answered) < 5:
            answered.append(c.segment(image, model="tiny"))
            job.status()
        answered_all.set()
        assert len(answered) == 5 and all(r.mask.shape == (40, 40) for r in answered)
        assert job.result(timeout_s=60).done == 40


def test_version_is_pinned_at_submission(start_server, tmp_path, gated):
    publish(tmp_path / "repo", "tiny", seed=11)
    images = _image_tree(tmp_path / "data", count=4)
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path, window=1),
                          batching=BatchingConfig(max_batch_size=1, max_delay_s=0))
    with server.client() as c:
        job = c.submit_job(["scans"], model="tiny")
        wait_for(lambda: len(gated.ran) >= 1)
        publish(tmp_path / "repo", "tiny", seed=12)  # version 2 arrives mid-job and becomes the default
        done = threading.Event()
        threading.Thread(target=lambda: (c.load_model("tiny"), done.set()), daemon=True).start()
        gated.gate.set()
        assert done.wait(60)
        result = job.result(timeout_s=60)
        assert result.done == len(images)
        lines = [json.loads(x) for x in (tmp_path / "out" / job.id / "results.jsonl").read_text().splitlines()]
        assert {r["version"] for r in lines} == {1}
        assert c.get_model("tiny").default_version == 2


def test_jobs_cli_submit_wait_list_status_fetch_delete(job_server, tmp_path, capsys):
    from segsvc.cli import main

    server, images = job_server
    common = ["--server", server.address]
    assert main(["jobs", "submit", "scans", *common, "--color", "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    job_id = out.splitlines()[0].strip()
    result = json.loads(out[out.index("{"):])
    assert result["done"] == len(images) and result["output_location"] == job_id
    assert main(["jobs", "list", *common]) == 0
    listed = capsys.readouterr().out
    assert f"jobs/{job_id}" in listed and "SUCCEEDED" in listed and f"{len(images)}/{len(images)}" in listed
    assert main(["jobs", "status", job_id, *common]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "fetch", job_id, *common, "--out", str(tmp_path / "fetched")]) == 0
    assert sorted(p.name for p in (tmp_path / "fetched" / "color" / "scans").glob("*.png")) == sorted(
        Path(r).name + ".png" for r in images if r.count("/") == 1)
    assert main(["jobs", "delete", job_id, *common, "--outputs"]) == 0
    assert not (tmp_path / "out" / job_id).exists()
    assert main(["jobs", "status", job_id, *common]) == 2
    assert f"no job with id {job_id!r}" in capsys.readouterr().err
    assert main(["jobs", "submit", "../outside", *common]) == 2
    assert "outside" in capsys.readouterr().err


def test_max_running_jobs_makes_further_jobs_wait_in_order(start_server, tmp_path, gated):
    publish(tmp_path / "repo", "tiny", seed=11)
    _image_tree(tmp_path / "data", count=2)
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path, max_running_jobs=1),
                          batching=BatchingConfig(max_batch_size=1, max_delay_s=0))
    with server.client() as c:
        jobs = [c.submit_job(["scans"], model="tiny") for _ in range(3)]
        wait_for(lambda: len(gated.ran) >= 1)
        assert [j.status().state for j in jobs] == ["RUNNING", "QUEUED", "QUEUED"]
        gated.gate.set()
        finished = [j.wait(timeout_s=60) for j in jobs]
        assert all(s.state == "SUCCEEDED" for s in finished)
        ends = [c.job(j.name)._op.metadata for j in jobs]
        from segsvc.v1 import jobs_pb2
        times = []
        for any_meta in ends:
            meta = jobs_pb2.JobMetadata()
            any_meta.Unpack(meta)
            times.append((meta.start_time.ToNanoseconds(), meta.end_time.ToNanoseconds()))
        assert times[0][1] <= times[1][0] and times[1][1] <= times[2][0]  # one at a time, in submission order


def test_malformed_operations_input_is_invalid_argument_not_internal(job_server, caplog):
    """Page tokens of non-ASCII digits and timeouts no Duration can hold are the caller's mistake, said so."""
    from google.protobuf.duration_pb2 import Duration

    server, _ = job_server
    with server.client() as c:
        job = c.submit_job(["scans"], model="tiny")
        job.wait(timeout_s=60)
    with grpc.insecure_channel(server.address) as channel:
        ops = operations_pb2_grpc.OperationsStub(channel)
        for token in ("\u00b2", "\u0663", "x", "-1", "1" * 19):  # superscript two, Arabic-Indic three: isdigit()
            with pytest.raises(grpc.RpcError) as info:
                ops.ListOperations(operations_pb2.ListOperationsRequest(page_token=token), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
            assert info.value.details() == "page_token is not one this server returned"
        for timeout in (Duration(seconds=2**62), Duration(seconds=-(2**62)), Duration(seconds=315_576_000_001)):
            with pytest.raises(grpc.RpcError) as info:
                ops.WaitOperation(operations_pb2.WaitOperationRequest(name=job.name, timeout=timeout), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, timeout
            assert "timeout" in info.value.details() and "Duration" in info.value.details()
        # what the client sends (nanos up to a whole second) and long valid timeouts still wait, capped
        for timeout in (Duration(nanos=1_000_000_000), Duration(seconds=315_576_000_000), Duration(seconds=1)):
            assert ops.WaitOperation(operations_pb2.WaitOperationRequest(name=job.name, timeout=timeout),
                                     timeout=30).done
    assert "failed unexpectedly" not in caplog.text


# -- FetchJobOutputs streams a finished job's files only; an upload holds images only ----------------------------
def test_outputs_of_a_job_that_has_not_finished_are_refused_and_a_finished_one_s_are_served(start_server, tmp_path,
                                                                                           gated):
    """FetchJobOutputs of a RUNNING job streamed the files written so far (of a QUEUED one: none), answered OK,
    though it streams "every output file of a finished job". A cancelled job's outputs are served, as before."""
    publish(tmp_path / "repo", "tiny", seed=11)
    _image_tree(tmp_path / "data", count=3)
    server = start_server(tmp_path / "repo", jobs=_jobs(tmp_path, max_running_jobs=1))
    with server.client(timeout_s=60) as c:
        running = c.submit_job(["scans"], model="tiny")
        wait_for(lambda: len(gated.ran) >= 1, 300)  # its images are in the model, held there: none is done
        queued = c.submit_job(["scans"], model="tiny")
        for job, state in ((running, "RUNNING"), (queued, "QUEUED")):
            with pytest.raises(errors.FailedPrecondition) as caught:
                job.fetch(tmp_path / "early")
            assert str(caught.value) == (
                f"job {job.id} is {state} (0 of 3 images done): its outputs are fetched once it has finished; wait "
                f"for it (`segsvc jobs wait {job.id}`, WaitOperation) and fetch again, or cancel it "
                f"(`segsvc jobs cancel {job.id}`) and wait for it to end, to fetch the outputs written so far")
        assert not (tmp_path / "early").exists()
        running.cancel()  # the cancel is asynchronous: until the runner stops, the job is RUNNING and says so
        with pytest.raises(errors.FailedPrecondition, match=rf"^job {running.id} is RUNNING \(0 of 3 images done(, \d skipped)?\), "
                                                            rf"cancelling: .* and fetch again$"):
            running.fetch(tmp_path / "early")
        gated.gate.set()
        assert running.wait(timeout_s=300).state == "CANCELLED"
        fetched = running.fetch(tmp_path / "cancelled")
        assert "summary.json" in {p.relative_to(tmp_path / "cancelled").as_posix() for p in fetched}
        assert queued.wait(timeout_s=300).state == "SUCCEEDED"
        names = {p.relative_to(tmp_path / "done").as_posix() for p in queued.fetch(tmp_path / "done")}
        assert {"summary.json", "results.jsonl", "labels/scans/img0.png.png"} <= names


def test_a_paused_job_s_refusal_says_why_it_waits():
    from segsvc.jobs.store import Job
    from segsvc.server.jobs import check_finished

    reason = "no space left on the output volume; the job continues when space is freed"
    job = Job(id="j1", kind="segmentation", state="RUNNING", request_id=None, spec={}, total=200, done=30, failed=1,
              skipped=1, created_at=0.0, updated_at=0.0, started_at=0.0, finished_at=None, cancel_requested=False,
              error=None, result=None, progress={"paused_reason": reason}, seq=1)
    with pytest.raises(errors.FailedPrecondition, match=r"^job j1 is RUNNING \(31 of 200 images done, 1 skipped\) and paused "
                                                        rf"\({reason}\): its outputs are fetched once it has finished"):
        check_finished(job)
    for state in ("SUCCEEDED", "FAILED", "CANCELLED"):
        check_finished(Job(**{**job.__dict__, "state": state}))


def test_a_cancelling_job_s_refusal_does_not_count_skipped_images_as_done():
    """A cancel skips the images not yet run at once; the refusal said "3 of 3 images done" for a job that had run
    one of them."""
    from segsvc.jobs.store import Job
    from segsvc.server.jobs import check_finished

    job = Job(id="j2", kind="segmentation", state="RUNNING", request_id=None, spec={}, total=3, done=1, failed=0,
              skipped=2, created_at=0.0, updated_at=0.0, started_at=0.0, finished_at=None, cancel_requested=True,
              error=None, result=None, progress={}, seq=1)
    with pytest.raises(errors.FailedPrecondition, match=r"^job j2 is RUNNING \(1 of 3 images done, 2 skipped\), "
                                                        r"cancelling: "):
        check_finished(job)


def test_an_upload_of_a_file_that_is_no_image_is_refused_by_name(start_server, tmp_path):
    """UploadImages took x.txt; a job over that upload then failed with "input '.' matches no image under the data
    root", naming neither the upload nor its file. A raw gRPC client (ours sends image files only)."""
    from segsvc.v1 import jobs_pb2, jobs_pb2_grpc

    publish(tmp_path / "repo", "tiny", seed=11)
    server = start_server(tmp_path / "repo", jobs=JobsConfig(state_dir=tmp_path / "state",
                                                            output_root=tmp_path / "out"))
    upload_id = "ab" * 16  # an upload that holds no image, committed before uploads were checked
    (tmp_path / "state" / "uploads" / upload_id).mkdir(parents=True)
    (tmp_path / "state" / "uploads" / upload_id / "x.txt").write_text("notes")
    with grpc.insecure_channel(server.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadImages(iter([jobs_pb2.UploadImagesRequest(name="a.png", data=encode(make_image(8, 8)),
                                                                 last=True),
                                    jobs_pb2.UploadImagesRequest(name="x.txt", data=b"notes", last=True)]), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("upload file 'x.txt' is not an image file: a job reads only the .png"), \
            info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitSegmentationJob(jobs_pb2.SubmitSegmentationJobRequest(
                model="tiny", inputs=jobs_pb2.JobInputs(upload_id=upload_id)), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"upload {upload_id} holds no image files (it holds 1 file: x.txt): "), \
            info.value.details()
    # the refused upload left nothing behind
    assert sorted(p.name for p in (tmp_path / "state" / "uploads").iterdir()) == [upload_id]
