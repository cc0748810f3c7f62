"""EXIF orientation: every format is decoded upright, as viewers show it, and its header says the upright size.

A phone photo is stored sideways with an Orientation tag; its annotation is drawn on the photo as viewers
show it. OpenCV's TIFF decoder turned TIFFs upright while ``IMREAD_UNCHANGED`` left JPEGs as stored, so the
same photo gave label maps turned two ways. Pillow's ``ImageOps.exif_transpose`` is the reference.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from segsvc.errors import ImageTooLarge
from segsvc.inference.codec import decode_image, image_header
from segsvc.inference.service import EncodedImage, ImageFile

STORED = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # 40 wide, 24 high, as stored
_Y, _X = np.mgrid[:24, :40]
SMOOTH = np.dstack([_X * 6, _Y * 10, np.full_like(_X, 200)]).astype(np.uint8)  # survives JPEG coding
FORMATS = {"jpeg": ("JPEG", {"quality": 100}), "png": ("PNG", {}), "webp": ("WEBP", {"lossless": True}),
           "tiff": ("TIFF", {})}


def _save(pixels: np.ndarray, fmt: str, orientation: int | None, **extra) -> bytes:
    image = Image.fromarray(pixels)
    name, options = FORMATS[fmt]
    if orientation is not None:
        exif = image.getexif()
        exif[274] = orientation
        options = {**options, "exif": exif}
    out = io.BytesIO()
    image.save(out, name, **options, **extra)
    return out.getvalue()


def _reference(data: bytes) -> np.ndarray:
    """The image as viewers show it."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("RGB") if upright.mode not in ("L", "RGB") else upright)


def _assert_matches(decoded: np.ndarray, expected: np.ndarray, lossy: bool) -> None:
    assert decoded.shape == expected.shape
    difference = np.abs(decoded.astype(int) - expected.astype(int)).max()
    assert difference <= (6 if lossy else 0)  # libjpeg builds round a few values differently


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_upright_as_viewers_show_it(fmt: str, orientation: int) -> None:
    data = _save(SMOOTH if fmt == "jpeg" else STORED, fmt, orientation)
    expected = _reference(data)
    assert expected.shape[:2] == ((40, 24) if orientation >= 5 else (24, 40))  # the reference did turn it
    _assert_matches(decode_image(data), expected, lossy=fmt == "jpeg")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_header_peek_reports_the_upright_size_the_decoder_returns(fmt: str, orientation: int) -> None:
    """The size checked before decoding (cost, ``max_pixels``, the decoded-size check) is the one returned."""
    data = _save(STORED, fmt, orientation)
    header = image_header(data)
    assert (header.format, header.orientation) == (fmt, orientation)
    assert (header.height, header.width) == decode_image(data).shape[:2] == _reference(data).shape[:2]


