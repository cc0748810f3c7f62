"""Every bad input gets the right status code and a message that names the problem."""

from __future__ import annotations

import logging
import struct
import zlib

import grpc
import pytest

from segsvc import errors
from segsvc.inference.engine import Engine
from segsvc.server.errors import DEADLINE_SLACK_S, cancellation_code
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import assert_labels_match, encode, make_image, publish


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header declares a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def stub(shared_server):
    with grpc.insecure_channel(shared_server.address, options=[("grpc.max_send_message_length", 16 << 20)]) as ch:
        yield pb_grpc.SegmentationServiceStub(ch)


def _status(stub, request: pb.SegmentRequest) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(request, timeout=30)
    kind = dict(info.value.trailing_metadata() or ()).get("segsvc-error", "")
    return info.value.code(), info.value.details(), kind


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "request_kwargs, kind, words",
    [
        (dict(image=b"this is not an image"), "InvalidImage", "unsupported or undecodable"),
        (dict(image=encode(make_image(32, 32))[:60]), "InvalidImage", "PNG chunk IDAT declares"),
        (dict(image=b""), "InvalidImage", "empty"),
        (dict(), "InvalidImage", "has no image"),
        (dict(image=_png_bomb(100_000, 100_000)), "ImageTooLarge", "over the limit of 64000000 pixels"),
        (dict(raw=pb.RawImage(data=b"", shape=[0, 10])), "InvalidImage", "empty"),
        (dict(raw=pb.RawImage(data=b"\0" * 10, shape=[4, 4, 3])), "InvalidImage", "has 10 bytes but shape [4, 4, 3] needs 48"),
        (dict(raw=pb.RawImage(data=b"\0" * 10, shape=[10])), "InvalidImage", "shape must be"),
        (dict(raw=pb.RawImage(data=b"\0" * 32, shape=[4, 4, 2])), "InvalidImage", "1, 3 or 4 channels"),
        (dict(raw=pb.RawImage(data=b"", shape=[10_000, 10_000])), "ImageTooLarge", "over the limit"),
    ],
)
def test_bad_images_are_invalid_argument(stub, request_kwargs, kind, words):
    code, message, got_kind = _status(stub, pb.SegmentRequest(model="tiny", **request_kwargs))
    assert code == INVALID and words in message and got_kind == kind


@pytest.mark.parametrize(
    "options, words",
    [
        (pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=5)), "tile_size must be 0 (no tiling) or from 16 to 16384"),
        # the manifest's bound, worded for the request (it read "inference tile_size must be at most 16384")
        (pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=20_000)), "tile_size must be 0 (no tiling) or from 16"),
        (pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=32, overlap=1.5)), "overlap must be a fraction"),
        (pb.SegmentOptions(encoding=99), "options.encoding 99"),
        (pb.SegmentOptions(overlay_alpha=2.0), "overlay_alpha must be in (0, 1]"),
    ],
)
def test_bad_options_are_invalid_argument(stub, options, words):
    code, message, _ = _status(stub, pb.SegmentRequest(model="tiny", image=encode(make_image(16, 16)), options=options))
    assert code == INVALID and words in message


def test_uint8_output_for_more_than_256_classes_is_refused(stub):
    request = pb.SegmentRequest(model="wide", image=encode(make_image(16, 16)),
                                options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_RAW_UINT8))
    code, message, _ = _status(stub, request)
    assert code == INVALID and "cannot hold the 300 classes" in message


@pytest.mark.parametrize(
    "model, version, code, kind, words",
    [
        ("nope", 0, grpc.StatusCode.NOT_FOUND, "UnknownModel", "model 'nope' is not loaded"),
        ("tiny", 7, grpc.StatusCode.NOT_FOUND, "UnknownVersion", "version 7 is not loaded"),
        ("tiny", 1, grpc.StatusCode.NOT_FOUND, "UnknownVersion", "load it with LoadModel"),
        ("", 0, INVALID, "InvalidArgument", "names no model and 3 models are loaded"),
    ],
)
def test_unknown_models_and_versions(stub, model, version, code, kind, words):
    got = _status(stub, pb.SegmentRequest(model=model, version=version, image=encode(make_image(16, 16))))
    assert got[0] == code and words in got[1] and got[2] == kind


