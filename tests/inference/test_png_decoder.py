"""PNG decoding through Pillow: the arrays OpenCV gave for every kind of PNG, damaged files refused, no own limit."""

from __future__ import annotations

import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from segsvc.errors import InvalidImage
from segsvc.inference import codec
from segsvc.inference.codec import decode_image

from tests.inference.test_codec import ADAM7, PNG_SIGNATURE, _chunk, _ihdr, _refused

SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
KINDS = [(colour, depth, interlace, trns) for colour, depths in DEPTHS.items() for depth in depths
         for interlace in (0, 1) for trns in ((False, True) if colour in (0, 2, 3) else (False,))]


def _random_png(width: int, height: int, depth: int, colour: int, interlace: int, trns: bool, seed: int) -> bytes:
    """Random samples behind random filter bytes (any filtered bytes are valid), with a palette and tRNS."""
    rng = np.random.default_rng(seed)
    bits = SAMPLES[colour] * depth
    rows = b""
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        pass_w, pass_h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_w > 0 and pass_h > 0:
            for _ in range(pass_h):
                rows += bytes([int(rng.integers(0, 5))]) + rng.bytes((pass_w * bits + 7) // 8)
    extra = b""
    if colour == 3:
        extra += _chunk(b"PLTE", rng.bytes(3 << depth))
    if trns:
        extra += _chunk(b"tRNS", {0: struct.pack(">H", 1), 2: struct.pack(">HHH", 1, 2, 3),
                                  3: rng.bytes(min(1 << depth, 7))}[colour])
    return (PNG_SIGNATURE + _ihdr(width, height, depth, colour, interlace) + extra
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def _as_opencv_decoded(data: bytes) -> np.ndarray:
    """What ``decode_image`` returned when OpenCV decoded PNG: its flags and conversions."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
    return image


@pytest.mark.parametrize("colour, depth, interlace, trns", KINDS,
                         ids=[f"c{c}-d{d}-i{i}{'-trns' if t else ''}" for c, d, i, t in KINDS])
@pytest.mark.parametrize("width, height", [(1, 1), (13, 7), (53, 37)])
def test_every_kind_of_png_decodes_to_the_array_opencv_gave(colour, depth, interlace, trns, width, height):
    data = _random_png(width, height, depth, colour, interlace, trns, seed=width * 1000 + depth * 10 + colour)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns on a palette with transparency converted straight to RGB
        image = decode_image(data)
    expected = _as_opencv_decoded(data)
    assert image.dtype == np.uint8 and image.shape == expected.shape
    assert np.array_equal(image, expected)
    assert image.flags.writeable and image.flags.c_contiguous


def test_a_damaged_idat_chunk_is_refused_by_its_crc():
    """libpng refused it; Pillow does not look at IDAT CRCs and would decode the damaged pixels."""
    data = bytearray(_random_png(53, 37, 8, 2, 0, False, seed=1))
    at = data.index(b"IDAT") + 4 + 100
    data[at] ^= 0x01  # one bit flipped inside the compressed pixels, the CRC left as it was
    _refused(bytes(data), "PNG IDAT chunk 1 of 1 fails its CRC check (the file is damaged)")


@pytest.mark.parametrize("case", ["filter-byte-5", "not-zlib"])
def test_pixel_data_that_does_not_decode_is_refused(case):
    idat = b"\x78\x9c\xff\xff\xff" if case == "not-zlib" else zlib.compress((b"\x05" + bytes(24)) * 24)
    data = PNG_SIGNATURE + _ihdr(24, 24) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    _refused(data, "PNG data could not be decoded (corrupt or truncated)")


def test_a_stream_that_ends_before_the_declared_rows_decodes_them_as_zeros():
    """Pillow's reading of such a file (and browsers'); libpng refused it. A file cut short is refused before
    any decoder by the container walk (its chunks no longer fit), so only a writer's bug makes one of these."""
    rows = (b"\0" + bytes(range(1, 25))) * 12  # 12 of the 24 rows, then the stream's end
    data = PNG_SIGNATURE + _ihdr(24, 24) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    image = decode_image(data)
    assert (image[:12] == np.arange(1, 25)).all() and not image[12:].any()


def test_whatever_pillow_raises_is_an_invalid_image(monkeypatch):
    def load(self):
        raise KeyError("a parser bug on hostile bytes")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(InvalidImage, match=r"^PNG data could not be decoded \(corrupt or truncated\)$"):
        decode_image(_random_png(13, 7, 8, 0, 0, False, seed=2))


def test_pillows_own_pixel_limit_does_not_apply(monkeypatch):
    """The server's ``max_pixels`` decides; ``Image.open`` would refuse at twice Pillow's global limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _random_png(53, 37, 8, 0, 0, False, seed=3)
    assert decode_image(data, max_pixels=53 * 37).shape == (37, 53)


def test_16_bit_grey_keeps_its_top_byte():
    samples = np.array([[0x0000, 0x00FF, 0x0100, 0xFFFF, 0x8001]], ">u2")
    data = (PNG_SIGNATURE + _ihdr(5, 1, 16, 0) + _chunk(b"IDAT", zlib.compress(b"\0" + samples.tobytes()))
            + _chunk(b"IEND", b""))
    assert decode_image(data).tolist() == [[0x00, 0x00, 0x01, 0xFF, 0x80]]
    assert codec._decode_png(data).dtype == np.uint8


def test_a_second_colour_profile_is_refused_before_pillow_inflates_it():
    """Pillow inflates every iCCP chunk, each up to 1 MiB: 2,000 of 1 kB (a 2 MB file) cost 2 GB of inflating,
    and the walk allows 65,536 chunks. The format allows one profile; libpng refused a second one too."""
    icc = _chunk(b"iCCP", b"p\0\0" + zlib.compress(bytes(1 << 20), 9))
    pixels = _chunk(b"IDAT", zlib.compress(bytes(9 * 8))) + _chunk(b"IEND", b"")
    assert decode_image(PNG_SIGNATURE + _ihdr(8, 8) + icc + pixels).shape == (8, 8)  # one profile is fine
    _refused(PNG_SIGNATURE + _ihdr(8, 8) + icc * 2 + pixels,
             "PNG has a second iCCP chunk (colour profile); the format allows one")
