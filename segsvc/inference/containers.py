"""Image containers checked before any decoder allocates: PNG, JPEG, TIFF/BigTIFF, BMP, WebP.

Decoders trust the sizes a file declares. ``inspect`` walks the container in a
few milliseconds and without copying it (every PNG chunk, the JPEG segments up
to the first scan and the number of scans, the TIFF directory with its strip and
tile offsets, the BMP and WebP headers) and refuses a declared size the bytes
cannot hold, naming it, and TIFF samples the codec would refuse once decoded
(over 16 bits, signed, float).
``check_png_crc`` checks the CRCs of a PNG's pixel chunks, which its decoder
does not. The sizes reported are the upright image's, the one viewers show and
``codec.decode_image`` returns: a TIFF's Orientation tag, or the EXIF
orientation of a JPEG, PNG or WebP (read by ``segsvc.data.orientation.exif_orientation``,
which training's reader shares), swaps width and height when it turns the image
by a quarter. No decoding here: that is ``codec.decode_image``'s.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from segsvc.data.orientation import TRANSPOSED_ORIENTATIONS, exif_orientation
from segsvc.errors import InvalidImage

# Walking a container is a Python loop; these bound it (64 MiB of 12-byte PNG
# chunks would be 5.6 million iterations). Real files stay far below them.
MAX_PNG_CHUNKS = 1 << 16  # libpng writes 8 KiB IDATs: 512 MiB of pixel data
MAX_JPEG_SEGMENTS = 4096  # before the first scan; real files have a dozen
# Each scan of a progressive JPEG is a pass over the whole image, and libjpeg runs repeated or inconsistent
# scans with a warning: a few hundred kB of tiny scans cost minutes. Encoders write about ten; libjpeg-turbo's
# fuzzers stop at 500 (its TJPARAM_SCANLIMIT).
MAX_JPEG_SCANS = 500
MAX_TIFF_ENTRIES = 4096  # tags in the first directory; real files have ~20
# Directories after the first that are walked to tell a thumbnail or mask from a second page.
MAX_TIFF_DIRECTORIES = 64
MAX_WEBP_CHUNKS = 1 << 16
# A TIFF tile larger than this and than the image (each side rounded up to 16)
# is refused: OpenCV allocates a tile buffer of the declared size, whatever the image size.
MAX_TIFF_TILE_PIXELS = 1 << 20


@dataclass(frozen=True)
class ImageHeader:
    """Format and size of an encoded image, read from its header alone: the size it decodes to, upright.

    ``orientation`` is the EXIF orientation the file declares (1 to 8; 1 when none): 5 to 8 turn the image
    by a quarter, so ``width`` and ``height`` are its stored sides swapped.
    """

    format: str
    width: int
    height: int
    orientation: int = 1


@dataclass(frozen=True)
class PngPixels:
    """Where a PNG's compressed pixels are."""

    idat: tuple[tuple[int, int], ...]  # (offset, length) of each IDAT chunk's data


def image_header(data: bytes) -> ImageHeader:
    """Check the container structure and read format, width and height.

    Reads headers and chunk/segment/directory lengths only, never pixel data.

    Raises:
        InvalidImage: the bytes are empty, truncated, declare more than they
            hold, or are not one of PNG, JPEG, TIFF, BMP, WebP.
    """
    return inspect(bytes(data))[0]


def inspect(data: bytes) -> tuple[ImageHeader, PngPixels | None]:
    """Dispatch on the magic bytes; a PNG also returns where its compressed pixels are."""
    if not data:
        raise InvalidImage("image bytes are empty")
    head = data[:16]
    try:
        if head.startswith(_PNG_SIGNATURE):
            header, pixels = _png_header(data)
            return _upright(header, exif_orientation(data)), pixels
        if head.startswith(b"\xff\xd8"):
            return _upright(_jpeg_header(data), exif_orientation(data)), None
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_header(data), None
        if head.startswith(b"BM"):
            return _bmp_header(data), None
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _upright(_webp_header(data), exif_orientation(data)), None
    except (struct.error, IndexError):  # a field read past the end that no explicit check caught
        raise InvalidImage("image header is truncated or corrupt") from None
    raise InvalidImage(
        f"unsupported or undecodable image data (starts with {head[:8].hex()}); "
        "send PNG, JPEG, TIFF, BMP or WebP bytes, or a raw tensor"
    )


