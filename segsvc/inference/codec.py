"""Image bytes <-> uint8 arrays, with the size checked before any pixel is decoded.

A 50 kB PNG can declare 100 000 x 100 000 pixels (a decompression bomb), so
``decode_image`` reads the width and height from the file header and refuses
images over ``max_pixels`` before OpenCV allocates anything. Only the formats
the service documents are accepted (PNG, JPEG, TIFF, BMP, WebP); anything else
is refused by name instead of being handed to a decoder. Arrays are RGB (or
single-channel grey) ``H x W [x C]`` uint8, like everywhere else in segsvc.

Example:
    >>> import numpy as np
    >>> png = encode_png(np.zeros((4, 6, 3), np.uint8))
    >>> image_header(png)
    ImageHeader(format='png', width=6, height=4)
    >>> decode_image(png, max_pixels=100).shape
    (4, 6, 3)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from segsvc.errors import ImageTooLarge, InvalidArgument, InvalidImage
from segsvc.palette import colorize, overlay  # noqa: F401  (numpy-only; re-exported for callers of codec)

DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageHeader:
    """Format and size of an encoded image, read from its header alone."""

    format: str
    width: int
    height: int


def image_header(data: bytes) -> ImageHeader:
    """Read format, width and height from the first bytes of an encoded image.

    Raises:
        InvalidImage: the bytes are empty, truncated or not one of PNG, JPEG,
            TIFF, BMP, WebP.
    """
    if not data:
        raise InvalidImage("image bytes are empty")
    head = bytes(data[:16])
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png_header(data)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_header(data)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_header(data)
        if head.startswith(b"BM"):
            return _bmp_header(data)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_header(data)
    except (struct.error, IndexError):
        raise InvalidImage("image header is truncated or corrupt") from None
    raise InvalidImage(
        f"unsupported or undecodable image data (starts with {head[:8].hex()}); "
        "send PNG, JPEG, TIFF, BMP or WebP bytes, or a raw tensor"
    )


def _png_header(data: bytes) -> ImageHeader:
    if data[12:16] != b"IHDR":
        raise InvalidImage("PNG has no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return ImageHeader("png", width, height)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> ImageHeader:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise InvalidImage("JPEG marker stream is corrupt")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7):
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return ImageHeader("jpeg", width, height)
        i += 2 + length
    raise InvalidImage("JPEG has no frame header (SOF marker)")


def _tiff_header(data: bytes) -> ImageHeader:
    endian = "<" if data[:2] == b"II" else ">"
    (magic,) = struct.unpack(endian + "H", data[2:4])
    big = magic == 43
    if big:
        (offset,) = struct.unpack(endian + "Q", data[8:16])
        (count,) = struct.unpack(endian + "Q", data[offset : offset + 8])
        entry_at, entry_size = offset + 8, 20
    else:
        (offset,) = struct.unpack(endian + "I", data[4:8])
        (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
        entry_at, entry_size = offset + 2, 12
    dims: dict[int, int] = {}
    for k in range(min(count, 4096)):
        e = entry_at + k * entry_size
        tag, typ = struct.unpack(endian + "HH", data[e : e + 4])
        if tag not in (256, 257):
            continue
        value_at = e + (12 if big else 8)
        if typ == 3:  # SHORT
            (dims[tag],) = struct.unpack(endian + "H", data[value_at : value_at + 2])
        elif typ == 4:  # LONG
            (dims[tag],) = struct.unpack(endian + "I", data[value_at : value_at + 4])
        elif typ == 16 and big:  # LONG8
            (dims[tag],) = struct.unpack(endian + "Q", data[value_at : value_at + 8])
    if 256 not in dims or 257 not in dims:
        raise InvalidImage("TIFF has no ImageWidth/ImageLength tags")
    return ImageHeader("tiff", dims[256], dims[257])


def _bmp_header(data: bytes) -> ImageHeader:
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return ImageHeader("bmp", abs(width), abs(height))


def _webp_header(data: bytes) -> ImageHeader:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return ImageHeader("webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", w, h)
    raise InvalidImage(f"WebP has an unknown first chunk {chunk!r}")


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    """Refuse empty images and images with more than ``max_pixels`` pixels."""
    if height <= 0 or width <= 0:
        raise InvalidImage(f"image is empty ({width}x{height} pixels)")
    if height * width > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels; downscale it or send tiles"
        )


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP/WebP bytes to RGB ``HxWx3`` or grey ``HxW`` uint8.

    The header is checked against ``max_pixels`` first. 16-bit images keep
    their 8 most significant bits; alpha is dropped.

    Raises:
        InvalidImage: not a supported format, or the bytes do not decode.
        ImageTooLarge: the header declares more than ``max_pixels`` pixels.
    """
    header = image_header(data)
    check_pixels(header.height, header.width, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise InvalidImage(f"{header.format.upper()} data could not be decoded (corrupt or truncated)")
    if image.shape[0] != header.height or image.shape[1] != header.width:
        raise InvalidImage(
            f"{header.format.upper()} header says {header.width}x{header.height} but it decodes to "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InvalidImage(f"{header.format.upper()} pixel type {image.dtype} is not supported; send 8-bit images")
    if image.ndim == 3:
        c = image.shape[2]
        if c == 1:
            image = image[:, :, 0]
        elif c == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif c == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
        else:
            raise InvalidImage(f"{header.format.upper()} has {c} channels; expected 1, 3 or 4")
    return image


def raw_image(data: bytes, shape: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """View raw uint8 bytes as an ``HxW`` or ``HxWxC`` image (C in 1, 3, 4; alpha dropped).

    Raises:
        InvalidImage: the shape is malformed or ``len(data)`` is not its product.
        ImageTooLarge: more than ``max_pixels`` pixels.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise InvalidImage(f"raw image shape must be [height, width] or [height, width, channels], got {list(shape)}")
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise InvalidImage(f"raw image must have 1, 3 or 4 channels, got {shape[2]}")
    check_pixels(shape[0], shape[1], max_pixels)
    expected = int(np.prod(shape))
    if len(data) != expected:
        raise InvalidImage(
            f"raw image data has {len(data)} bytes but shape {list(shape)} needs {expected} (uint8, row-major)"
        )
    image = np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()  # writable, owns its memory
    if image.ndim == 3 and shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and shape[2] == 4:
        image = image[:, :, :3]
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8/uint16 ``HxW`` label map or an RGB ``HxWx3`` uint8 image."""
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidArgument(f"PNG encoding needs uint8 or uint16 arrays, got {image.dtype}")
    if image.ndim == 3:
        if image.shape[2] != 3:
            raise InvalidArgument(f"PNG encoding needs HxW or HxWx3 arrays, got shape {image.shape}")
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    # Level 1: label maps compress well already; speed matters more than bytes.
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise InvalidArgument(f"could not PNG-encode an array of shape {image.shape}")
    return buf.tobytes()