@pytest.mark.parametrize("orientation", [2, 5, 6, 7, 8])
def test_grey_and_16_bit_pngs_turn_too(orientation: int) -> None:
    grey = STORED[:, :, 0]
    data = _save(grey, "png", orientation)
    assert np.array_equal(decode_image(data), _reference(data))
    deep = grey.astype(np.uint16) * 257
    image = Image.fromarray(deep)
    exif = image.getexif()
    exif[274] = orientation
    out = io.BytesIO()
    image.save(out, "PNG", exif=exif)
    turned = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue()))))
    assert np.array_equal(decode_image(out.getvalue()), (turned >> 8).astype(np.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_servers_decode_entry_points_return_upright_pixels_of_the_peeked_size(fmt: str, tmp_path: Path) -> None:
    """What ``Segment`` does with image bytes and with a server-side file: peek the size, then decode."""
    data = _save(SMOOTH if fmt == "jpeg" else STORED, fmt, 6)
    (tmp_path / "photo").write_bytes(data)
    for source in (EncodedImage(data), ImageFile(tmp_path, "photo", "photo", max_bytes=1 << 20)):
        assert source.peek() == (40, 24)
        image = source.load(max_pixels=40 * 24)
        assert image.shape[:2] == (40, 24)
        _assert_matches(image, _reference(data), lossy=fmt == "jpeg")


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_pixel_limit_still_holds_before_decoding(fmt: str) -> None:
    data = _save(STORED, fmt, 6)
    with pytest.raises(ImageTooLarge, match="image is 24x40 = 960 pixels"):
        decode_image(data, max_pixels=959)


# -- where the orientation is read, and what is ignored
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    return chunks


def test_a_png_exif_chunk_after_the_pixel_data_is_not_read() -> None:
    """The PNG specification puts eXIf before IDAT; streaming viewers (and OpenCV) read it only there."""
    data = _save(STORED, "png", 6)
    chunks = _png_chunks(data)
    exif = next(c for c in chunks if c[4:8] == b"eXIf")
    assert chunks.index(exif) < next(i for i, c in enumerate(chunks) if c[4:8] == b"IDAT")
    rest = [c for c in chunks if c is not exif]
    late = data[:8] + b"".join(rest[:-1]) + exif + rest[-1]  # just before IEND
    assert image_header(late).orientation == 1
    assert np.array_equal(decode_image(late), STORED)


def _exif_blob(orientation_value: int, kind: int = 3) -> bytes:
    """A little-endian EXIF TIFF structure with one directory holding the Orientation tag."""
    value = struct.pack("<HH", orientation_value, 0) if kind == 3 else struct.pack("<I", orientation_value)
    return b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", 274, kind, 1) + value + b"\x00" * 4


def _png_with_exif(blob: bytes) -> bytes:
    chunks = _png_chunks(_save(STORED, "png", None))
    return b"\x89PNG\r\n\x1a\n" + chunks[0] + _png_chunk(b"eXIf", blob) + b"".join(chunks[1:])


@pytest.mark.parametrize("blob, orientation", [
    (_exif_blob(6), 6), (_exif_blob(6, kind=4), 6),  # SHORT as the standard says; LONG from lax writers
    (_exif_blob(0), 1), (_exif_blob(9), 1), (_exif_blob(0xFFFF), 1),  # out of range: as stored
    (_exif_blob(6)[:14], 1), (b"MM\x00*\xff\xff\xff\xff", 1), (b"garbage", 1), (b"", 1),  # damaged: as stored
])
def test_a_missing_or_damaged_orientation_leaves_the_pixels_as_stored(blob: bytes, orientation: int) -> None:
    data = _png_with_exif(blob)
    assert image_header(data).orientation == orientation
    expected = np.rot90(STORED, -1) if orientation == 6 else STORED
    assert np.array_equal(decode_image(data), expected)


def _jpeg_with_app1(data: bytes, blobs: list[bytes]) -> bytes:
    """``data`` (a JPEG without Exif) with an APP1 Exif segment per blob right after its SOI."""
    segments = b"".join(b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(b)) + b"Exif\x00\x00" + b for b in blobs)
    return data[:2] + segments + data[2:]


def test_a_jpeg_orientation_is_read_from_its_first_exif_segment() -> None:
    """libjpeg, Pillow and browsers read the first APP1 Exif segment; a second one is ignored."""
    plain = _save(SMOOTH, "jpeg", None)
    data = _jpeg_with_app1(plain, [_exif_blob(8), _exif_blob(6)])
    assert image_header(data).orientation == 8
    _assert_matches(decode_image(data), _reference(data), lossy=True)
    assert decode_image(data).shape[:2] == (40, 24)


def test_a_webp_exif_chunk_counts_only_when_its_header_flags_it() -> None:
    """libwebp's demuxer (Pillow's reader) skips an EXIF chunk the VP8X flags do not announce."""
    data = bytearray(_save(STORED, "webp", 6))
    assert data[12:16] == b"VP8X" and data[20] & 0x08
    assert image_header(bytes(data)).orientation == 6
    data[20] &= ~0x08
    assert image_header(bytes(data)).orientation == 1
    assert np.array_equal(decode_image(bytes(data)), STORED)


def test_a_webp_exif_chunk_with_the_exif_prefix_is_read() -> None:
    """Some writers start the chunk with JPEG's ``Exif\\0\\0`` identifier."""
    data = _save(STORED, "webp", 6)
    at = data.index(b"EXIF")
    (size,) = struct.unpack_from("<I", data, at + 4)
    body = b"Exif\x00\x00" + data[at + 8 : at + 8 + size]
    chunk = b"EXIF" + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)
    riff = data[12:at] + chunk + data[at + 8 + size + (size & 1) :]
    prefixed = b"RIFF" + struct.pack("<I", 4 + len(riff)) + b"WEBP" + riff
    assert image_header(prefixed).orientation == 6
    assert np.array_equal(decode_image(prefixed), np.rot90(STORED, -1))