def _upright(stored: ImageHeader, orientation: int) -> ImageHeader:
    """The header of the image turned as ``orientation`` says (a stored size, checked, comes in)."""
    if orientation in TRANSPOSED_ORIENTATIONS:
        return ImageHeader(stored.format, stored.height, stored.width, orientation)
    return ImageHeader(stored.format, stored.width, stored.height, orientation)


# -- PNG ------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_header(data: bytes) -> tuple[ImageHeader, PngPixels]:
    """Walk every chunk: OpenCV reads each one into a buffer of its declared length before looking at it."""
    n, pos = len(data), len(_PNG_SIGNATURE)
    header: ImageHeader | None = None
    idat: list[tuple[int, int]] = []
    idat_ended = False
    profiles = 0
    for index in range(MAX_PNG_CHUNKS):
        if pos + 12 > n:
            raise InvalidImage(f"PNG is truncated: no IEND chunk in its {n} bytes")
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1")
        if not kind.isalpha():
            raise InvalidImage(f"PNG chunk at offset {pos} has type {kind!r}, not four letters (corrupt chunk stream)")
        remain = n - pos - 12  # after this chunk's length, type and CRC fields
        if length > remain:
            raise InvalidImage(f"PNG chunk {name} declares {length} bytes but only {remain} remain")
        if index == 0 and kind != b"IHDR":
            raise InvalidImage(f"PNG starts with a {name} chunk; IHDR must come first")
        if kind == b"IHDR":
            if index:
                raise InvalidImage("PNG has a second IHDR chunk")
            header = _png_ihdr(data, pos + 8, length)
        elif kind == b"iCCP":
            if profiles:  # Pillow inflates each (up to 1 MiB): 2 MB of them cost it 2 GB of inflating
                raise InvalidImage("PNG has a second iCCP chunk (colour profile); the format allows one")
            profiles += 1
        elif kind == b"acTL" and length >= 4 and (frames := struct.unpack_from(">I", data, pos + 8)[0]) > 1:
            raise InvalidImage(f"PNG is animated (APNG, {frames} frames): {_ONE_FRAME}")
        elif kind == b"IDAT":
            if idat_ended:
                raise InvalidImage("PNG IDAT chunks are not consecutive")
            idat.append((pos + 8, length))
        elif idat:
            idat_ended = True
        pos += 12 + length
        if kind == b"IEND":
            break
    else:
        raise InvalidImage(f"PNG has more than {MAX_PNG_CHUNKS} chunks")
    if not idat:
        raise InvalidImage("PNG has no IDAT chunk (no pixel data)")
    assert header is not None  # the first chunk is IHDR
    return header, PngPixels(tuple(idat))


def _png_ihdr(data: bytes, at: int, length: int) -> ImageHeader:
    """The image size, once the bit depth, colour type and methods are valid."""
    if length != 13:
        raise InvalidImage(f"PNG IHDR chunk is {length} bytes; it must be 13")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, at)
    if width > 2**31 - 1 or height > 2**31 - 1:
        raise InvalidImage(f"PNG declares {width}x{height} pixels; a side is at most 2^31-1")
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise InvalidImage(f"PNG bit depth {depth} is not valid for colour type {colour}")
    if compression or filtering or interlace > 1:
        raise InvalidImage(
            f"PNG IHDR names unknown methods (compression {compression}, filter {filtering}, interlace {interlace})"
        )
    return ImageHeader("png", width, height)


def check_png_crc(data: bytes, pixels: PngPixels) -> None:
    """Refuse IDAT chunks whose CRC does not match: bytes damaged in a file or on the way.

    libpng refused them; Pillow reads pixel chunks without looking at their
    CRCs (and stops inflating at the last row, before the stream's own Adler-32),
    so damaged pixels would decode as wrong labels. 0.1 ms for 400 kB.
    """
    for index, (start, length) in enumerate(pixels.idat):
        kind_and_body = memoryview(data)[start - 4 : start + length]
        (stored,) = struct.unpack_from(">I", data, start + length)
        if zlib.crc32(kind_and_body) != stored:
            raise InvalidImage(f"PNG IDAT chunk {index + 1} of {len(pixels.idat)} fails its CRC check "
                               "(the file is damaged)")


