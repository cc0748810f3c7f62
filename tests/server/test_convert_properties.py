"""Properties of the request conversion: any message becomes valid options or ``InvalidArgument``.

``convert`` is the only place that reads client messages, so whatever a
client can put on the wire (unknown enum values, NaN and infinite floats,
huge sizes, raw tensors whose shape and data disagree) must come out as valid
arguments for the layers below, or as the INVALID_ARGUMENT family, never as
another exception that the server would report as INTERNAL.
"""

from __future__ import annotations

import math
import re
import struct
import zlib

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from segsvc.config import MIN_TILE_SIZE
from segsvc.errors import InvalidArgument, InvalidImage
from segsvc.inference.admission import MAX_TILE_OVERLAP
from segsvc.inference.engine import InferenceOptions
from segsvc.server import convert
from segsvc.v1 import segmentation_pb2 as pb

# No wall-clock deadline: a loaded host stalls an example for seconds; the pytest timeout catches a hang.
PROPERTY = settings(max_examples=200, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.timeout(120)

# Valid values more often than not, so that later checks are reached behind earlier ones.
FLOATS = st.one_of(st.floats(0, 1, width=32), st.floats(0, 1, width=32), st.floats(width=32),
                   st.sampled_from([0.0, -0.0, 1.0, 0.75, 0.7500001, 1e-45, -1.0]),
                   st.sampled_from([math.nan, math.inf, -math.inf, 1e39]))  # 1e39 overflows float32 to inf
ENUMS = st.one_of(st.sampled_from(sorted(convert.ENCODINGS)), st.sampled_from(sorted(convert.ENCODINGS)),
                  st.integers(-(2**31), 2**31 - 1))


@st.composite
def _options(draw: st.DrawFn) -> pb.SegmentOptions:
    msg = pb.SegmentOptions(encoding=draw(ENUMS), return_confidence=draw(st.booleans()),
                            return_class_counts=draw(st.booleans()), flip_tta=draw(st.booleans()))
    msg.overlay_alpha = draw(FLOATS)
    if draw(st.booleans()):
        msg.tiling.tile_size = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 15, 16, 17, 512])))
        if draw(st.booleans()):
            msg.tiling.overlap = draw(FLOATS)
    return msg


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _float32(value: float) -> bytes:
    """Little-endian float32 bytes; doubles beyond float32's range become a signed infinity, as a cast does."""
    try:
        return struct.pack("<f", value)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, value))


@st.composite
def _wire_options(draw: st.DrawFn) -> pb.SegmentOptions:
    """Messages parsed from random wire records: unknown fields, out-of-range enums, repeated and nested fields."""
    data = b""
    for _ in range(draw(st.integers(0, 6))):
        field, wire = draw(st.integers(1, 9)), draw(st.sampled_from([0, 1, 2, 5]))
        if wire == 0:
            payload = _varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 2:
            inner = draw(st.binary(max_size=12))
            if field == 4 and draw(st.booleans()):  # a TilingOptions: tile_size (varint), overlap (fixed32)
                inner = (b"\x08" + _varint(draw(st.integers(0, 2**64 - 1)))
                         + b"\x15" + _float32(draw(FLOATS)))
            payload = _varint(len(inner)) + inner
        else:
            payload = draw(st.binary(min_size=4 if wire == 5 else 8, max_size=4 if wire == 5 else 8))
        data += _varint(field << 3 | wire) + payload
    try:
        return pb.SegmentOptions.FromString(data)
    except DecodeError:  # a known field with the wrong wire type
        assume(False)
        raise


def _check_options(msg: pb.SegmentOptions) -> None:
    try:
        options, fmt = convert.options_from_proto(msg)
    except InvalidArgument as exc:
        event(f"refused: {str(exc).split()[0]}")
        return
    event("accepted")
    assert isinstance(options, InferenceOptions) and isinstance(fmt, convert.OutputFormat)
    assert fmt.encoding in convert.ENCODINGS and fmt.encoding == msg.encoding
    assert math.isfinite(fmt.overlay_alpha) and 0.0 < fmt.overlay_alpha <= 1.0
    assert fmt.overlay_alpha == (msg.overlay_alpha or convert.DEFAULT_OVERLAY_ALPHA)
    # unset tiling, overlap and flip_tta stay None: the model manifest's default
    assert options.tile_size is None or options.tile_size == 0 or options.tile_size >= MIN_TILE_SIZE
    assert options.tile_size == (msg.tiling.tile_size if msg.HasField("tiling") else None)
    overlap_set = msg.HasField("tiling") and msg.tiling.HasField("overlap")
    if overlap_set:
        assert math.isfinite(options.tile_overlap) and 0.0 <= options.tile_overlap <= MAX_TILE_OVERLAP
    assert options.tile_overlap == (msg.tiling.overlap if overlap_set else None)
    assert options.flip_tta == (msg.flip_tta if msg.HasField("flip_tta") else None)
    assert (options.confidence, options.class_counts) == (msg.return_confidence, msg.return_class_counts)


@PROPERTY
@given(_options())
def test_options_are_valid_or_invalid_argument(msg):
    _check_options(msg)


@PROPERTY
@given(_wire_options())
def test_options_from_arbitrary_wire_bytes_are_valid_or_invalid_argument(msg):
    _check_options(msg)


