"""Properties of the codec: whatever the bytes, the answer is a well-formed image or ``InvalidImage``.

The example tests in ``test_codec.py`` pin each refusal; these throw arbitrary
bytes, damaged real files and random raw tensors at the same functions and
check that nothing else comes out: no other exception, no image over the
pixel limit, no shape that disagrees with the header, no slow answer.
"""

from __future__ import annotations

import gc
import math
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segsvc.errors import InvalidImage
from segsvc.inference.codec import decode_image, encode_png, image_header, raw_image

# Deterministic for CI. No wall-clock deadline: a loaded host stalls an example for seconds (the pytest timeout
# catches a hang). The CPU time of each decode is held to CPU_LIMIT_S instead (a decoder trusting a bomb burns
# seconds): this thread's time, with the collector paused, so neither other threads nor a full collection
# of the whole test process (over a second late in the suite) is counted.
PROPERTY = settings(max_examples=200, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
CPU_LIMIT_S = 0.5
MAX_PIXELS = 1 << 16  # small, so that random headers also meet the pixel limit
pytestmark = pytest.mark.timeout(120)  # a decoder that hangs fails here instead of stalling CI

_Y, _X = np.mgrid[:11, :13]
IMAGE = np.dstack([_X * 19, _Y * 23, (_X * _Y) % 256]).astype(np.uint8)


def _bgr_encode(ext: str, params: tuple = ()) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(IMAGE[:, :, ::-1]), list(params))
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _adam7_rows(grey: np.ndarray) -> bytes:
    """Filter-0 rows of an 8-bit grey image in Adam7 pass order (OpenCV writes no interlaced PNG)."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    subs = [grey[y0::dy, x0::dx] for x0, y0, dx, dy in passes]
    return b"".join(b"\0" + row.tobytes() for sub in subs if sub.size for row in sub)


def _bigtiff() -> bytes:
    """OpenCV writes no BigTIFF: an uncompressed one-strip RGB BigTIFF by hand."""
    pixels = IMAGE.tobytes()
    pixels += b"\0" * (len(pixels) % 2)
    tags = [(256, 4, 13), (257, 4, 11), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 16, 16), (277, 3, 3),
            (278, 4, 11), (279, 4, IMAGE.size)]
    entries = b"".join(struct.pack("<HHQ", tag, kind, 1) + struct.pack("<Q", value) for tag, kind, value in tags)
    return (b"II+\x00" + struct.pack("<HHQ", 8, 0, 16 + len(pixels)) + pixels + struct.pack("<Q", len(tags))
            + entries + struct.pack("<Q", 0))


SEEDS = {
    "png": encode_png(IMAGE),
    "png-grey": encode_png(IMAGE[:, :, 0].copy()),
    "png-palette-ancillary": b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 13, 11, 4, 3, 0, 0, 0))
    + _chunk(b"PLTE", bytes(range(48))) + _chunk(b"tEXt", b"k\0v")
    + _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + bytes(range(r, r + 7)) for r in range(11))))
    + _chunk(b"IEND", b""),
    "png-interlaced": b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 13, 11, 8, 0, 0, 0, 1))
    + _chunk(b"IDAT", zlib.compress(_adam7_rows(IMAGE[:, :, 1]))) + _chunk(b"IEND", b""),
    "jpeg": _bgr_encode(".jpg"),
    "jpeg-progressive": _bgr_encode(".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    "tiff": _bgr_encode(".tif"),
    "bigtiff": _bigtiff(),
    "bmp": _bgr_encode(".bmp"),
    "webp-lossy": _bgr_encode(".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),
    "webp-lossless": _bgr_encode(".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
}
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM", b"RIFF"]


def _check_decoded_or_refused(data: bytes) -> str:
    """The property: a uint8 HxW / HxWx3 image within the limit that matches its header, or InvalidImage.

    Returns what happened, for ``event`` (``--hypothesis-show-statistics`` shows what was exercised).
    """
    try:
        header = image_header(data)
    except InvalidImage:
        header = None
    gc.disable()
    start = time.thread_time()
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS)
    except InvalidImage as exc:
        return f"refused: {' '.join(str(exc).split()[:2])}"
    finally:
        took = time.thread_time() - start
        gc.enable()
        assert took < CPU_LIMIT_S, "decoding took seconds of CPU"
    assert header is not None, "decode_image accepted bytes that image_header refuses"
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    assert image.shape[:2] == (header.height, header.width)
    assert 0 < image.shape[0] * image.shape[1] <= MAX_PIXELS
    return f"decoded {header.format}"


def test_every_seed_decodes():
    for name, data in SEEDS.items():
        assert decode_image(data).shape[:2] == (11, 13), name


@PROPERTY
@given(st.one_of(st.binary(max_size=256),
                 st.tuples(st.sampled_from(MAGICS), st.binary(max_size=256)).map(b"".join),
                 st.tuples(st.sampled_from(MAGICS), st.binary(min_size=4, max_size=4), st.just(b"WEBP"),
                           st.binary(max_size=64)).map(b"".join)))
def test_arbitrary_bytes_decode_or_are_refused(data):
    event(_check_decoded_or_refused(data))


def _size_fields(data: bytes) -> list[tuple[int, str]]:
    """Offsets of 2- and 4-byte integers (either byte order) whose value could be a size or offset in ``data``.

    Lengths, offsets and dimensions are where decoders trust the file, so the
    damage below aims at them as well as at random bytes.
    """
    return [(at, fmt) for at in range(len(data) - 3) for fmt in (">I", "<I", ">H", "<H")
            if 0 < struct.unpack_from(fmt, data, at)[0] <= len(data)]


SIZE_FIELDS = {name: _size_fields(data) for name, data in SEEDS.items()}


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    """A real file of some format with a size field set to an extreme, random byte changes, a cut or a splice."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    if draw(st.booleans()):
        at, fmt = draw(st.sampled_from(SIZE_FIELDS[name]))
        top = 0xFFFF if fmt.endswith("H") else 0xFFFFFFFF
        value = draw(st.sampled_from([0, 1, len(data) + 1, top >> 1, top]))
        data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(4, max(4, len(data))))  # past the magic: arbitrary prefixes are tested above
        kind = draw(st.sampled_from(["set", "set", "set", "cut", "insert", "delete"]))
        if kind == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, data[at] ^ 1, data[at] ^ 0x80]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@PROPERTY