# -- JPEG -----------------------------------------------------------------------------
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}  # TEM, RSTn: no length field


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walk the segments up to the first scan; require the frame header before it and an end marker after."""
    n, pos = len(data), 2
    header: ImageHeader | None = None
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos + 4 > n:
            raise InvalidImage(f"JPEG is truncated: no scan (SOS) in its {n} bytes")
        if data[pos] != 0xFF:
            raise InvalidImage(f"JPEG marker stream is corrupt at offset {pos} (byte {data[pos]:#04x}, not 0xff)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0x00, 0xD8, 0xD9):
            raise InvalidImage(f"JPEG has marker FF{marker:02X} at offset {pos}, before its first scan")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise InvalidImage(f"JPEG segment FF{marker:02X} at offset {pos} has length {length}; the minimum is 2")
        if length > n - pos - 2:
            raise InvalidImage(f"JPEG segment FF{marker:02X} declares {length} bytes but only {n - pos - 2} remain")
        if marker in _JPEG_SOF:
            if header is not None:
                raise InvalidImage("JPEG has a second frame header (SOF)")
            header = _jpeg_frame(data, pos + 4, length - 2)
        elif marker == 0xDA:
            if header is None:
                raise InvalidImage("JPEG has a scan (SOS) before its frame header (SOF)")
            # Entropy-coded data escapes 0xff, so FFD9 after the scan starts is the real end marker;
            # without it libjpeg pads the missing rows with grey and calls that success.
            end = data.rfind(b"\xff\xd9", pos + 2 + length)
            if end < 0:
                raise InvalidImage("JPEG is truncated: no end-of-image marker (FFD9) after its first scan")
            scans = data.count(b"\xff\xda", pos, end)  # escaped in scan data too: each one starts a scan
            if scans > MAX_JPEG_SCANS:
                raise InvalidImage(f"JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS}: each is a pass "
                                   "over the whole image; send a baseline JPEG or one with fewer scans")
            return header
        pos += 2 + length
    raise InvalidImage(f"JPEG has more than {MAX_JPEG_SEGMENTS} segments before its first scan")


def _jpeg_frame(data: bytes, at: int, size: int) -> ImageHeader:
    """The SOF segment's size, precision and components (``size`` excludes the length field)."""
    if size < 6:
        raise InvalidImage(f"JPEG frame header (SOF) is {size + 2} bytes; it needs at least 8")
    precision, height, width, components = struct.unpack_from(">BHHB", data, at)
    if precision not in (8, 12, 16):
        raise InvalidImage(f"JPEG sample precision is {precision} bits; expected 8, 12 or 16")
    if not 1 <= components <= 4:
        raise InvalidImage(f"JPEG has {components} components; expected 1 to 4")
    if size != 6 + 3 * components:
        raise InvalidImage(
            f"JPEG frame header (SOF) is {size + 2} bytes but {components} components need {8 + 3 * components}"
        )
    return ImageHeader("jpeg", width, height)


# -- TIFF / BigTIFF -------------------------------------------------------------------
_TIFF_INTEGERS = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8
_TIFF_TAGS = {
    254: "NewSubfileType", 256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 273: "StripOffsets",
    274: "Orientation", 277: "SamplesPerPixel", 279: "StripByteCounts", 322: "TileWidth", 323: "TileLength",
    324: "TileOffsets", 325: "TileByteCounts", 339: "SampleFormat",
}
_TIFF_NOT_A_PAGE = 0b101  # NewSubfileType bits: a reduced-resolution copy (thumbnail), a transparency mask
# The decoders read the first frame of a stack, an animation or a multi-page file and drop the rest in silence.
_ONE_FRAME = "segsvc segments one image per input; send each page or frame as an image of its own"
# What decode_image keeps: unsigned samples of at most 16 bits. OpenCV decodes deeper, signed or float samples
# into arrays of their own type (up to 32 bytes a pixel) that would only be refused after the allocation.
_TIFF_BITS = (1, 2, 4, 8, 16)
_TIFF_SAMPLE_FORMATS = {2: "signed integer", 3: "floating point", 4: "undefined"}  # 1, unsigned, is the default
_TIFF_SEND = "send 8- or 16-bit images"


