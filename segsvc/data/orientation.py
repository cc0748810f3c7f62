"""EXIF orientation: where JPEG, PNG and WebP files declare it, and turning decoded pixels upright.

One rule for every reader, so training sees what serving sees: images and masks are
used the way image viewers show them. ``exif_orientation`` reads container markers
and chunk headers only (the server's header peek, ``segsvc.inference.containers``,
uses it before decoding); ``apply_orientation`` turns the decoded array. NumPy and
the standard library only.
"""

from __future__ import annotations

import struct

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# EXIF Orientation values (tag 274) whose stored rows are the upright image's columns.
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
# Markers and chunks looked at for the orientation, and entries of its EXIF directory: real files have dozens.
_MAX_EXIF_STEPS = 1 << 16
_MAX_EXIF_ENTRIES = 4096
_EXIF_ID = b"Exif\x00\x00"  # starts a JPEG APP1 Exif segment (and some WebP EXIF chunks)
_WEBP_VP8X_EXIF_FLAG = 0x08


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1 to 8) that JPEG, PNG or WebP bytes declare; 1 when they declare none.

    Read where viewers read it: a JPEG's first APP1 Exif segment before its
    first scan, a PNG's eXIf chunk before its pixel data, a WebP's EXIF chunk
    when its VP8X header flags one. A missing, damaged or out-of-range value is
    1 (stored pixels as they are), as Pillow and browsers read it. Other
    formats give 1: a TIFF's Orientation tag is applied by OpenCV's TIFF
    decoder itself (and its header read by ``segsvc.inference.containers``).
    Reads markers and chunk headers only, never pixel data, and never raises.

    Example:
        >>> exif_orientation(Path("phone.jpg").read_bytes())  # doctest: +SKIP
        6
    """
    data = memoryview(data)
    try:
        if data[:2] == b"\xff\xd8":
            blob = _jpeg_exif(data)
        elif data[:8] == _PNG_SIGNATURE:
            blob = _png_exif(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            blob = _webp_exif(data)
        else:
            return 1
        return 1 if blob is None else _exif_orientation_tag(blob)
    except (struct.error, IndexError, ValueError):
        return 1


def _jpeg_exif(data: memoryview) -> memoryview | None:
    """The TIFF structure of the first APP1 Exif segment before the first scan."""
    pos = 2
    for _ in range(_MAX_EXIF_STEPS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            pos += 2
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):  # the first scan (or garbage): no orientation before it
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xE1 and data[pos + 4 : pos + 10] == _EXIF_ID:
            return data[pos + 10 : pos + 2 + length]
        pos += 2 + length
    return None


def _png_exif(data: memoryview) -> memoryview | None:
    """The first eXIf chunk before IDAT (where the PNG specification puts it and streaming viewers read it)."""
    pos = len(_PNG_SIGNATURE)
    for _ in range(_MAX_EXIF_STEPS):
        if pos + 8 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"eXIf":
            return data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return None


def _webp_exif(data: memoryview) -> memoryview | None:
    """The first EXIF chunk of an extended WebP whose VP8X flags say it has one (libwebp's demuxer reads no other)."""
    if data[12:16] != b"VP8X" or not data[20] & _WEBP_VP8X_EXIF_FLAG:
        return None
    pos, end = 12, min(len(data), 8 + struct.unpack_from("<I", data, 4)[0])
    for _ in range(_MAX_EXIF_STEPS):
        if pos + 8 > end:
            return None
        kind, size = struct.unpack_from("<4sI", data, pos)
        if kind == b"EXIF":
            blob = data[pos + 8 : pos + 8 + size]
            return blob[len(_EXIF_ID):] if blob[: len(_EXIF_ID)] == _EXIF_ID else blob
        pos += 8 + size + (size & 1)
    return None


def _exif_orientation_tag(blob: memoryview) -> int:
    """Tag 274 of the first directory of an EXIF TIFF structure; 1 when absent or out of range."""
    endian = {b"II": "<", b"MM": ">"}.get(bytes(blob[:2]))
    if endian is None:
        return 1
    magic, ifd = struct.unpack_from(endian + "HI", blob, 2)
    if magic != 42:
        return 1
    (count,) = struct.unpack_from(endian + "H", blob, ifd)
    for k in range(min(count, _MAX_EXIF_ENTRIES)):
        tag, kind, values = struct.unpack_from(endian + "HHI", blob, ifd + 2 + 12 * k)
        if tag == 274:
            code = {3: "H", 4: "I"}.get(kind)  # SHORT, as the standard says; LONG from lax writers
            if code is None or values < 1:
                return 1
            (value,) = struct.unpack_from(endian + code, blob, ifd + 10 + 12 * k)
            return value if 1 <= value <= 8 else 1
    return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (``H x W`` or ``H x W x C``) upright as EXIF ``orientation`` says (as Pillow's
    ``ImageOps.exif_transpose``); 5 to 8 swap height and width. 1 and unknown values return ``image``."""
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a[::-1].swapaxes(0, 1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: a[:, ::-1].swapaxes(0, 1),
    }.get(orientation)
    return image if turned is None else np.ascontiguousarray(turned(image))
