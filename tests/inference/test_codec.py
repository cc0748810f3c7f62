"""Image decoding: header sizes for every format, decompression bombs refused before decoding."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from segsvc.errors import ImageTooLarge, InvalidArgument, InvalidImage
from segsvc.inference.codec import colorize, decode_image, encode_png, image_header, overlay, raw_image

RGB = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)


def _encode(image: np.ndarray, ext: str, params=()) -> bytes:
    bgr = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])
    ok, buf = cv2.imencode(ext, bgr, list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    "ext, fmt, params",
    [(".png", "png", ()), (".jpg", "jpeg", ()), (".jpg", "jpeg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
     (".tif", "tiff", ()), (".bmp", "bmp", ()), (".webp", "webp", ()),
     (".webp", "webp", (cv2.IMWRITE_WEBP_QUALITY, 101))],  # lossy (VP8) and lossless (VP8L)
)
def test_header_and_decode_of_every_format(ext, fmt, params):
    data = _encode(RGB, ext, params)
    header = image_header(data)
    assert (header.format, header.width, header.height) == (fmt, 53, 37)
    image = decode_image(data)
    assert image.shape == (37, 53, 3) and image.dtype == np.uint8
    if ext in (".png", ".tif", ".bmp") or (cv2.IMWRITE_WEBP_QUALITY, 101) == tuple(params):
        assert np.array_equal(image, RGB)  # lossless formats round-trip exactly, in RGB order


def test_grey_16_bit_and_alpha_images():
    grey = RGB[:, :, 0]
    assert np.array_equal(decode_image(_encode(grey, ".png")), grey)
    deep = grey.astype(np.uint16) * 257
    assert np.array_equal(decode_image(_encode(deep, ".png")), grey)  # 16-bit keeps the high byte
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]]))
    assert np.array_equal(decode_image(buf.tobytes()), RGB)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


BOMBS = {
    "png": b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)),
    "jpeg": b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
    + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60_000, 60_000, 1) + b"\x01\x11\x00",
    "tiff": b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2)
    + struct.pack("<HHII", 256, 4, 1, 100_000) + struct.pack("<HHII", 257, 4, 1, 100_000) + b"\0\0\0\0",
    "bmp": b"BM" + b"\0" * 12 + struct.pack("<Iii", 40, 30_000, -30_000) + b"\0" * 28,
    "webp": b"RIFF" + struct.pack("<I", 30) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
    + (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little"),
}


@pytest.mark.parametrize("fmt", sorted(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(fmt):
    header = image_header(BOMBS[fmt])
    assert header.format == fmt and header.width * header.height > 64_000_000
    with pytest.raises(ImageTooLarge, match="over the limit"):
        decode_image(BOMBS[fmt])


def test_pixel_limit_is_configurable():
    data = _encode(RGB, ".png")
    with pytest.raises(ImageTooLarge, match="37 = 1961 pixels, over the limit of 1000"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=1961).shape == (37, 53, 3)


@pytest.mark.parametrize(
    "data, words",
    [(b"", "empty"), (b"GIF89a" + b"\0" * 20, "unsupported"), (b"\x89PNG\r\n\x1a\n\0\0", "IHDR"),
     (_encode(RGB, ".png")[:80], "could not be decoded")],
)
def test_bad_bytes_are_invalid_images(data, words):
    with pytest.raises(InvalidImage, match=words):
        decode_image(data)


def test_raw_images():
    assert np.array_equal(raw_image(RGB.tobytes(), RGB.shape), RGB)
    assert raw_image(RGB[:, :, 0].tobytes(), (37, 53)).shape == (37, 53)
    assert raw_image(RGB[:, :, :1].tobytes(), (37, 53, 1)).shape == (37, 53)
    with pytest.raises(InvalidImage, match="needs 5883"):
        raw_image(b"\0" * 10, RGB.shape)
    with pytest.raises(InvalidImage, match="empty"):
        raw_image(b"", (0, 4))
    with pytest.raises(ImageTooLarge):
        raw_image(b"", (10, 10), max_pixels=99)


def test_png_colorize_and_overlay():
    labels = np.array([[0, 1], [2, 7]], np.uint8)
    palette = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    colors = colorize(labels, palette)
    assert colors[0, 0].tolist() == [10, 20, 30] and colors[1, 1].tolist() == [0, 0, 0]  # outside the palette
    assert np.array_equal(decode_image(encode_png(colors)), colors)
    deep = np.array([[0, 300]], np.uint16)
    assert np.array_equal(cv2.imdecode(np.frombuffer(encode_png(deep), np.uint8), cv2.IMREAD_UNCHANGED), deep)
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, labels, palette, alpha=0.5)
    assert blended[0, 0].tolist() == [55, 60, 65]
    with pytest.raises(InvalidArgument):
        overlay(image, labels, palette, alpha=1.5)
