"""Metrics complete for operators: every RPC's outcome counted once (``counting.CallCounter``), the requests
waiting for the memory budget exported, batch jobs' images in the stage histograms, ModelInfer's log version.

The servers here are real ``SegmentationServer``s, wired by ``app.py``: the counter last in the interceptor list,
``watch_memory``, and the job runner's ``on_image``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from segsvc.inference.admission import MemoryBudget
from segsvc.inference.batcher import Priority
from segsvc.jobs.batch import JobsConfig
from segsvc.server.app import SegmentationServer
from segsvc.server.auth import AuthConfig
from segsvc.server.counting import counted_handler
from segsvc.server.metrics import ServerMetrics
from segsvc.server.oip_pb import grpc_service_pb2 as opb
from segsvc.server.oip_pb import grpc_service_pb2_grpc as opb_grpc
from segsvc.v1 import datasets_pb2, datasets_pb2_grpc
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import (RunningServer, encode, make_image, metric, metrics_text, publish, server_config,
                                   wait_for)

TIMEOUT_S = 60.0  # only a failing test waits this long


def _jobs(tmp_path: Path) -> JobsConfig:
    return JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A server with 'tiny' (one version) and batch jobs on, three images under data/scans."""
    root = tmp_path_factory.mktemp("complete")
    publish(root / "repo", "tiny", seed=1)
    for i in range(3):
        (root / "data" / "scans").mkdir(parents=True, exist_ok=True)
        (root / "data" / "scans" / f"img{i}.png").write_bytes(encode(make_image(24, 32, seed=i)))
    server = RunningServer(server_config(root / "repo", jobs=_jobs(root)))
    channel = grpc.insecure_channel(server.address)
    yield server, channel
    channel.close()
    server.close()


def _counted(server: RunningServer, method: str, expected: float, **labels: str) -> None:
    """Wait until the calls of ``method`` (with ``labels``) counted are ``expected``. A call that failed is
    counted as its handler's ``abort`` returns, and gRPC has sent the status by then: the caller may see the
    error a moment before the count."""
    wait_for(lambda: _count(metrics_text(server), method, **labels) >= expected)
    assert _count(metrics_text(server), method, **labels) == expected


def _count(text: str, method: str, **labels: str) -> float:
    """The calls of ``method`` counted, over every code and model (or those in ``labels``)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("segsvc_requests_total{") and f'method="{method}"' in line \
                and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- item 1: every outcome, once -----------------------------------------------------------------------------
def test_management_calls_are_counted_on_success_and_on_failure(served):
    server, channel = served
    stub = opb_grpc.GRPCInferenceServiceStub(channel)
    stub.ModelMetadata(opb.ModelMetadataRequest(name="tiny"), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(opb.ModelMetadataRequest(name="no-such-model"), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    _counted(server, "ModelMetadata", 1, model="-", code="NOT_FOUND")
    text = metrics_text(server)
    assert metric(text, "segsvc_requests_total", 0.0, method="ModelMetadata", model="-", code="OK") == 1
    assert metric(text, "segsvc_request_seconds_count", 0.0, method="ModelMetadata", model="-") == 2
    assert "no-such-model" not in text  # the label is the method's, never request text


def test_a_segment_stream_that_fails_as_a_call_is_counted(served):
    """SegmentStream counts each image; a stream that failed as a whole (a message that does not parse) was in no
    count at all, its images none and the call's own outcome left to nobody."""
    server, channel = served
    good = pb.SegmentRequest(model="tiny", image=encode(make_image(8, 8))).SerializeToString()
    stream = channel.stream_stream("/segsvc.v1.SegmentationService/SegmentStream", request_serializer=None,
                                   response_deserializer=None)
    before = _count(metrics_text(server), "SegmentStream", model="-")
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([good, b"\xff\xff\xff"]), timeout=TIMEOUT_S))
    _counted(server, "SegmentStream", before + 1, model="-", code=info.value.code().name)


