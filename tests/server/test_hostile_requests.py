"""Malformed protobuf bytes, bad stream messages, client text in trailers, deadlines in the metrics."""

from __future__ import annotations

import threading

import grpc
import pytest

from segsvc import errors
from segsvc.inference.batcher import BatchingConfig
from segsvc.v1 import segmentation_pb2 as pb
from tests.server.conftest import encode, expire_in_queue, make_image, metric, metrics_text, publish, wait_for

SEGMENT = "/segsvc.v1.SegmentationService/Segment"
STREAM = "/segsvc.v1.SegmentationService/SegmentStream"
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, length far past the end


def _raw_unary(address: str, method: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=60)  # refused at once; a loaded host may take seconds to say so
    return info.value


def test_malformed_protobuf_bytes_are_invalid_argument_without_internals(shared_server, caplog):
    error = _raw_unary(shared_server.address, SEGMENT, GARBAGE)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the request is not a valid Segment message"
    assert "Error" not in error.details() and "Traceback" not in caplog.text
    for method in ("/segsvc.v1.SegmentationService/GetModel", "/google.longrunning.Operations/GetOperation",
                   # the methods the gate neither refuses nor counts: health and a readiness probe
                   "/grpc.health.v1.Health/Check", "/inference.GRPCInferenceService/ServerLive"):
        error = _raw_unary(shared_server.address, method, GARBAGE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "Error" not in error.details(), error.details()
    with grpc.insecure_channel(shared_server.address) as channel:  # reflection, a request stream
        stream = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                       request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([GARBAGE]), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Error" not in info.value.details()


def test_a_bad_message_in_a_stream_answers_the_images_before_it_then_invalid_argument(shared_server):
    good = [pb.SegmentRequest(model="tiny", request_id=str(i), image=encode(make_image(24, 24, seed=i)))
            for i in range(3)]
    with grpc.insecure_channel(shared_server.address) as channel:
        stream = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=pb.SegmentResponse.FromString)
        responses = stream(iter([g.SerializeToString() for g in good] + [GARBAGE]), timeout=30)
        answered = []
        with pytest.raises(grpc.RpcError) as info:
            for response in responses:
                answered.append(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 3 of the SegmentStream stream" in info.value.details()
    assert sorted(r.request_id for r in answered) == ["0", "1", "2"]
    assert all(not r.HasField("error") and r.labels.height == 24 for r in answered)


@pytest.mark.parametrize("request_id, shown", [
    ("caf\u00e9-\u2603", "caf?-?"),
    ("x" * 20000, "x" * 125 + "..."),
])
def test_client_ids_are_cleaned_before_trailers_and_logs(shared_server, request_id, shown, caplog):
    with grpc.insecure_channel(shared_server.address) as channel:
        segment = channel.unary_unary(SEGMENT, request_serializer=pb.SegmentRequest.SerializeToString,
                                      response_deserializer=pb.SegmentResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            segment(pb.SegmentRequest(model="tiny", request_id=request_id, image=b"not an image"), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not INTERNAL "Invalid metadata"
    assert dict(info.value.trailing_metadata())["x-request-id"] == shown
    assert request_id not in caplog.text


def test_a_huge_model_name_gets_its_own_error_not_resource_exhausted(client):
    with pytest.raises(errors.NotFound) as info:
        client.segment(make_image(8, 8), model="m" * 20000)
    assert len(str(info.value)) <= 1024


def test_an_expired_deadline_is_counted_as_deadline_exceeded(start_server, tmp_path, gated, monkeypatch):
    """The client's deadline fires on its clock a few ms before the server's copy of it, so the server mostly sees a
    cancellation with a little time left: that is still the deadline, not the client hanging up."""
    # The server sees the client's deadline as the time left when the request arrived: a host that stalls the
    # request's delivery by more than DEADLINE_SLACK_S would make it a cancellation (the boundary itself is
    # tests/server/test_errors.py's); here every cancellation is a deadline, so a slack that no stall reaches.
    monkeypatch.setattr("segsvc.server.errors.DEADLINE_SLACK_S", 60.0)
    publish(tmp_path, "m", seed=7)
    server = start_server(tmp_path, batching=BatchingConfig(max_batch_size=1, max_delay_s=0))
    batcher = server.manager.resolve("m", None).batcher
    with server.client() as c:
        # held at the gate while expire_in_queue runs (over a minute if a stalled host makes it call again)
        busy = threading.Thread(target=lambda: c.segment(make_image(20, 20), model="m", timeout_s=300))
        busy.start()
        wait_for(lambda: len(gated.ran) == 1)
        late, calls = expire_in_queue(batcher, lambda t: c.segment(make_image(30, 30), model="m", timeout_s=t))
        assert isinstance(late, errors.DeadlineExceeded), late
        wait_for(lambda: metric(metrics_text(server), "segsvc_requests_total", 0.0, method="Segment",
                                code="DEADLINE_EXCEEDED") >= 1)
        gated.gate.set()
        busy.join(60)
    text = metrics_text(server)
    # one per call made (1 unless a stalled host made expire_in_queue call again), each counted at most once
    assert 1 <= metric(text, "segsvc_requests_total", method="Segment", code="DEADLINE_EXCEEDED") <= calls
    assert metric(text, "segsvc_requests_total", method="Segment", code="OK") == 1
    with pytest.raises(AssertionError):
        metric(text, "segsvc_requests_total", method="Segment", code="CANCELLED")
