"""Responses over the server's gRPC message limit: refused with ResponseTooLarge (INVALID_ARGUMENT), never
gRPC's own RESOURCE_EXHAUSTED ("Sent message larger than max"), which carries no details, reads as "overloaded,
retry" and kills a whole SegmentStream. Where the size is known from the request (raw label maps, confidence,
OIP outputs) the request is refused before any decoding or inference; PNG sizes are checked after encoding."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_status import rpc_status
from tritonclient.utils import InferenceServerException

from segsvc import errors
from segsvc.inference.engine import Engine
from segsvc.server.config import LimitsConfig
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from segsvc.wire import error_info_of
from tests.server.conftest import RunningServer, encode, metric, metrics_text, server_config

LIMIT = 64 << 10  # bytes per message, each way: small enough that small images overflow it

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(shared_repo):
    server = RunningServer(server_config(shared_repo, limits=LimitsConfig(max_message_bytes=LIMIT),
                                         models=("tiny", "wide")))
    yield server
    server.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield pb_grpc.SegmentationServiceStub(ch)


@pytest.fixture
def runs(monkeypatch):
    """The image sizes of every batch the engine runs (nothing is held back)."""
    ran: list[list] = []
    original = Engine.run

    def run(self, jobs):  # type: ignore[no-untyped-def]
        ran.append([j.size for j in jobs])
        return original(self, jobs)

    monkeypatch.setattr(Engine, "run", run)
    return ran


def flat_png(size: int) -> bytes:
    """A tiny PNG of a size x size image: its raw label map is size * size bytes."""
    return encode(np.full((size, size, 3), 90, np.uint8))


def noisy_jpeg(size: int) -> bytes:
    """A small JPEG whose overlay PNG is large (noise does not compress): only known once encoded."""
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 20])
    assert ok
    return buf.tobytes()


def _requests(server: RunningServer, method: str, model: str, code: str) -> float:
    return metric(metrics_text(server), "segsvc_requests_total", 0.0, method=method, model=model, code=code)


def _assert_too_large(error: grpc.RpcError, *words: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert f"over the server's limit of {LIMIT} bytes per message" in error.details()
    assert "--max-message-mb" in error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert dict(error.trailing_metadata())["segsvc-error"] == "ResponseTooLarge"
    assert error_info_of(error.trailing_metadata()).reason == "RESPONSE_TOO_LARGE"
    assert rpc_status.from_call(error).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


# -- segsvc.v1 Segment --------------------------------------------------------------------
def test_raw_labels_and_confidence_over_the_limit_are_refused_before_any_work(server, stub, runs):
    before = _requests(server, "Segment", "tiny", "INVALID_ARGUMENT"), _requests(server, "Segment", "tiny", "OK")
    request = pb.SegmentRequest(model="tiny", image=flat_png(200), options=pb.SegmentOptions(return_confidence=True))
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(request, timeout=60)
    # 200 x 200 raw uint8 labels and as many confidence bytes: 80000 bytes before the rest of the message
    _assert_too_large(info.value, "at least 80000 bytes", "return_confidence", "OUTPUT_ENCODING_PNG")
    assert runs == []  # nothing decoded, nothing inferred
    after = _requests(server, "Segment", "tiny", "INVALID_ARGUMENT"), _requests(server, "Segment", "tiny", "OK")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)
    # the segsvc client raises the domain error, not Overloaded ("back off and retry": it never would succeed)
    with server.client(timeout_s=60) as client:
        with pytest.raises(errors.ResponseTooLarge, match="return_confidence") as raised:
            client.segment(flat_png(200), model="tiny", confidence=True)
    assert not isinstance(raised.value, errors.Overloaded) and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # the same image fits as a PNG label map
    small = stub.Segment(pb.SegmentRequest(model="tiny", image=flat_png(200),
                                           options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_PNG)), timeout=60)
    assert (small.labels.height, small.labels.width) == (200, 200)


def test_an_encoded_response_over_the_limit_is_refused_after_encoding(server, stub, runs):
    before = _requests(server, "Segment", "tiny", "INVALID_ARGUMENT"), _requests(server, "Segment", "tiny", "OK")
    request = pb.SegmentRequest(model="tiny", image=noisy_jpeg(200),
                                options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_OVERLAY_PNG))
    assert request.ByteSize() < LIMIT
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(request, timeout=60)
    _assert_too_large(info.value, "the response is", "OUTPUT_ENCODING_PNG", "smaller image")
    assert len(runs) == 1  # a PNG's size is known only once it is encoded
    after = _requests(server, "Segment", "tiny", "INVALID_ARGUMENT"), _requests(server, "Segment", "tiny", "OK")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)  # not counted OK


def test_an_oversized_item_fails_only_its_own_stream_response(server, stub):
    before = _requests(server, "SegmentStream", "tiny", "INVALID_ARGUMENT")
    small = flat_png(24)
    requests = [
        pb.SegmentRequest(model="tiny", image=small, request_id="a"),
        pb.SegmentRequest(model="tiny", image=flat_png(200), request_id="raw",
                          options=pb.SegmentOptions(return_confidence=True)),
        pb.SegmentRequest(model="tiny", image=noisy_jpeg(200), request_id="overlay",
                          options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_OVERLAY_PNG)),
        pb.SegmentRequest(model="tiny", image=small, request_id="b"),
    ]
    responses = {r.request_id: r for r in stub.SegmentStream(iter(requests), timeout=120)}  # the stream ends OK
    assert sorted(responses) == ["a", "b", "overlay", "raw"]
    for rid in ("a", "b"):
        assert not responses[rid].HasField("error") and responses[rid].labels.height == 24
    for rid in ("raw", "overlay"):
        error = responses[rid].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and error.kind == "ResponseTooLarge"
        assert f"over the server's limit of {LIMIT} bytes per message" in error.message
    assert _requests(server, "SegmentStream", "tiny", "INVALID_ARGUMENT") - before == 2


# -- Open Inference Protocol ModelInfer -----------------------------------------------------
def _infer(server: RunningServer, model: str, *images: bytes, outputs: tuple[str, ...] = ("labels",)):
    client = triton.InferenceServerClient(server.address)
    try:
        tensor = triton.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        return client.infer(model, [tensor], outputs=[triton.InferRequestedOutput(o) for o in outputs])
    finally:
        client.close()


def _refused(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (info.value.status(), info.value.message())
    message = info.value.message()
    assert f"over the server's limit of {LIMIT} bytes per message" in message and "--max-message-mb" in message
    return message


@pytest.mark.parametrize("model, count, outputs, size, words", [
    ("tiny", 2, ("labels",), 200, ("at least 80000 bytes", "fewer images")),  # N x H x W uint8 labels
    ("tiny", 1, ("labels", "confidence"), 200, ("at least 80000 bytes", "'confidence'")),
    ("wide", 1, ("labels",), 200, ("at least 80000 bytes", "UINT16")),  # 300 classes: 2 bytes a label
])
def test_model_infer_outputs_over_the_limit_are_refused_before_any_work(server, runs, model, count, outputs, size,
                                                                          words):
    before = sum(_requests(server, "ModelInfer", m, "INVALID_ARGUMENT") for m in ("-", model))
    message = _refused(lambda: _infer(server, model, *[flat_png(size)] * count, outputs=outputs))
    for word in words:
        assert word in message, message
    assert runs == []
    assert sum(_requests(server, "ModelInfer", m, "INVALID_ARGUMENT") for m in ("-", model)) - before == 1


def test_model_infer_response_over_the_limit_after_building_it(server, runs):
    """256 x 256 uint8 labels are exactly the limit: the outputs fit, the response around them does not."""
    before = _requests(server, "ModelInfer", "tiny", "INVALID_ARGUMENT"), _requests(server, "ModelInfer", "tiny", "OK")
    message = _refused(lambda: _infer(server, "tiny", flat_png(256)))
    assert "the response is" in message
    after = _requests(server, "ModelInfer", "tiny", "INVALID_ARGUMENT"), _requests(server, "ModelInfer", "tiny", "OK")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)
    assert _infer(server, "tiny", flat_png(128)).as_numpy("labels").shape == (1, 128, 128)


# -- the segsvc client's own message limit, and limits that differ between client and server ----------------
def noisy_png(size: int) -> bytes:
    """A PNG of noise, which does not compress: about 3 * size * size bytes on the wire."""
    return encode(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_an_image_over_the_clients_own_limit_is_its_own_error_in_a_stream(server):
    """gRPC refuses to send a message over the client's ``max_message_bytes`` (RESOURCE_EXHAUSTED "Sent message
    larger than max"): that read as Overloaded ("back off and retry", which never helps) and, in segment_many,
    ended the whole stream with every other image's result lost. It is that image's ImageTooLarge, by size."""
    big, small = noisy_png(200), flat_png(24)
    assert len(big) > LIMIT
    with server.client(timeout_s=120, max_message_bytes=LIMIT) as client:
        results = client.segment_many([small, big, small], model="tiny", progress=False, return_exceptions=True)
        assert isinstance(results[1], errors.ImageTooLarge), results[1]
        assert f"over this client's limit of {LIMIT} bytes per message" in str(results[1])
        assert [r.mask.shape for r in (results[0], results[2])] == [(24, 24)] * 2
        with pytest.raises(errors.ImageTooLarge, match="max_message_bytes"):
            client.segment(big, model="tiny")


def test_messages_over_the_other_ends_limit_name_that_limit_not_overloaded(server):
    """A request over the server's limit, or a response over the client's: gRPC's own RESOURCE_EXHAUSTED, which
    the client turned into Overloaded ("back off and retry"); the same call always fails, so it is the caller's
    to change, and the error says which limit and how to change it."""
    big = noisy_png(200)
    with server.client(timeout_s=120) as client:  # the client's default limit (64 MiB) is far above the server's
        with pytest.raises(errors.ImageTooLarge) as request_refused:
            client.segment(big, model="tiny")
    message = str(request_refused.value)
    assert f"over the server's limit of {LIMIT} bytes per message" in message and "--max-message-mb" in message
    with server.client(timeout_s=120, max_message_bytes=LIMIT // 4) as client:  # 200 x 200 labels do not fit
        with pytest.raises(errors.ResponseTooLarge) as response_refused:
            client.segment(flat_png(200), model="tiny")
    assert f"over this client's limit of {LIMIT // 4} bytes per message" in str(response_refused.value)
    assert "max_message_bytes" in str(response_refused.value)