def test_client_raises_the_same_domain_errors(client):
    with pytest.raises(errors.ImageTooLarge, match="over the limit") as info:
        client.segment(_png_bomb(20_000, 20_000), model="tiny")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.InvalidImage, match="undecodable"):
        client.segment(b"GIF89a....", model="tiny")
    with pytest.raises(errors.UnknownModel):
        client.segment(make_image(8, 8), model="missing")
    with pytest.raises(errors.UnknownVersion):
        client.segment(make_image(8, 8), model="tiny", version=9)
    with pytest.raises(errors.InvalidArgument, match="invalid model name"):
        client.get_model("../etc")
    with pytest.raises(errors.InvalidArgument, match="cannot read image"):
        client.segment("/no/such/file.png", model="tiny")


def test_messages_over_the_limit_are_refused(stub):
    request = pb.SegmentRequest(model="tiny", raw=pb.RawImage(data=b"\0" * (5 << 20), shape=[1024, 1024, 5]))
    code, message, _ = _status(stub, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message


def test_model_management_errors(client):
    with pytest.raises(errors.UnknownModel):
        client.load_model("does-not-exist")
    with pytest.raises(errors.UnknownVersion):
        client.load_model("tiny", 42)
    with pytest.raises(errors.UnknownModel):
        client.unload_model("does-not-exist")
    with pytest.raises(errors.UnknownVersion, match="has no version 42"):  # one on disk is loaded first
        client.set_default_version("tiny", 42)
    with pytest.raises(errors.UnknownModel):
        client.get_model("nothing-here")


def test_stream_reports_per_request_errors_and_goes_on(client, tiny_ref):
    good = make_image(24, 24, seed=3)
    results = client.segment_many(
        [good, b"junk", _png_bomb(9000, 9000), good], model="tiny", progress=False, return_exceptions=True
    )
    assert_labels_match(results[0].mask, tiny_ref, good)
    assert isinstance(results[1], errors.InvalidImage) and not isinstance(results[1], errors.ImageTooLarge)
    assert isinstance(results[2], errors.ImageTooLarge)
    assert_labels_match(results[3].mask, tiny_ref, good)
    with pytest.raises(errors.InvalidImage):
        client.segment_many([good, b"junk"], model="tiny", progress=False)


def test_an_image_the_client_cannot_send_is_its_own_error_in_a_stream(client, tiny_ref):
    """A float array after a good image: before, building its request in gRPC's request thread cancelled the
    whole stream ("Exception iterating requests!") and every result was lost."""
    import numpy as np

    good = make_image(24, 24, seed=3)
    results = client.segment_many([good, np.zeros((8, 8, 3), np.float32), good], model="tiny", progress=False,
                                  return_exceptions=True)
    assert isinstance(results[1], errors.InvalidImage) and "arrays must be uint8" in str(results[1])
    assert_labels_match(results[0].mask, tiny_ref, good)
    assert_labels_match(results[2].mask, tiny_ref, good)
    with pytest.raises(errors.InvalidArgument, match="request_id is not one of its options"):
        client.segment_many([good], model="tiny", progress=False, request_id="mine")


def test_unexpected_errors_are_internal_with_a_generic_message(start_server, tmp_path, monkeypatch, caplog):
    def broken(self, jobs):
        raise RuntimeError("secret detail of the failure")

    monkeypatch.setattr(Engine, "run", broken)
    publish(tmp_path, "m", seed=5)
    server = start_server(tmp_path)
    with caplog.at_level(logging.ERROR, logger="segsvc.server"), server.client() as c:
        with pytest.raises(errors.SegsvcError) as info:
            c.segment(make_image(16, 16), model="m", request_id="rid-77")
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "secret" not in str(info.value) and "rid-77" in str(info.value)
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "rid-77"]
    assert logged and logged[0].exc_info and "secret detail" in str(logged[0].exc_info[1])


@pytest.mark.parametrize("remaining_s, code", [
    (None, grpc.StatusCode.CANCELLED),  # no deadline: only the client can have hung up
    (29.5, grpc.StatusCode.CANCELLED),  # most of the deadline left: the client hung up
    (DEADLINE_SLACK_S + 0.01, grpc.StatusCode.CANCELLED),
    (0.0065, grpc.StatusCode.DEADLINE_EXCEEDED),  # what loopback shows when the client's own deadline fires
    (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
    (-0.2, grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_a_cancellation_near_the_deadline_is_the_deadline(remaining_s, code):
    assert cancellation_code(remaining_s) == code
