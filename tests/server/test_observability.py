"""Observability: echoed request ids, the metrics endpoint, text logs, traceable ModelInfer failures,
and refused requests that still leave a metric and a log line."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

import grpc
import pytest

from segsvc.server import oip_convert
from segsvc.server.auth import AuthConfig
from segsvc.server.logs import configure_logging
from segsvc.server.oip_pb import grpc_service_pb2 as opb
from segsvc.server.oip_pb import grpc_service_pb2_grpc as opb_grpc
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import encode, make_image, metric, metrics_text, publish

TIMEOUT_S = 60.0  # only a failing test waits this long


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One server with the 'tiny' model, and a channel to it (module-scoped: starting a server is slow)."""
    from tests.server.conftest import RunningServer, server_config

    repo = tmp_path_factory.mktemp("obs-repo")
    publish(repo, "tiny", seed=1)
    server = RunningServer(server_config(repo))
    channel = grpc.insecure_channel(server.address)
    yield server, channel
    channel.close()
    server.close()


def test_stream_echoes_each_request_id_exactly(served):
    _, channel = served
    stub = pb_grpc.SegmentationServiceStub(channel)
    long_id = "x" * 200
    # distinct ids that the log-safe copy would make equal ('?' for non-ASCII, cut after 125 characters)
    sent = {"photo-é": 0, "photo-ü": 1, long_id + "a": 2, long_id + "b": 3}
    images = {rid: encode(make_image(16 + 8 * i, 16, seed=i)) for rid, i in sent.items()}
    requests = [pb.SegmentRequest(model="tiny", image=images[rid], request_id=rid) for rid in sent]
    responses = list(stub.SegmentStream(iter(requests), timeout=TIMEOUT_S))
    assert {r.request_id for r in responses} == set(sent)
    for response in responses:  # each answer belongs to the image its id names (heights differ per image)
        assert not response.HasField("error")
        assert response.labels.height == 16 + 8 * sent[response.request_id]


def test_segment_echoes_a_non_ascii_request_id(served):
    _, channel = served
    stub = pb_grpc.SegmentationServiceStub(channel)
    response = stub.Segment(pb.SegmentRequest(model="tiny", image=encode(make_image(16, 16)), request_id="photo-é"),
                            timeout=TIMEOUT_S)
    assert response.request_id == "photo-é"


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_metrics_port_serves_only_metrics(served):
    server, _ = served
    base = f"http://127.0.0.1:{server.server.metrics_port}"
    assert _get(base + "/foo") == 404 and _get(base + "/") == 404 and _get(base + "/debug") == 404
    assert _get(base + "/metrics") == 200
    assert "segsvc_requests_total" in metrics_text(server)


@pytest.fixture
def text_formatter():  # type: ignore[no-untyped-def]
    """The formatter ``--log-format text`` installs (the root logger's handlers and warnings are put back
    afterwards: left captured, a later ``configure_logging`` kept this test's pytest recorder as the warnings'
    sink, and test_metrics_review's warnings test saw none)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", json_lines=False)
        yield root.handlers[0].formatter
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_text_logs_carry_the_request_fields(served, text_formatter, caplog):
    _, channel = served
    stub = pb_grpc.SegmentationServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="segsvc.server"):
        stub.Segment(pb.SegmentRequest(model="tiny", image=encode(make_image(16, 16)), request_id="req-42"),
                     timeout=TIMEOUT_S)
    records = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    assert records
    line = text_formatter.format(records[-1])
    assert "request_id=req-42" in line and "code=OK" in line and "method=Segment" in line


def test_model_infer_failure_is_traceable_by_its_request_id(served, monkeypatch, caplog):
    _, channel = served

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret detail in /srv/segsvc/internal.py")

    monkeypatch.setattr(oip_convert, "infer_call", broken)
    stub = opb_grpc.GRPCInferenceServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="segsvc.server"), pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(opb.ModelInferRequest(model_name="tiny", id="infer-7"), timeout=TIMEOUT_S)
    error = info.value
    assert error.code() == grpc.StatusCode.INTERNAL
    trailers = dict(error.trailing_metadata() or ())
    assert trailers.get("x-request-id") == "infer-7"
    assert "secret" not in error.details() and "/srv" not in error.details() and "Traceback" not in error.details()
    assert "infer-7" in error.details()
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "infer-7"]
    assert any(getattr(r, "method", None) == "ModelInfer" and getattr(r, "code", None) == "INTERNAL"
               for r in logged)


def test_model_infer_without_an_id_gets_a_generated_one(served, monkeypatch):
    _, channel = served

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(oip_convert, "infer_call", broken)
    stub = opb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(opb.ModelInferRequest(model_name="tiny"), timeout=TIMEOUT_S)
    assert dict(info.value.trailing_metadata() or ()).get("x-request-id")


def test_refused_requests_are_counted_and_logged(start_server, tmp_path, caplog):
    publish(tmp_path, "tiny", seed=1)
    server = start_server(tmp_path, auth=AuthConfig.parse("infer-tok infer\n"))
    with grpc.insecure_channel(server.address) as channel, caplog.at_level(logging.INFO, logger="segsvc"):
        stub = pb_grpc.SegmentationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(pb.SegmentRequest(model="tiny", image=encode(make_image(16, 16))), timeout=TIMEOUT_S,
                         metadata=(("authorization", "Bearer wrong-secret-token"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    text = metrics_text(server)
    assert metric(text, "segsvc_requests_total", 0.0, code="UNAUTHENTICATED", method="Segment", model="-") == 1
    refused = [r for r in caplog.records if getattr(r, "code", None) == "UNAUTHENTICATED"]
    assert refused and "wrong-secret-token" not in caplog.text