def test_streaming_calls_are_counted_when_they_end(served):
    """A response stream (FetchJobOutputs) and a request stream (datasets are off: UploadDataset fails at once)."""
    server, channel = served
    with server.client(timeout_s=TIMEOUT_S) as client:
        job = client.submit_job(["scans"], model="tiny")
        job.wait(timeout_s=TIMEOUT_S)
    from segsvc.v1 import jobs_pb2, jobs_pb2_grpc

    chunks = list(jobs_pb2_grpc.JobServiceStub(channel).FetchJobOutputs(
        jobs_pb2.FetchJobOutputsRequest(name=job.name), timeout=TIMEOUT_S))
    assert chunks
    with pytest.raises(grpc.RpcError) as info:
        datasets_pb2_grpc.DatasetServiceStub(channel).UploadDataset(iter([datasets_pb2.UploadDatasetRequest()]),
                                                                     timeout=TIMEOUT_S)
    _counted(server, "UploadDataset", 1, model="-", code=info.value.code().name)
    text = metrics_text(server)
    assert _count(text, "SubmitSegmentationJob", code="OK") >= 1
    assert metric(text, "segsvc_requests_total", 0.0, method="FetchJobOutputs", model="-", code="OK") == 1


def test_operations_polls_are_counted(served):
    server, channel = served
    stub = operations_pb2_grpc.OperationsStub(channel)
    before = _count(metrics_text(server), "GetOperation")
    with pytest.raises(grpc.RpcError) as info:
        stub.GetOperation(operations_pb2.GetOperationRequest(name="operations/nope"), timeout=TIMEOUT_S)
    stub.ListOperations(operations_pb2.ListOperationsRequest(), timeout=TIMEOUT_S)
    _counted(server, "GetOperation", before + 1)
    text = metrics_text(server)
    assert _count(text, "GetOperation", code=info.value.code().name) >= 1
    assert _count(text, "ListOperations", code="OK") >= 1


def test_self_counting_methods_are_counted_once(served):
    """Segment and ModelInfer count themselves (with their model): the interceptor leaves them."""
    server, channel = served
    before = metrics_text(server)
    image = encode(make_image(24, 32))
    pb_grpc.SegmentationServiceStub(channel).Segment(pb.SegmentRequest(model="tiny", image=image), timeout=TIMEOUT_S)
    pb_grpc.SegmentationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=TIMEOUT_S)
    infer = opb.ModelInferRequest(model_name="tiny")
    infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
    opb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=TIMEOUT_S)
    after = metrics_text(server)
    for method in ("Segment", "ListModels", "ModelInfer"):
        assert _count(after, method) - _count(before, method) == 1, method  # once, not by the interceptor too
    for method in ("Segment", "ModelInfer"):
        assert _count(after, method, model="tiny") - _count(before, method, model="tiny") == 1, method


def test_probes_are_not_counted(served):
    server, channel = served
    stub = opb_grpc.GRPCInferenceServiceStub(channel)
    stub.ServerLive(opb.ServerLiveRequest(), timeout=TIMEOUT_S)
    stub.ModelReady(opb.ModelReadyRequest(name="tiny"), timeout=TIMEOUT_S)
    text = metrics_text(server)
    assert _count(text, "ServerLive") == 0 and _count(text, "ModelReady") == 0


def test_a_call_refused_by_the_drain_gate_is_counted_once(served):
    server, channel = served
    stub = opb_grpc.GRPCInferenceServiceStub(channel)
    before = _count(metrics_text(server), "ServerMetadata")
    server.call(_set_accepting(server.server, False))
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerMetadata(opb.ServerMetadataRequest(), timeout=TIMEOUT_S)
    finally:
        server.call(_set_accepting(server.server, True))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    text = metrics_text(server)
    assert _count(text, "ServerMetadata") == before + 1
    assert _count(text, "ServerMetadata", code="UNAVAILABLE", model="-") == 1


async def _set_accepting(server: SegmentationServer, accepting: bool) -> None:
    server.gate.accepting = accepting  # on the server's loop, as its own start and stop set it