def _tiff_header(data: bytes) -> ImageHeader:
    """The first directory, its size tags and every strip or tile: each must lie inside the data."""
    n, endian = len(data), "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        offset_size, count_fmt, entry_size, first = 8, "Q", 20, 16
        if n < 16:
            raise InvalidImage(f"BigTIFF header is truncated ({n} of 16 bytes)")
        bytesize, zero, ifd = struct.unpack_from(endian + "HHQ", data, 4)
        if bytesize != 8 or zero != 0:
            raise InvalidImage(f"BigTIFF header declares {bytesize}-byte offsets and reserved field {zero}; "
                               "they must be 8 and 0")
    else:
        offset_size, count_fmt, entry_size, first = 4, "H", 12, 8
        if n < 8:
            raise InvalidImage(f"TIFF header is truncated ({n} of 8 bytes)")
        (ifd,) = struct.unpack_from(endian + "I", data, 4)
    if not first <= ifd <= n - struct.calcsize(count_fmt):
        raise InvalidImage(f"TIFF directory offset {ifd} is outside the {n} bytes of data")
    (count,) = struct.unpack_from(endian + count_fmt, data, ifd)
    entries = ifd + struct.calcsize(count_fmt)
    if not 1 <= count <= MAX_TIFF_ENTRIES:
        raise InvalidImage(f"TIFF directory declares {count} entries; expected 1 to {MAX_TIFF_ENTRIES}")
    if count * entry_size + offset_size > n - entries:  # the entries, then the next directory's offset
        raise InvalidImage(
            f"TIFF directory declares {count} entries ({count * entry_size} bytes, then the next directory's "
            f"{offset_size}-byte offset) but only {n - entries} bytes remain"
        )
    tags: dict[int, np.ndarray] = {}
    for k in range(count):
        at = entries + k * entry_size
        tag, kind = struct.unpack_from(endian + "HH", data, at)
        if tag in _TIFF_TAGS:
            if tag in tags:  # libtiff reads the first one: checking another would check a size it never decodes
                raise InvalidImage(f"TIFF directory has a second {_TIFF_TAGS[tag]} entry (at {k}); "
                                   "a tag may appear once")
            tags[tag] = _tiff_values(data, endian, at, kind, offset_size, _TIFF_TAGS[tag])

    def first_value(tag: int, default: int | None = None) -> int:
        values = tags.get(tag)
        if values is None or not len(values):
            if default is None:
                raise InvalidImage(f"TIFF has no {_TIFF_TAGS[tag]} tag")
            return default
        return int(values[0])

    width, height = first_value(256), first_value(257)
    _tiff_check_samples(tags.get(258), tags.get(339))
    samples = first_value(277, 1)
    if not 1 <= samples <= 4:
        raise InvalidImage(f"TIFF has {samples} samples per pixel; expected 1 to 4")
    if 322 in tags or 324 in tags:
        tile_w, tile_h = first_value(322), first_value(323)
        fits = tile_w <= -(-width // 16) * 16 and tile_h <= -(-height // 16) * 16  # tiles are multiples of 16
        if tile_w <= 0 or tile_h <= 0 or (tile_w * tile_h > MAX_TIFF_TILE_PIXELS and not fits):
            raise InvalidImage(f"TIFF tiles of {tile_w}x{tile_h} pixels do not fit a {width}x{height} image")
        _tiff_check_blocks(n, "tile", tags.get(324), tags.get(325))
    else:
        _tiff_check_blocks(n, "strip", tags.get(273), tags.get(279))
    (following,) = struct.unpack_from(endian + ("Q" if big else "I"), data, entries + count * entry_size)
    _tiff_check_single_page(data, endian, big, following)
    orientation = first_value(274, 1)  # OpenCV's TIFF decoder turns the image upright itself
    return _upright(ImageHeader("tiff", width, height), orientation if 1 <= orientation <= 8 else 1)


def _tiff_check_single_page(data: bytes, endian: str, big: bool, ifd: int) -> None:
    """Refuse a second page: a directory after the first that is not a thumbnail or a transparency mask
    (NewSubfileType). Walks up to ``MAX_TIFF_DIRECTORIES``; a chain that leaves the data ends the walk
    (the decoder reads the first page either way)."""
    offset_size, count_fmt, entry_size = (8, "Q", 20) if big else (4, "H", 12)
    seen: set[int] = set()
    for _ in range(MAX_TIFF_DIRECTORIES):
        if not ifd or ifd in seen or ifd > len(data) - struct.calcsize(count_fmt):
            return
        seen.add(ifd)
        (count,) = struct.unpack_from(endian + count_fmt, data, ifd)
        entries = ifd + struct.calcsize(count_fmt)
        if count * entry_size + offset_size > len(data) - entries:
            return
        kind_of = 0
        for k in range(count):
            at = entries + k * entry_size
            tag, kind = struct.unpack_from(endian + "HH", data, at)
            if tag == 254:
                values = _tiff_values(data, endian, at, kind, offset_size, _TIFF_TAGS[tag])
                kind_of = int(values[0]) if len(values) else 0
        if not kind_of & _TIFF_NOT_A_PAGE:
            raise InvalidImage(f"TIFF holds more than one page (a stack or a multi-page file): {_ONE_FRAME}")
        (ifd,) = struct.unpack_from(endian + ("Q" if big else "I"), data, entries + count * entry_size)


def _tiff_check_samples(bits: np.ndarray | None, formats: np.ndarray | None) -> None:
    """Refuse samples deeper than 16 bits, or not unsigned integers, before a decoder allocates them."""
    bad_bits = [] if bits is None else sorted(set(int(b) for b in bits[:64]) - set(_TIFF_BITS))
    if bad_bits:
        raise InvalidImage(f"TIFF has {bad_bits[0]} bits per sample; expected one of {_TIFF_BITS}: {_TIFF_SEND}")
    bad_formats = [] if formats is None else sorted(set(int(f) for f in formats[:64]) - {1})
    if bad_formats:
        code = bad_formats[0]
        kind = _TIFF_SAMPLE_FORMATS.get(code, "unknown")
        raise InvalidImage(f"TIFF samples are {kind} (SampleFormat {code}); {_TIFF_SEND} of unsigned integers")


def _tiff_values(data: bytes, endian: str, at: int, kind: int, offset_size: int, name: str) -> np.ndarray:
    """The tag's integer values, read in place (inline or at their offset), as a numpy view."""
    code = _TIFF_INTEGERS.get(kind)
    if code is None:
        raise InvalidImage(f"TIFF tag {name} has type {kind}; expected BYTE, SHORT, LONG or LONG8")
    count_fmt = endian + ("Q" if offset_size == 8 else "I")
    (count,) = struct.unpack_from(count_fmt, data, at + 4)
    size = count * struct.calcsize(code)
    where = at + 4 + offset_size
    if size > offset_size:  # too big to sit in the entry: the entry holds its offset
        (where,) = struct.unpack_from(count_fmt, data, where)
    if where > len(data) or size > len(data) - where:
        remain = max(len(data) - where, 0)
        raise InvalidImage(f"TIFF tag {name} declares {count} values at offset {where} but only {remain} bytes remain")
    return np.frombuffer(data, np.dtype(endian + code), count, where)


def _tiff_check_blocks(n: int, kind: str, offsets: np.ndarray | None, counts: np.ndarray | None) -> None:
    """Every strip (tile) must start and end inside the data (checked in slices: millions of strips fit)."""
    tag = "StripOffsets" if kind == "strip" else "TileOffsets"
    if offsets is None or not len(offsets):
        raise InvalidImage(f"TIFF has no {tag} tag (no pixel data)")
    if counts is not None and len(counts) != len(offsets):
        raise InvalidImage(f"TIFF has {len(offsets)} {kind} offsets but {len(counts)} {kind} byte counts")
    end = np.uint64(n)
    for lo in range(0, len(offsets), 1 << 16):
        starts = offsets[lo : lo + (1 << 16)].astype(np.uint64)
        sizes = np.zeros_like(starts) if counts is None else counts[lo : lo + (1 << 16)].astype(np.uint64)
        bad = np.flatnonzero((starts > end) | (sizes > end - np.minimum(starts, end)))
        if len(bad):
            start, size = int(starts[bad[0]]), int(sizes[bad[0]])
            raise InvalidImage(
                f"TIFF {kind} {lo + int(bad[0])} at offset {start} declares {size} bytes "
                f"but only {max(n - start, 0)} remain"
            )


# -- BMP ------------------------------------------------------------------------------
_BMP_BITS = (1, 4, 8, 16, 24, 32)
_BMP_UNCOMPRESSED = (0, 3, 6)  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows stored as they are


def _bmp_header(data: bytes) -> ImageHeader:
    """The info header, the pixel offset and (uncompressed) the rows' size against the data."""
    n = len(data)
    if n < 18:
        raise InvalidImage(f"BMP header is truncated ({n} of 18 bytes)")
    pixels_at, dib_size = struct.unpack_from("<II", data, 10)
    if dib_size != 12 and not 40 <= dib_size <= 124:
        raise InvalidImage(f"BMP info header is {dib_size} bytes; expected 12 (OS/2) or 40 to 124 (Windows)")
    if dib_size > n - 14:
        raise InvalidImage(f"BMP info header declares {dib_size} bytes but only {n - 14} remain")
    if dib_size == 12:
        width, height, _, bits = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    else:
        width, height, _, bits, compression = struct.unpack_from("<iiHHI", data, 18)
    if width < 0:
        raise InvalidImage(f"BMP width {width} is negative")
    if bits not in _BMP_BITS:
        raise InvalidImage(f"BMP has {bits} bits per pixel; expected one of {_BMP_BITS}")
    if not 14 + dib_size <= pixels_at <= n:
        raise InvalidImage(f"BMP pixel data offset {pixels_at} is outside {14 + dib_size}..{n} (header end..data end)")
    if compression in _BMP_UNCOMPRESSED:
        need = (width * bits + 31) // 32 * 4 * abs(height)
        if need > n - pixels_at:
            raise InvalidImage(f"BMP pixel rows need {need} bytes but only {n - pixels_at} remain")
    return ImageHeader("bmp", width, abs(height))


# -- WebP -----------------------------------------------------------------------------
def _webp_header(data: bytes) -> ImageHeader:
    """The RIFF size and every chunk's size against the data; the size from the first chunk's header."""
    n = len(data)
    if n < 20:
        raise InvalidImage(f"WebP header is truncated ({n} of 20 bytes)")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size > n - 8:
        raise InvalidImage(f"WebP RIFF container declares {riff_size} bytes but only {n - 8} remain")
    end, pos = 8 + riff_size, 12
    first: tuple[bytes, int, int] | None = None  # (fourcc, data offset, size); later chunks are not kept
    count, frames, later_image = 0, 0, False  # whether a chunk after the first holds image data
    while pos + 8 <= end:
        if count == MAX_WEBP_CHUNKS:
            raise InvalidImage(f"WebP has more than {MAX_WEBP_CHUNKS} chunks")
        kind, size = struct.unpack_from("<4sI", data, pos)
        if size > end - pos - 8:
            raise InvalidImage(
                f"WebP chunk {kind.decode('latin-1')} declares {size} bytes but only {end - pos - 8} remain"
            )
        if first is None:
            first = (kind, pos + 8, size)
        else:
            later_image = later_image or kind in (b"VP8 ", b"VP8L", b"ANMF")
        frames += kind == b"ANMF"
        if frames > 1:
            raise InvalidImage(f"WebP is animated (more than one ANMF frame): {_ONE_FRAME}")
        count += 1
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    if first is None:
        raise InvalidImage(f"WebP RIFF container of {riff_size} bytes holds no chunk")
    kind, at, size = first
    if kind == b"VP8 ":  # lossy: 3-byte frame tag, start code, 14-bit sizes (top 2 bits: scale)
        if size < 10:
            raise InvalidImage(f"WebP VP8 chunk is {size} bytes; its frame header needs 10")
        if data[at] & 1 or data[at + 3 : at + 6] != b"\x9d\x01\x2a":
            raise InvalidImage("WebP VP8 data is not a key frame (no 9d 01 2a start code)")
        w, h = struct.unpack_from("<HH", data, at + 6)
        return ImageHeader("webp", w & 0x3FFF, h & 0x3FFF)
    if kind == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1, height-1, alpha, 3-bit version
        if size < 5:
            raise InvalidImage(f"WebP VP8L chunk is {size} bytes; its header needs 5")
        (bits,) = struct.unpack_from("<I", data, at + 1)
        if data[at] != 0x2F or bits >> 29:
            raise InvalidImage(f"WebP VP8L header is corrupt (signature {data[at]:#04x}, version {bits >> 29})")
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind == b"VP8X":  # extended: flags, then 24-bit canvas width-1, height-1
        if size < 10:
            raise InvalidImage(f"WebP VP8X chunk is {size} bytes; it needs 10")
        if not later_image:
            raise InvalidImage("WebP extended file has no image data (no VP8, VP8L or ANMF chunk)")
        w = int.from_bytes(data[at + 4 : at + 7], "little") + 1
        h = int.from_bytes(data[at + 7 : at + 10], "little") + 1
        return ImageHeader("webp", w, h)
    raise InvalidImage(f"WebP has an unknown first chunk {kind!r}")


# -- decoding -------------------------------------------------------------------------