def test_options_edge_values():
    """The values the properties must meet at least once, pinned."""
    ok = convert.options_from_proto(pb.SegmentOptions(overlay_alpha=1.0, tiling=pb.TilingOptions(tile_size=16)))
    assert ok[0].tile_size == 16 and ok[0].tile_overlap is None and ok[1].overlay_alpha == 1.0  # the model's overlap
    assert convert.options_from_proto(pb.SegmentOptions(flip_tta=False))[0].flip_tta is False  # explicit: overrides
    off = convert.options_from_proto(pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=0)))[0]
    assert off.tile_size == 0 and off.flip_tta is None  # tiling explicitly off, TTA the model's default
    options, fmt = convert.options_from_proto(pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=32, overlap=0.0)))
    assert options.tile_overlap == 0.0  # an explicit 0 is not "unset"
    assert fmt.overlay_alpha == convert.DEFAULT_OVERLAY_ALPHA  # 0 (unset) means the default opacity
    assert convert.options_from_proto(pb.SegmentOptions())[0] == InferenceOptions()
    for bad in (pb.SegmentOptions(encoding=99), pb.SegmentOptions(overlay_alpha=math.nan),
                pb.SegmentOptions(overlay_alpha=-0.5), pb.SegmentOptions(overlay_alpha=math.inf),
                pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=15)),
                pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=64, overlap=math.nan)),
                pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=64, overlap=-math.inf)),
                pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=64, overlap=0.9))):
        with pytest.raises(InvalidArgument):
            convert.options_from_proto(bad)


# -- image sources ------------------------------------------------------------------------------------
def _png(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@st.composite
def _requests(draw: st.DrawFn) -> pb.SegmentRequest:
    request = pb.SegmentRequest(request_id=draw(st.text(max_size=8)), model=draw(st.text(max_size=8)))
    which = draw(st.sampled_from(["none", "image", "image", "raw", "raw"]))
    if which == "image":
        w, h = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        rows = b"".join(b"\0" + bytes([r]) * w for r in range(h))
        data = draw(st.one_of(st.binary(max_size=64), st.just(_png(w, h, rows)),
                              st.just(_png(w, h, rows + b"\0" * draw(st.integers(0, 1 << 17))))))
        request.image = data
    elif which == "raw":
        dims = st.one_of(st.integers(0, 12), st.sampled_from([2**31, 2**32 - 1]))
        shape = draw(st.one_of(st.lists(dims, max_size=4),
                               st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3, 4])).map(list),
                               st.tuples(st.integers(1, 12), st.integers(1, 12)).map(list)))
        product = math.prod(shape) if shape and max(shape) <= 12 else draw(st.integers(0, 64))
        size = max(0, product + draw(st.sampled_from([0, 0, 0, -1, 1])))
        request.raw.shape.extend(shape)
        request.raw.data = draw(st.binary(min_size=size, max_size=size))
    return request


@PROPERTY
@given(_requests(), st.integers(1, 1 << 20))
def test_image_sources_load_an_image_or_invalid_image(request, max_pixels):
    try:
        image = convert.image_source(request).load(max_pixels)
    except InvalidImage as exc:
        event(f"{request.WhichOneof('input')} refused: {' '.join(str(exc).split()[:2])}")
        return
    event(f"{request.WhichOneof('input')} loaded")
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    assert 0 < image.shape[0] * image.shape[1] <= max_pixels
    if request.WhichOneof("input") == "raw":
        shape = tuple(request.raw.shape)
        assert image.shape[:2] == shape[:2]
        full = np.frombuffer(request.raw.data, np.uint8).reshape(shape)
        assert np.array_equal(image, full if full.ndim == 2 else full[:, :, 0] if shape[2] == 1 else full[:, :, :3])


def test_a_request_without_an_image_is_invalid():
    with pytest.raises(InvalidImage, match="the request has no image"):
        convert.image_source(pb.SegmentRequest(model="m"))


def test_client_requests_leave_unset_options_to_the_model_and_send_explicit_ones():
    """What the client sends is what the server resolves: unset -> the manifest's default, 0/False -> off."""
    from segsvc.client import SegmentationClient

    def options(**kwargs) -> InferenceOptions:
        return convert.options_from_proto(SegmentationClient.build_request(b"png", **kwargs).options)[0]

    assert options() == InferenceOptions()  # tiling, overlap and flip TTA: the model's defaults
    off = options(tile_size=0, flip_tta=False)
    assert (off.tile_size, off.tile_overlap, off.flip_tta) == (0, None, False)
    on = options(tile_size=64, tile_overlap=0.5, flip_tta=True)
    assert (on.tile_size, on.tile_overlap, on.flip_tta) == (64, 0.5, True)


@pytest.mark.parametrize("overlap", [math.nan, math.inf, -math.inf, 0.9, -0.1])
def test_a_refused_overlap_names_the_real_bound(overlap):
    """NaN, infinite and out-of-range overlaps are all refused with the bound InferenceOptions enforces."""
    with pytest.raises(InvalidArgument, match=re.escape(f"[0, {MAX_TILE_OVERLAP}]")) as info:
        convert.options_from_proto(pb.SegmentOptions(tiling=pb.TilingOptions(tile_size=64, overlap=overlap)))
    assert "options.tiling" in str(info.value) and "[0, 1)" not in str(info.value)