def test_a_call_refused_by_auth_is_counted_once(tmp_path):
    publish(tmp_path, "tiny", seed=1)
    server = RunningServer(server_config(tmp_path, auth=AuthConfig.parse("infer-tok infer\n")))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = opb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelMetadata(opb.ModelMetadataRequest(name="tiny"), timeout=TIMEOUT_S,
                                   metadata=(("authorization", "Bearer wrong-token"),))
            stub.ModelMetadata(opb.ModelMetadataRequest(name="tiny"), timeout=TIMEOUT_S,
                               metadata=(("authorization", "Bearer infer-tok"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        text = metrics_text(server)
        assert _count(text, "ModelMetadata") == 2
        assert _count(text, "ModelMetadata", code="UNAUTHENTICATED") == 1
        assert _count(text, "ModelMetadata", code="OK") == 1
    finally:
        server.close()


@pytest.mark.parametrize("remaining, code", [(None, "CANCELLED"), (0.01, "DEADLINE_EXCEEDED")])
def test_a_call_cancelled_under_its_handler_is_counted(remaining, code):
    """The client went away (or its deadline passed) while the handler ran: not OK, not UNKNOWN."""
    seen: list[tuple] = []

    async def handler(request, context):  # type: ignore[no-untyped-def]
        raise asyncio.CancelledError

    counted = counted_handler(grpc.unary_unary_rpc_method_handler(handler), "GetOperation",
                              lambda *args: seen.append(args))
    context = SimpleNamespace(time_remaining=lambda: remaining, code=lambda: None)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(counted.unary_unary(None, context))
    assert [s[:3] for s in seen] == [("GetOperation", "-", code)]


# -- item 2: waiting for memory --------------------------------------------------------------------------------
def test_requests_waiting_for_the_memory_budget_are_exported():
    metrics = ServerMetrics()
    value = metrics.registry.get_sample_value

    async def scenario() -> tuple[float, float, float]:
        budget = MemoryBudget(100, max_waiting=4)
        metrics.watch_memory(budget.waiting)  # the wiring app.py needs
        held = await budget.acquire(100)
        waiters = [asyncio.ensure_future(budget.acquire(10, lane=Priority.INTERACTIVE)),
                   asyncio.ensure_future(budget.acquire(10, lane=Priority.INTERACTIVE)),
                   asyncio.ensure_future(budget.acquire(10, lane=Priority.BATCH))]
        while sum(budget.waiting().values()) < 3:
            await asyncio.sleep(0)
        waiting = (value("segsvc_memory_waiting", {"lane": "interactive"}),
                   value("segsvc_memory_waiting", {"lane": "batch"}))
        held.release()
        for hold in await asyncio.gather(*waiters):
            hold.release()
        return (*waiting, value("segsvc_memory_waiting", {"lane": "interactive"}))

    assert asyncio.run(scenario()) == (2, 1, 0)


# -- item 3: batch jobs' images in the stage histograms ----------------------------------------------------------
def test_batch_job_images_feed_the_stage_histograms(served):
    server, _ = served
    with server.client(timeout_s=TIMEOUT_S) as client:
        before = metrics_text(server)
        client.submit_job(["scans"], model="tiny").wait(timeout_s=TIMEOUT_S)
    text = metrics_text(server)
    for name in ("segsvc_queue_seconds_count", "segsvc_inference_seconds_count"):
        added = metric(text, name, 0.0, model="tiny", lane="batch") - metric(before, name, 0.0, model="tiny",
                                                                             lane="batch")
        assert added == 3, name


# -- item 4: ModelInfer's log line names the version ----------------------------------------------------------------
def test_model_infer_log_line_carries_the_version(served, caplog):
    _, channel = served
    infer = opb.ModelInferRequest(model_name="tiny", id="with-version")
    infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        encode(make_image(24, 32)))
    with caplog.at_level(logging.INFO, logger="segsvc.server"):
        opb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=TIMEOUT_S)
        with contextlib.suppress(grpc.RpcError):
            opb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                opb.ModelInferRequest(model_name="nope", id="no-version"), timeout=TIMEOUT_S)
    lines = {r.request_id: r for r in caplog.records if getattr(r, "method", None) == "ModelInfer"}
    assert lines["with-version"].version == 1 and lines["with-version"].model == "tiny"
    assert lines["no-version"].version == 0