@given(_damaged())
def test_damaged_real_files_decode_or_are_refused(data):
    event(_check_decoded_or_refused(data))


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_size_field_set_to_an_extreme_is_decoded_or_refused_quickly(name):
    """Not sampled but swept: each candidate size field of each seed, set to each extreme value.

    A decoder that trusts one of them allocates gigabytes and takes seconds (the
    IDAT bomb took OpenCV 1-2 s on these 100-byte seeds); a tiny image takes about a millisecond.
    """
    seed = SEEDS[name]
    for at, fmt in SIZE_FIELDS[name]:
        top = 0xFFFF if fmt.endswith("H") else 0xFFFFFFFF
        for value in (0, 1, len(seed) + 1, top >> 1, top):
            data = seed[:at] + struct.pack(fmt, value) + seed[at + struct.calcsize(fmt) :]
            try:
                _check_decoded_or_refused(data)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {fmt} at {at} set to {value:#x}: {exc}") from None


@PROPERTY
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_truncated_files_are_refused(name, data):
    """A cut anywhere short of the last byte is refused (JPEG: anywhere before its end marker)."""
    seed = SEEDS[name]
    end = len(seed) - 2 if name.startswith("jpeg") else len(seed)  # the EOI marker's two bytes
    cut = data.draw(st.integers(0, end - 1))
    if name.startswith("png"):  # a cut after the IEND type field leaves only the CRC short: libpng refuses it
        cut = min(cut, len(seed) - 9)
    with pytest.raises(InvalidImage):
        decode_image(seed[:cut])


@PROPERTY
@given(st.one_of(hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24))),
                 hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3)))))
def test_png_round_trip(image):
    decoded = decode_image(encode_png(image))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, image)


@st.composite
def _raw_request(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A raw tensor: mostly well-formed shapes (so the checks behind the first are reached), with edge values."""
    dim = st.one_of(st.integers(1, 12), st.integers(1, 12), st.integers(-2, 0),
                    st.sampled_from([2**31, 2**32 - 1, 2**40]))
    rank = draw(st.sampled_from([2, 3, 3, 3, 0, 1, 4]))
    shape = [draw(dim) for _ in range(rank)]
    if rank == 3:
        shape[2] = draw(st.one_of(st.sampled_from([1, 3, 4]), st.integers(0, 5)))
    size = math.prod(shape) if shape and all(0 <= s <= 12 for s in shape) else draw(st.integers(0, 64))
    size = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1])))
    return draw(st.binary(min_size=size, max_size=size)), shape


@PROPERTY
@given(_raw_request(), st.one_of(st.integers(1, 150), st.just(MAX_PIXELS)))
def test_raw_image_is_exact_or_refused(request, max_pixels):
    data, shape = request
    try:
        image = raw_image(data, shape, max_pixels=max_pixels)
    except InvalidImage:
        ok = (len(shape) in (2, 3) and shape[0] > 0 and shape[1] > 0 and (len(shape) == 2 or shape[2] in (1, 3, 4))
              and shape[0] * shape[1] <= max_pixels and len(data) == math.prod(shape))
        assert not ok, f"a valid raw tensor {shape} was refused"
        return
    assert 0 < shape[0] * shape[1] <= max_pixels
    _check_raw(image, data, shape)


def _check_raw(image: np.ndarray, data: bytes, shape: list[int]) -> None:
    full = np.frombuffer(data, np.uint8).reshape(shape)
    expected = full if len(shape) == 2 else full[:, :, 0] if shape[2] == 1 else full[:, :, :3]
    assert image.dtype == np.uint8 and np.array_equal(image, expected)
    assert image.ndim == 2 or image.shape[2] == 3  # grey or RGB, like every image in segsvc
    assert image.flags.writeable and not np.shares_memory(image, np.frombuffer(data, np.uint8))


@PROPERTY
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([[], [1], [3], [4], [0], [2], [5], [255]]), st.data())
def test_raw_tensors_of_the_right_size_come_back_exactly_unless_their_channels_are_wrong(height, width, channels, data):
    shape = [height, width, *channels]
    pixels = data.draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape)))
    if channels and channels[0] not in (1, 3, 4):
        with pytest.raises(InvalidImage, match=f"^raw image must have 1, 3 or 4 channels, got {channels[0]}$"):
            raw_image(pixels, shape)
    else:
        _check_raw(raw_image(pixels, shape), pixels, shape)  # grey, or RGB: a fourth (alpha) channel is dropped
