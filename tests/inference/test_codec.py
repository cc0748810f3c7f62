"""Image decoding: containers checked before any decoder allocates, header sizes of every format, bombs refused fast."""

from __future__ import annotations

import dataclasses
import functools
import io
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segsvc.errors import ImageTooLarge, InvalidArgument, InvalidImage
from segsvc.inference import codec, containers
from segsvc.inference.codec import colorize, decode_image, encode_png, image_header, overlay, raw_image

RGB = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
GREY = np.ascontiguousarray(RGB[:, :, 0])
_Y, _X = np.mgrid[:37, :53]
SMOOTH = np.dstack([_X * 4, _Y * 6, np.full_like(_X, 200)]).astype(np.uint8)  # survives lossy coding
MIB = 1 << 20


def _encode(image: np.ndarray, ext: str, params=()) -> bytes:
    bgr = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])
    ok, buf = cv2.imencode(ext, bgr, list(params))
    assert ok
    return buf.tobytes()


def _refused(data: bytes, message: str, **kwargs) -> None:
    """``decode_image`` refuses ``data`` with exactly ``message`` (InvalidImage, not ImageTooLarge)."""
    with pytest.raises(InvalidImage, match=f"^{re.escape(message)}$") as info:
        decode_image(data, **kwargs)
    assert type(info.value) is InvalidImage


# -- builders for files OpenCV does not write (interlaced PNG, BigTIFF, tiles, OS/2 BMP) and for mutations
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _ihdr(width: int, height: int, depth: int = 8, colour: int = 0, interlace: int = 0, *, methods=(0, 0)) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, *methods, interlace))


def _png_rows(image: np.ndarray, interlace: int) -> bytes:
    """Filter-0 rows of an 8-bit grey or RGB image, in Adam7 pass order when interlaced."""
    rows = b""
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        sub = image[y0::dy, x0::dx]
        if sub.size:
            rows += b"".join(b"\0" + row.tobytes() for row in sub)
    return rows


def _png(image: np.ndarray, interlace: int = 0, level: int = 6) -> bytes:
    colour = 0 if image.ndim == 2 else 2
    idat = zlib.compress(_png_rows(image, interlace), level)
    ihdr = _ihdr(image.shape[1], image.shape[0], 8, colour, interlace)
    return PNG_SIGNATURE + ihdr + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _tiff(image: np.ndarray, *, big: bool = False, endian: str = "<", tile: int = 0, replace=None,
          directory_first: bool = False) -> bytes:
    """An uncompressed TIFF or BigTIFF (one strip, or ``tile`` x ``tile`` tiles) of a uint8 grey/RGB image.

    ``replace`` maps a tag to ``(type, values)`` (``None`` drops the tag). The pixel data comes first,
    then the out-of-line values, then the directory (or the directory first, right after the header).
    """
    h, w = image.shape[:2]
    spp = 1 if image.ndim == 2 else 3
    head_size, word, inline = (16, "Q", 8) if big else (8, "I", 4)
    if tile:
        pad = np.zeros((-(-h // tile) * tile, -(-w // tile) * tile) + image.shape[2:], np.uint8)
        pad[:h, :w] = image
        blocks = [pad[y : y + tile, x : x + tile].tobytes() for y in range(0, h, tile) for x in range(0, w, tile)]
    else:
        blocks = [image.tobytes()]
    tags = {256: (4, [w]), 257: (4, [h]), 258: (3, [8] * spp), 259: (3, [1]), 262: (3, [1 if spp == 1 else 2]),
            277: (3, [spp]), 284: (3, [1])}
    block_tags = (324, 325) if tile else (273, 279)
    if tile:
        tags |= {322: (4, [tile]), 323: (4, [tile])}
    else:
        tags |= {278: (4, [h])}
    tags |= {block_tags[0]: (4, [0] * len(blocks)), block_tags[1]: (4, [len(b) for b in blocks])}
    kept = {tag: value for tag, value in ({**tags, **(replace or {})}).items() if value is not None}
    directory_size = (8 + 20 * len(kept) + 8) if big else (2 + 12 * len(kept) + 4)
    base = head_size + (directory_size if directory_first else 0)
    if block_tags[0] in kept and block_tags[0] not in (replace or {}):  # the real offsets of the blocks
        kept[block_tags[0]] = (4, [base + sum(len(b) for b in blocks[:i]) for i in range(len(blocks))])
    body = b"".join(blocks)
    body += b"\0" * (len(body) % 2)  # values and directories start on a word boundary
    entries = []
    for tag, (kind, values) in sorted(kept.items()):
        packed = struct.pack(endian + {1: "B", 3: "H", 4: "I", 11: "f", 16: "Q"}[kind] * len(values), *values)
        if len(packed) > inline:
            field = struct.pack(endian + word, base + len(body))
            body += packed + b"\0" * (len(packed) % 2)
        else:
            field = packed.ljust(inline, b"\0")
        entries.append(struct.pack(endian + "HH" + word, tag, kind, len(values)) + field)
    count = struct.pack(endian + ("Q" if big else "H"), len(entries))
    directory = count + b"".join(entries) + struct.pack(endian + word, 0)
    assert len(directory) == directory_size
    ifd = head_size if directory_first else head_size + len(body)
    order = b"II" if endian == "<" else b"MM"
    head = order + (struct.pack(endian + "HHHQ", 43, 8, 0, ifd) if big else struct.pack(endian + "HI", 42, ifd))
    return head + directory + body if directory_first else head + body + directory


def _put(data: bytes, offset: int, fmt: str, *values) -> bytes:
    """``data`` with ``values`` packed over the bytes at ``offset``."""
    packed = struct.pack(fmt, *values)
    return data[:offset] + packed + data[offset + len(packed) :]


# -- every format decodes, and its header reads the right size ---------------------------------------
@pytest.mark.parametrize(
    "ext, fmt, params, first_chunk, lossless",
    [(".png", "png", (), None, True), (".jpg", "jpeg", (), None, False),
     (".jpg", "jpeg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), None, False),
     (".tif", "tiff", (), None, True), (".bmp", "bmp", (), None, True),
     (".webp", "webp", (cv2.IMWRITE_WEBP_QUALITY, 90), b"VP8 ", False),
     (".webp", "webp", (cv2.IMWRITE_WEBP_QUALITY, 101), b"VP8L", True)],
)
def test_header_and_decode_of_every_format(ext, fmt, params, first_chunk, lossless):
    source = RGB if lossless else SMOOTH
    data = _encode(source, ext, params)
    if first_chunk is not None:
        assert data[12:16] == first_chunk  # OpenCV writes lossy WebP below quality 100, lossless above
    header = image_header(data)
    assert (header.format, header.width, header.height) == (fmt, 53, 37)
    image = decode_image(data)
    assert image.shape == (37, 53, 3) and image.dtype == np.uint8
    if lossless:
        assert np.array_equal(image, RGB)  # lossless formats round-trip exactly, in RGB order
    else:
        assert np.abs(image.astype(int) - SMOOTH).max() < 16  # close, and in RGB order (BGR is off by ~200)


def test_grey_16_bit_and_alpha_images():
    assert np.array_equal(decode_image(_encode(GREY, ".png")), GREY)
    deep = GREY.astype(np.uint16) * 257
    assert np.array_equal(decode_image(_encode(deep, ".png")), GREY)  # 16-bit keeps the high byte
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]]))
    assert np.array_equal(decode_image(buf.tobytes()), RGB)


@pytest.mark.parametrize("image", [RGB, GREY], ids=["rgb", "grey"])
@pytest.mark.parametrize("big, endian", [(False, "<"), (False, ">"), (True, "<"), (True, ">")],
                         ids=["II", "MM", "BigTIFF-II", "BigTIFF-MM"])
@pytest.mark.parametrize("tile", [0, 32, 256], ids=["strip", "tiles32", "tiles256"])
def test_tiff_and_bigtiff_strips_and_tiles(image, big, endian, tile):
    data = _tiff(image, big=big, endian=endian, tile=tile)
    assert data[:4] == {(False, "<"): b"II*\0", (False, ">"): b"MM\0*", (True, "<"): b"II+\0",
                        (True, ">"): b"MM\0+"}[big, endian]
    assert image_header(data) == codec.ImageHeader("tiff", 53, 37)
    assert np.array_equal(decode_image(data), image)


@pytest.mark.parametrize("image", [RGB, GREY], ids=["rgb", "grey"])
def test_interlaced_png(image):
    data = _png(image, interlace=1)
    assert data[28] == 1  # the IHDR interlace byte
    assert np.array_equal(decode_image(data), image)


def test_png_chunks_between_and_after_the_pixels_are_accepted():
    idat = zlib.compress(_png_rows(GREY, 0))
    parts = [idat[: len(idat) // 3], idat[len(idat) // 3 :]]  # pixel data split over two IDAT chunks
    data = (PNG_SIGNATURE + _ihdr(53, 37) + _chunk(b"tEXt", b"k\0v") + b"".join(_chunk(b"IDAT", p) for p in parts)
            + _chunk(b"tIME", b"\0" * 7) + _chunk(b"IEND", b"") + b"trailing bytes after IEND")
    assert np.array_equal(decode_image(data), GREY)


def test_bmp_variants():
    flipped = _encode(RGB, ".bmp")
    rows = flipped[54:]
    stride = len(rows) // 37
    bottom_up = [rows[i * stride : (i + 1) * stride] for i in range(37)]
    top_down = _put(flipped[:54], 22, "<i", -37) + b"".join(reversed(bottom_up))
    assert np.array_equal(decode_image(top_down), RGB)  # a negative height means rows stored top-down
    os2 = b"BM" + struct.pack("<IHHIIHHHH", 26 + len(rows), 0, 0, 26, 12, 53, 37, 1, 24) + rows
    assert image_header(os2) == codec.ImageHeader("bmp", 53, 37)
    assert decode_image(os2).shape[:2] == (37, 53)


# -- decompression bombs: valid containers that declare too many pixels -------------------------------
BOMBS = {
    "png": PNG_SIGNATURE + _ihdr(50_000, 50_000, 8, 2) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""),
    "jpeg": b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
    + b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60_000, 60_000, 1) + b"\x01\x11\x00"
    + b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0, 0, 63, 0) + b"\0" * 4 + b"\xff\xd9",
    "tiff": b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 4)
    + struct.pack("<HHII", 256, 4, 1, 100_000) + struct.pack("<HHII", 257, 4, 1, 100_000)
    + struct.pack("<HHII", 273, 4, 1, 8) + struct.pack("<HHII", 279, 4, 1, 16) + b"\0\0\0\0",
    "bmp": b"BM" + struct.pack("<IHHI", 14 + 40 + 8 + 2, 0, 0, 14 + 40 + 8)  # RLE8: a few bytes for any size
    + struct.pack("<IiiHHIIiiII", 40, 30_000, -30_000, 1, 8, 1, 2, 0, 0, 2, 0) + b"\0" * 8 + b"\x00\x01",
    "webp": b"RIFF" + struct.pack("<I", 4 + 18 + 14) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
    + (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
    + b"VP8L" + struct.pack("<I", 5) + b"\x2f" + b"\0" * 4 + b"\0",
}


@pytest.mark.parametrize("fmt", sorted(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(fmt):
    header = image_header(BOMBS[fmt])
    assert header.format == fmt and header.width * header.height > 64_000_000
    with pytest.raises(ImageTooLarge, match="over the limit"):
        decode_image(BOMBS[fmt])


def test_pixel_limit_is_configurable():
    data = _encode(RGB, ".png")
    with pytest.raises(ImageTooLarge, match="^image is 53x37 = 1961 pixels, over the limit of 1000 pixels"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=1961).shape == (37, 53, 3)


# -- hostile containers: refused cheaply, without a large allocation ---------------------------------
# What a refusal costs is counted, not timed (a timed test fails when a loaded host or a collector pause
# stretches it: CI once measured 1.2 s of thread time for a walk that takes 0.04 s): the Python lines the
# container walk runs, and whether a decoder (Pillow for PNG, OpenCV for the rest) is reached at all.
WALK_LINES = 2_000_000  # the 65,536-chunk walks run ~0.9 M; a Python scan of the 8 MiB inputs would run >= 8 M


@dataclasses.dataclass
class Work:
    lines: int = 0  # Python lines run in segsvc/inference/containers.py
    decoder_reached: bool = False


def _refusal_work(monkeypatch, data: bytes, message: str) -> Work:
    """Refuse ``data`` (its message starting with ``message``) and return what the refusal cost."""
    work = Work()
    walk_file = containers.__file__

    def line(frame, event, arg):
        work.lines += event == "line"
        return line

    def reached(*args, **kwargs):
        work.decoder_reached = True
        raise AssertionError("a decoder was reached")

    monkeypatch.setattr(codec.cv2, "imdecode", reached)
    monkeypatch.setattr(codec, "_decode_png", reached)
    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: line if frame.f_code.co_filename == walk_file else None)
    try:
        with pytest.raises(InvalidImage, match=f"^{re.escape(message)}"):
            decode_image(data)
    finally:
        sys.settrace(previous)
    return work


def _assert_cheap(work: Work) -> None:
    assert not work.decoder_reached
    assert work.lines <= WALK_LINES, f"the container walk ran {work.lines} lines"


def _idat_length_bomb() -> bytes:
    """The probe's bomb (theirs was 261 bytes): a valid 24x24 PNG whose IDAT chunk declares 0xFFFFFFFF bytes."""
    y, x = np.mgrid[:24, :24]
    png = encode_png(np.dstack([x * 10, y * 10, (x + y) * 5]).astype(np.uint8))
    at = png.index(b"IDAT") - 4
    return _put(png, at, ">I", 0xFFFFFFFF)


def test_idat_length_bomb_is_refused_before_anything_is_read(monkeypatch):
    bomb = _idat_length_bomb()
    assert len(bomb) < 300
    remain = len(bomb) - (bomb.index(b"IDAT") + 4) - 4  # after the type field, less the CRC
    work = _refusal_work(monkeypatch, bomb, f"PNG chunk IDAT declares 4294967295 bytes but only {remain} remain")
    assert not work.decoder_reached


def _zlib_bomb_png(width: int, height: int, inflated_mib: int) -> bytes:
    """A grey PNG whose one zlib stream holds the image's rows and then ``inflated_mib`` MiB of zeros.

    Blocks after a full flush do not refer back, so one compressed MiB repeats cheaply (the
    Adler-32 at the end is then wrong, which no decoder reaches before the size is exceeded).
    """
    z = zlib.compressobj(9)
    head = z.compress(b"\0" * (height * (1 + width))) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(b"\0" * MIB) + z.flush(zlib.Z_FULL_FLUSH)
    idat = head + block * inflated_mib + z.flush()
    return PNG_SIGNATURE + _ihdr(width, height) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _deep_tiff(width: int, height: int, bits: int, sample_format: int, samples: int = 4, rows: int = 64) -> bytes:
    """A deflate TIFF whose strips all point at one compressed strip of zero samples: tiny bytes, large pixels."""
    strip = zlib.compress(bytes(width * rows * samples * bits // 8), 9)
    strips = -(-height // rows)
    fake = np.frombuffer(strip, np.uint8)[None, :]  # _tiff writes these bytes as its one block, at offset 8
    return _tiff(fake, replace={
        256: (4, [width]), 257: (4, [height]), 258: (3, [bits] * samples), 259: (3, [8]),
        262: (3, [2 if samples >= 3 else 1]), 273: (4, [8] * strips), 277: (3, [samples]), 278: (4, [rows]),
        279: (4, [len(strip)] * strips), 338: (3, [2]) if samples == 4 else None, 339: (3, [sample_format] * samples),
    })



@functools.cache
def _hostile_inputs() -> dict[str, tuple[bytes, str]]:
    """Inputs that make the container walk itself work hard, with the start of their refusal."""
    ents = b"".join(struct.pack("<HHII", 300, 4, 1, 0) for _ in range(4096))
    strips = 1_000_000
    tiff_strips = (b"II*\x00" + struct.pack("<IH", 8, 4) + struct.pack("<HHII", 256, 4, 1, 1000)
                   + struct.pack("<HHII", 257, 4, 1, 1000) + struct.pack("<HHII", 273, 4, strips, 62)
                   + struct.pack("<HHII", 279, 4, strips, 62 + 4 * strips) + b"\0\0\0\0"
                   + np.full(strips, 64, "<u4").tobytes()
                   + np.r_[np.zeros(strips - 1), [1 << 30]].astype("<u4").tobytes())
    return {
        "png-idat-length": (_idat_length_bomb(), "PNG chunk IDAT declares 4294967295"),
        "png-text-length": (PNG_SIGNATURE + _ihdr(24, 24) + struct.pack(">I", 0x7FFFFFF0) + b"tEXt" + b"\0" * 64,
                            "PNG chunk tEXt declares 2147483632 bytes but only 60 remain"),
        "png-70000-chunks": (PNG_SIGNATURE + _ihdr(24, 24) + _chunk(b"tEXt", b"") * 70_000,
                             "PNG has more than 65536 chunks"),
        "jpeg-5000-segments": (b"\xff\xd8" + b"\xff\xe0\x00\x02" * 5000, "JPEG has more than 4096 segments"),
        "jpeg-8MiB-fill-bytes": (b"\xff\xd8" + b"\xff" * (8 * MIB), "JPEG has more than 4096 segments"),
        "jpeg-8MiB-scan-without-end": (BOMBS["jpeg"][:-2] + b"\x12" * (8 * MIB), "JPEG is truncated"),
        "tiff-4096-unknown-tags": (b"II*\x00" + struct.pack("<IH", 8, 4096) + ents + b"\0" * 4,
                                   "TIFF has no ImageWidth"),
        "tiff-1M-strips-last-past-end": (tiff_strips, "TIFF strip 999999 at offset 64 declares 1073741824 bytes"),
        "tiff-13kB-float64-36MP": (_deep_tiff(6000, 6000, 64, 3), "TIFF has 64 bits per sample"),  # +2.2 GiB before
        "webp-70000-chunks": (b"RIFF" + struct.pack("<I", 4 + 8 * 70_000) + b"WEBP" + b"XXXX\0\0\0\0" * 70_000,
                              "WebP has more than 65536 chunks"),
    }


@pytest.mark.parametrize("name", sorted(_hostile_inputs()))
def test_hostile_containers_are_refused_cheaply(name, monkeypatch):
    data, message = _hostile_inputs()[name]
    _assert_cheap(_refusal_work(monkeypatch, data, message))


REFUSE_IN_FRESH_PROCESS = """
import resource, sys
from segsvc.errors import InvalidImage
from segsvc.inference.codec import decode_image
from tests.inference.test_codec import _hostile_inputs
inputs = _hostile_inputs()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for data, _ in inputs.values():
    try:
        decode_image(data)
    except InvalidImage:
        pass
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown * (1 if sys.platform == "darwin" else 1024))
"""


def test_refusing_hostile_containers_allocates_nothing_large():
    """Peak RSS of a fresh process (the pytest process's peak hides growth) barely moves.

    Before the container checks, the IDAT bomb alone took OpenCV to +4 GiB.
    """
    out = subprocess.run([sys.executable, "-c", REFUSE_IN_FRESH_PROCESS], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 32 * MIB


@pytest.mark.parametrize("name", sorted(_hostile_inputs()))
def test_refusing_hostile_containers_allocates_less_than_the_input_in_python(name):
    """At most the input's size, or 64 KiB (the IDAT bomb: no copy of the data, no array). tracemalloc sees
    Python and numpy; OpenCV's C++ side is the RSS test's. The walk keeps what it needs, not a record per chunk:
    the 547 KiB WebP of 70,000 chunks made 9 MiB of tuples (65,536 of them), and the collector's work."""
    data, _ = _hostile_inputs()[name]
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImage):
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= max(len(data), 64 << 10), f"{peak} bytes allocated to refuse {len(data)} bytes"


# -- compressed PNG pixels are inflated up to the declared size, never further ----------------------------
def _fed_to_decoders(monkeypatch) -> list[int]:
    """The size of every buffer Pillow hands its decoders (it feeds the compressed pixels in 64 KiB reads)."""
    fed: list[int] = []
    real = Image._getdecoder

    def counting(*args, **kwargs):
        decoder = real(*args, **kwargs)

        class Counting:
            def decode(self, data):
                fed.append(len(data))
                return decoder.decode(data)

            def __getattr__(self, name):
                return getattr(decoder, name)

        return Counting()

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return fed


FED_BYTES = 1 << 17  # two of Pillow's 64 KiB reads: the stream is cut where the declared rows end


@pytest.mark.parametrize(
    "width, height, depth, colour, interlace, noise",
    [(24, 24, 8, 0, 0, False), (24, 24, 8, 2, 0, False), (13, 7, 1, 0, 0, False), (13, 7, 2, 0, 1, False),
     (53, 37, 16, 2, 1, False), (9, 5, 4, 3, 0, False), (3, 1, 8, 6, 1, False), (1, 1, 16, 4, 1, False),
     (2000, 1000, 8, 0, 0, False),  # 2 MB of rows from a few kB, then the excess
     (300, 300, 8, 2, 0, True)],  # 270 kB of noise: the excess arrives after several 64 KiB reads
)
def test_png_pixel_data_past_the_declared_rows_is_never_inflated(width, height, depth, colour, interlace, noise,
                                                                 monkeypatch):
    """libpng inflated a stream to its end, discarding what the rows did not need (a zlib bomb took minutes),
    so every PNG was inflated once more beforehand to refuse the excess. Pillow stops at the last row: the
    excess decodes as nothing, and the decoder is fed the compressed rows and at most one more read."""
    bits = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * depth
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in passes]
    raw = sum(h * (1 + (w * bits + 7) // 8) for w, h in sizes if w > 0 and h > 0)
    palette = _chunk(b"PLTE", b"\0\0\0" * 16) if colour == 3 else b""
    row_bytes = 1 + (width * bits + 7) // 8
    rows = np.zeros((raw // row_bytes, row_bytes), np.uint8)  # filter byte 0 on each row
    if noise:
        rows[:, 1:] = np.random.default_rng(1).integers(0, 256, (len(rows), row_bytes - 1))
    rows = rows.tobytes() + b"\0" * (raw - rows.size)
    idat = zlib.compress(rows + b"\0" * (64 * MIB), 9)
    data = (PNG_SIGNATURE + _ihdr(width, height, depth, colour, interlace) + palette + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))
    fed = _fed_to_decoders(monkeypatch)
    image = decode_image(data)
    assert image.shape[:2] == (height, width) and image.any() == noise
    assert fed and sum(fed) <= len(zlib.compress(rows, 9)) + FED_BYTES, f"{sum(fed)} compressed bytes were fed"


def test_zlib_bomb_png_decodes_its_declared_image_and_inflates_no_further(monkeypatch):
    bomb = _zlib_bomb_png(24, 24, 4096)  # 4 MiB of IDAT that inflates to 4 GiB; OpenCV took ~8 s
    assert len(bomb) < 8 * MIB
    fed = _fed_to_decoders(monkeypatch)
    assert np.array_equal(decode_image(bomb), np.zeros((24, 24), np.uint8))
    assert fed and sum(fed) <= FED_BYTES, f"{sum(fed)} compressed bytes were fed"


def test_corrupt_png_pixel_data_is_left_to_the_decoder():
    data = PNG_SIGNATURE + _ihdr(24, 24) + _chunk(b"IDAT", b"\x78\x9c\xff\xff\xff") + _chunk(b"IEND", b"")
    _refused(data, "PNG data could not be decoded (corrupt or truncated)")


# -- each parser's refusals, word for word ------------------------------------------------------------
# A 3x2 grey PNG with stored (uncompressed) pixels: the same bytes with any zlib. Chunks at 8 (IHDR),
# 33 (IDAT, 19 bytes of data) and 64 (IEND); 76 bytes in all.
TINY_PNG = _png(np.arange(6, dtype=np.uint8).reshape(2, 3), level=0)
TINY_IEND = _chunk(b"IEND", b"")
PNG_CASES = {
    "idat-overlong": (_put(TINY_PNG, 33, ">I", 0xFFFFFFFF),
                      "PNG chunk IDAT declares 4294967295 bytes but only 31 remain"),
    "idat-one-too-long": (_put(TINY_PNG, 33, ">I", 32), "PNG chunk IDAT declares 32 bytes but only 31 remain"),
    "cut-in-idat": (TINY_PNG[:60], "PNG chunk IDAT declares 19 bytes but only 15 remain"),
    "cut-in-iend": (TINY_PNG[:75], "PNG is truncated: no IEND chunk in its 75 bytes"),
    "no-iend": (TINY_PNG[:64], "PNG is truncated: no IEND chunk in its 64 bytes"),
    "signature-only": (PNG_SIGNATURE + b"\0\0", "PNG is truncated: no IEND chunk in its 10 bytes"),
    "not-letters": (_put(TINY_PNG, 37, "4s", b"ID\0T"),
                    "PNG chunk at offset 33 has type b'ID\\x00T', not four letters (corrupt chunk stream)"),
    "ihdr-not-first": (PNG_SIGNATURE + _chunk(b"tEXt", b"") + TINY_PNG[8:],
                       "PNG starts with a tEXt chunk; IHDR must come first"),
    "two-ihdr": (TINY_PNG[:33] + TINY_PNG[8:], "PNG has a second IHDR chunk"),
    "ihdr-14-bytes": (PNG_SIGNATURE + _chunk(b"IHDR", TINY_PNG[16:29] + b"\0") + TINY_PNG[33:],
                      "PNG IHDR chunk is 14 bytes; it must be 13"),
    "width-2^31": (_put(TINY_PNG, 16, ">I", 2**31), "PNG declares 2147483648x2 pixels; a side is at most 2^31-1"),
    "height-2^31": (_put(TINY_PNG, 20, ">I", 2**31), "PNG declares 3x2147483648 pixels; a side is at most 2^31-1"),
    "depth-3": (_put(TINY_PNG, 24, "B", 3), "PNG bit depth 3 is not valid for colour type 0"),
    "colour-1": (_put(TINY_PNG, 25, "B", 1), "PNG bit depth 8 is not valid for colour type 1"),
    "rgb-depth-4": (_put(TINY_PNG, 24, "BB", 4, 2), "PNG bit depth 4 is not valid for colour type 2"),
    "compression-1": (_put(TINY_PNG, 26, "B", 1),
                      "PNG IHDR names unknown methods (compression 1, filter 0, interlace 0)"),
    "filter-1": (_put(TINY_PNG, 27, "B", 1), "PNG IHDR names unknown methods (compression 0, filter 1, interlace 0)"),
    "interlace-2": (_put(TINY_PNG, 28, "B", 2),
                    "PNG IHDR names unknown methods (compression 0, filter 0, interlace 2)"),
    "no-idat": (TINY_PNG[:33] + TINY_IEND, "PNG has no IDAT chunk (no pixel data)"),
    "idat-split-by-text": (TINY_PNG[:64] + _chunk(b"tEXt", b"") + TINY_PNG[33:], "PNG IDAT chunks are not consecutive"),
}


@pytest.mark.parametrize("case", sorted(PNG_CASES))
def test_png_refusals(case):
    data, message = PNG_CASES[case]
    _refused(data, message)


def test_png_refusal_of_too_many_chunks(monkeypatch):
    monkeypatch.setattr(containers, "MAX_PNG_CHUNKS", 3)
    decode_image(TINY_PNG)  # IHDR, IDAT, IEND: three chunks are allowed
    _refused(TINY_PNG[:64] + _chunk(b"tEXt", b"") + TINY_IEND, "PNG has more than 3 chunks")


def test_the_tiny_png_fixture_is_what_the_cases_assume():
    assert len(TINY_PNG) == 76 and TINY_PNG[37:41] == b"IDAT" and TINY_PNG[68:72] == b"IEND"
    assert np.array_equal(decode_image(TINY_PNG), np.arange(6, dtype=np.uint8).reshape(2, 3))


def test_png_limits_accept_their_last_good_value():
    assert image_header(_put(TINY_PNG, 16, ">I", 2**31 - 1)).width == 2**31 - 1  # then the pixel limit refuses it
    assert image_header(_put(TINY_PNG, 20, ">I", 2**31 - 1)).height == 2**31 - 1
    with pytest.raises(ImageTooLarge):
        decode_image(_put(TINY_PNG, 20, ">I", 2**31 - 1))

# SOI, APP0 (at 2), SOF0 for 53x37 with three components (at 20), SOS (at 39), two scan bytes, EOI (at 55).
APP0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\0" * 9
SOF = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 37, 53, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
SOS = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
EOI = b"\xff\xd9"
JPEG = b"\xff\xd8" + APP0 + SOF + SOS + b"\x12\x34" + EOI


def _sof(length: int, precision: int, components: int) -> bytes:
    return b"\xff\xc0" + struct.pack(">HBHHB", length, precision, 37, 53, components) + b"\x01\x11\x00" * components


JPEG_CASES = {
    "app0-overlong": (_put(JPEG, 4, ">H", 0xFFFF), "JPEG segment FFE0 declares 65535 bytes but only 53 remain"),
    "app0-length-1": (_put(JPEG, 4, ">H", 1), "JPEG segment FFE0 at offset 2 has length 1; the minimum is 2"),
    "cut-in-sof": (JPEG[:30], "JPEG segment FFC0 declares 17 bytes but only 8 remain"),
    "cut-before-sos": (JPEG[:39], "JPEG is truncated: no scan (SOS) in its 39 bytes"),
    "not-a-marker": (_put(JPEG, 20, "B", 0x00), "JPEG marker stream is corrupt at offset 20 (byte 0x00, not 0xff)"),
    "eoi-first": (b"\xff\xd8" + EOI + b"\0\0", "JPEG has marker FFD9 at offset 2, before its first scan"),
    "app0-one-too-long": (_put(JPEG, 4, ">H", 54), "JPEG segment FFE0 declares 54 bytes but only 53 remain"),
    "eoi-only-in-sos-header": (b"\xff\xd8" + SOF + SOS[:-3] + b"\xff\xd9\x00" + b"\x12\x34",
                               "JPEG is truncated: no end-of-image marker (FFD9) after its first scan"),
    "second-soi": (b"\xff\xd8" + APP0 + b"\xff\xd8" + SOF + SOS + EOI,
                   "JPEG has marker FFD8 at offset 20, before its first scan"),
    "ff00": (b"\xff\xd8" + APP0 + b"\xff\x00" + SOF + SOS + EOI,
             "JPEG has marker FF00 at offset 20, before its first scan"),
    "sos-before-sof": (b"\xff\xd8" + APP0 + SOS + SOF + EOI, "JPEG has a scan (SOS) before its frame header (SOF)"),
    "two-sof": (b"\xff\xd8" + SOF + SOF + SOS + EOI, "JPEG has a second frame header (SOF)"),
    "sof-short": (b"\xff\xd8" + b"\xff\xc0\x00\x07" + b"\0" * 5 + SOS + EOI,
                  "JPEG frame header (SOF) is 7 bytes; it needs at least 8"),
    "precision-7": (b"\xff\xd8" + _sof(17, 7, 3) + SOS + EOI, "JPEG sample precision is 7 bits; expected 8, 12 or 16"),
    "0-components": (b"\xff\xd8" + _sof(8, 8, 0) + SOS + EOI, "JPEG has 0 components; expected 1 to 4"),
    "5-components": (b"\xff\xd8" + _sof(23, 8, 5) + SOS + EOI, "JPEG has 5 components; expected 1 to 4"),
    "sof-length-mismatch": (b"\xff\xd8" + _sof(17, 8, 2) + SOS + EOI,
                            "JPEG frame header (SOF) is 17 bytes but 2 components need 14"),
    "no-eoi": (JPEG[:-2], "JPEG is truncated: no end-of-image marker (FFD9) after its first scan"),
    "eoi-only-in-app1": (b"\xff\xd8" + b"\xff\xe1\x00\x04" + EOI + APP0 + SOF + SOS + b"\x12\x34",
                         "JPEG is truncated: no end-of-image marker (FFD9) after its first scan"),
}


@pytest.mark.parametrize("case", sorted(JPEG_CASES))
def test_jpeg_refusals(case):
    data, message = JPEG_CASES[case]
    _refused(data, message)


def test_jpeg_headers_that_are_accepted(monkeypatch):
    assert image_header(JPEG) == codec.ImageHeader("jpeg", 53, 37)
    fill_and_restart = b"\xff\xd8" + b"\xff" * 3 + b"\xff\xd0" + APP0 + SOF + SOS + b"\x12" + EOI + b"\0" * 9
    assert image_header(fill_and_restart) == codec.ImageHeader("jpeg", 53, 37)  # fill bytes, RST0, padding
    assert image_header(b"\xff\xd8" + SOF + SOS + EOI).width == 53  # an empty scan ends right where EOI starts
    for precision in (12, 16):
        assert image_header(JPEG[:20] + _put(SOF, 4, "B", precision) + JPEG[39:]).height == 37
    assert image_header(b"\xff\xd8" + _sof(20, 8, 4) + SOS + EOI).width == 53  # CMYK: four components
    for marker in (0xC2, 0xCF):  # progressive and lossless frame headers carry the size too
        assert image_header(JPEG[:20] + _put(SOF, 1, "B", marker) + JPEG[39:]).width == 53
    monkeypatch.setattr(containers, "MAX_JPEG_SEGMENTS", 3)  # APP0, SOF, SOS
    assert image_header(JPEG).height == 37
    with pytest.raises(InvalidImage, match="^JPEG has more than 3 segments before its first scan$"):
        image_header(b"\xff\xd8" + APP0 + APP0 + SOF + SOS + EOI)


def test_real_jpeg_cut_in_its_scan_is_refused():
    data = _encode(RGB, ".jpg")
    _refused(data[: len(data) - 100], "JPEG is truncated: no end-of-image marker (FFD9) after its first scan")


def _tiff_entry(data: bytes, tag: int) -> int:
    """Offset of ``tag``'s entry in the first directory of a little-endian classic TIFF."""
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    return next(ifd + 2 + 12 * k for k in range(count) if struct.unpack_from("<H", data, ifd + 2 + 12 * k)[0] == tag)


# A 53x37 grey one-strip TIFF: pixels at 8 (1961 bytes and a pad byte), directory at 1970 with 10 entries.
TIFF = _tiff(GREY)
N_TIFF = len(TIFF)
TWO_STRIPS = _tiff(GREY, replace={273: (4, [8, 988]), 278: (4, [20]), 279: (4, [980, 981])})
BIGTIFF = _tiff(GREY, big=True)


def _bigtiff_entry(data: bytes, tag: int) -> int:
    """Offset of ``tag``'s entry in the first directory of a little-endian BigTIFF."""
    (ifd,) = struct.unpack_from("<Q", data, 8)
    (count,) = struct.unpack_from("<Q", data, ifd)
    return next(ifd + 8 + 20 * k for k in range(count) if struct.unpack_from("<H", data, ifd + 8 + 20 * k)[0] == tag)
TIFF_CASES = {
    "ifd-past-end": (_put(TIFF, 4, "<I", N_TIFF),
                     f"TIFF directory offset {N_TIFF} is outside the {N_TIFF} bytes of data"),
    "ifd-in-header": (_put(TIFF, 4, "<I", 4), f"TIFF directory offset 4 is outside the {N_TIFF} bytes of data"),
    "no-entries": (_put(TIFF, 1970, "<H", 0), "TIFF directory declares 0 entries; expected 1 to 4096"),
    "4097-entries": (_put(TIFF, 1970, "<H", 4097), "TIFF directory declares 4097 entries; expected 1 to 4096"),
    "entries-overlong": (_put(TIFF, 1970, "<H", 11), "TIFF directory declares 11 entries (132 bytes, then the "
                         "next directory's 4-byte offset) but only 124 bytes remain"),
    "no-next-directory-offset": (TIFF[:-4], "TIFF directory declares 10 entries (120 bytes, then the next "
                                 "directory's 4-byte offset) but only 120 bytes remain"),
    "cut-in-next-directory-offset": (TIFF[:-2], "TIFF directory declares 10 entries (120 bytes, then the next "
                                     "directory's 4-byte offset) but only 122 bytes remain"),
    "header-cut": (TIFF[:6], "TIFF header is truncated (6 of 8 bytes)"),
    "float-width": (_tiff(GREY, replace={256: (11, [53.0])}),
                    "TIFF tag ImageWidth has type 11; expected BYTE, SHORT, LONG or LONG8"),
    "no-width": (_tiff(GREY, replace={256: None}), "TIFF has no ImageWidth tag"),
    "no-height": (_tiff(GREY, replace={257: None}), "TIFF has no ImageLength tag"),
    "width-without-values": (_tiff(GREY, replace={256: (4, [])}), "TIFF has no ImageWidth tag"),
    "3-bit": (_tiff(GREY, replace={258: (3, [3])}),
              "TIFF has 3 bits per sample; expected one of (1, 2, 4, 8, 16): send 8- or 16-bit images"),
    "rgb-one-bad-bits": (_tiff(RGB, replace={258: (3, [8, 12, 8])}),
                         "TIFF has 12 bits per sample; expected one of (1, 2, 4, 8, 16): send 8- or 16-bit images"),
    "5-samples": (_tiff(GREY, replace={277: (3, [5])}), "TIFF has 5 samples per pixel; expected 1 to 4"),
    "0-samples": (_tiff(GREY, replace={277: (3, [0])}), "TIFF has 0 samples per pixel; expected 1 to 4"),
    "strip-one-byte-too-long": (_tiff(GREY, replace={279: (4, [N_TIFF - 7])}),
                                f"TIFF strip 0 at offset 8 declares {N_TIFF - 7} bytes but only {N_TIFF - 8} remain"),
    "strip-past-end": (_tiff(GREY, replace={273: (4, [N_TIFF + 1])}),
                       f"TIFF strip 0 at offset {N_TIFF + 1} declares 1961 bytes but only 0 remain"),
    "strip-counts-mismatch": (_tiff(GREY, replace={279: (4, [1000, 961])}),
                              "TIFF has 1 strip offsets but 2 strip byte counts"),
    "no-strip-offsets": (_tiff(GREY, replace={273: None}), "TIFF has no StripOffsets tag (no pixel data)"),
    "strip-offsets-past-end": (_put(TWO_STRIPS, _tiff_entry(TWO_STRIPS, 273) + 8, "<I", len(TWO_STRIPS) - 7),
                               f"TIFF tag StripOffsets declares 2 values at offset {len(TWO_STRIPS) - 7} "
                               "but only 7 bytes remain"),
    "huge-tiles": (_tiff(GREY, tile=16, replace={322: (4, [1 << 20]), 323: (4, [16])}),
                   "TIFF tiles of 1048576x16 pixels do not fit a 53x37 image"),
    "empty-tiles": (_tiff(GREY, tile=16, replace={322: (4, [0])}),
                    "TIFF tiles of 0x16 pixels do not fit a 53x37 image"),
    "tiles-without-width": (_tiff(GREY, tile=16, replace={322: None}), "TIFF has no TileWidth tag"),
    "tile-past-end": (_tiff(GREY, tile=16, replace={325: (4, [256] * 11 + [10**6])}),
                      "TIFF tile 11 at offset 2824 declares 1000000 bytes but only 490 remain"),
    "bigtiff-4-byte-offsets": (_put(_tiff(GREY, big=True), 4, "<H", 4),
                               "BigTIFF header declares 4-byte offsets and reserved field 0; they must be 8 and 0"),
    "bigtiff-nonzero": (_put(_tiff(GREY, big=True), 6, "<H", 1),
                        "BigTIFF header declares 8-byte offsets and reserved field 1; they must be 8 and 0"),
    "bigtiff-cut": (_tiff(GREY, big=True)[:10], "BigTIFF header is truncated (10 of 16 bytes)"),
    "one-entry": (_put(TIFF, 1970, "<H", 1), "TIFF has no ImageLength tag"),
    "65535-entries": (_put(TIFF, 1970, "<H", 65535), "TIFF directory declares 65535 entries; expected 1 to 4096"),
    "ifd-at-2^32-1": (_put(TIFF, 4, "<I", 2**32 - 1),
                      f"TIFF directory offset 4294967295 is outside the {N_TIFF} bytes of data"),
    "header-only": (TIFF[:8], "TIFF directory offset 1970 is outside the 8 bytes of data"),
    "cut-after-count": (TIFF[:1972], "TIFF directory declares 10 entries (120 bytes, then the next directory's "
                        "4-byte offset) but only 0 bytes remain"),
    "strip-offsets-2^32-1-values": (_put(TIFF, _tiff_entry(TIFF, 273) + 4, "<I", 2**32 - 1),
                                    "TIFF tag StripOffsets declares 4294967295 values at offset 8 "
                                    f"but only {N_TIFF - 8} bytes remain"),
    "values-past-end": (_put(TWO_STRIPS, _tiff_entry(TWO_STRIPS, 273) + 8, "<I", len(TWO_STRIPS) + 10),
                        f"TIFF tag StripOffsets declares 2 values at offset {len(TWO_STRIPS) + 10} "
                        "but only 0 bytes remain"),
    "no-tile-offsets": (_tiff(GREY, tile=32, replace={324: None}), "TIFF has no TileOffsets tag (no pixel data)"),
    "tile-width-without-tiles": (_tiff(GREY, replace={322: (4, [32])}), "TIFF has no TileLength tag"),
    "tile-offsets-without-tiles": (_tiff(GREY, replace={324: (4, [8])}), "TIFF has no TileWidth tag"),
    "bigtiff-ifd-at-2^64-1": (_put(BIGTIFF, 8, "<Q", 2**64 - 1),
                              "TIFF directory offset 18446744073709551615 "
                              f"is outside the {len(BIGTIFF)} bytes of data"),
    "bigtiff-cut-in-next-directory-offset": (BIGTIFF[:-4], "TIFF directory declares 10 entries (200 bytes, then "
                                             "the next directory's 8-byte offset) but only 204 bytes remain"),
    "bigtiff-header-only": (BIGTIFF[:16],
                            f"TIFF directory offset {len(BIGTIFF) - 8 - 20 * 10 - 8} is outside the 16 bytes of data"),
    "bigtiff-2^64-1-values": (_put(BIGTIFF, _bigtiff_entry(BIGTIFF, 273) + 4, "<Q", 2**64 - 1),
                              "TIFF tag StripOffsets declares 18446744073709551615 values at offset 16 "
                              f"but only {len(BIGTIFF) - 16} bytes remain"),
    "bigtiff-2^64-1-entries": (_put(BIGTIFF, struct.unpack_from("<Q", BIGTIFF, 8)[0], "<Q", 2**64 - 1),
                               "TIFF directory declares 18446744073709551615 entries; expected 1 to 4096"),
    "bigtiff-ifd-in-header": (_put(_tiff(GREY, big=True), 8, "<Q", 8),
                              f"TIFF directory offset 8 is outside the {len(_tiff(GREY, big=True))} bytes of data"),
    # libtiff reads the first of two entries, the walk read the last: a 16x16 check of a 20000x20000 decode
    "second-width": (_put(TIFF, _tiff_entry(TIFF, 284), "<HHII", 256, 4, 1, 53),
                     "TIFF directory has a second ImageWidth entry (at 9); a tag may appear once"),
    "second-bits-per-sample": (_put(TIFF, _tiff_entry(TIFF, 284), "<HHII", 258, 3, 1, 8),
                               "TIFF directory has a second BitsPerSample entry (at 9); a tag may appear once"),
}


@pytest.mark.parametrize("case", sorted(TIFF_CASES))
def test_tiff_refusals(case):
    data, message = TIFF_CASES[case]
    with pytest.raises(InvalidImage, match=f"^{re.escape(message)}") as info:
        decode_image(data)
    assert type(info.value) is InvalidImage


@pytest.mark.parametrize(
    "width, height, tile_w, tile_h, ok",
    [(53, 37, 1024, 1024, True), (53, 37, 1 << 20, 1, True), (53, 37, 1, 1, True),  # up to a megapixel: fine
     (53, 37, 1 << 20, 16, False), (53, 37, 1025, 1024, False), (53, 37, 0, 16, False), (53, 37, 16, 0, False),
     (70_000, 17, 70_000, 32, True), (70_000, 17, 70_000, 33, False), (70_000, 17, 70_016, 32, False),  # or the
     (69_990, 17, 70_000, 32, True), (69_990, 17, 70_016, 32, False)],  # image with its sides rounded up to 16
)
def test_tiff_tile_size_limit(width, height, tile_w, tile_h, ok):
    data = _tiff(np.zeros((height, width), np.uint8), replace={322: (4, [tile_w]), 323: (4, [tile_h]),
                                                                324: (4, [8]), 325: (4, [1]), 273: None, 279: None})
    if ok:
        assert image_header(data) == codec.ImageHeader("tiff", width, height)
    else:
        message = f"TIFF tiles of {tile_w}x{tile_h} pixels do not fit a {width}x{height} image"
        with pytest.raises(InvalidImage, match=f"^{message}$"):
            image_header(data)


def test_tiff_headers_that_are_accepted():
    assert image_header(_tiff(GREY, replace={277: (3, [4])})).width == 53  # four samples (RGBA)
    assert image_header(_tiff(GREY, replace={279: (4, [N_TIFF - 8])})).width == 53  # a strip up to the last byte
    n = len(TWO_STRIPS)
    assert image_header(_tiff(GREY, replace={273: (4, [8, n]), 278: (4, [20]), 279: (4, [980, 0])})).width == 53
    without_counts = _tiff(GREY, replace={279: None})  # libtiff computes StripByteCounts when it is missing
    assert np.array_equal(decode_image(without_counts), GREY)
    for big in (False, True):  # the directory right after the header
        assert np.array_equal(decode_image(_tiff(RGB, big=big, directory_first=True)), RGB)


# A 53x37 RGB BMP from OpenCV: 14 + 40 header bytes, rows of 160 bytes from offset 54.
BMP = _encode(RGB, ".bmp")
BMP_CASES = {
    "rows-cut": (BMP[:-1], "BMP pixel rows need 5920 bytes but only 5919 remain"),
    "18-bytes": (BMP[:18], "BMP info header declares 40 bytes but only 4 remain"),
    "info-cut": (BMP[:30], "BMP info header declares 40 bytes but only 16 remain"),
    "header-only": (BMP[:54], "BMP pixel rows need 5920 bytes but only 0 remain"),
    "offset-2^32": (_put(BMP, 10, "<I", 0xFFFFFF00),
                    f"BMP pixel data offset 4294967040 is outside 54..{len(BMP)} (header end..data end)"),
    "info-2^32-1": (_put(BMP, 14, "<I", 2**32 - 1),
                    "BMP info header is 4294967295 bytes; expected 12 (OS/2) or 40 to 124 (Windows)"),
    "65535-bits": (_put(BMP, 28, "<H", 0xFFFF), "BMP has 65535 bits per pixel; expected one of (1, 4, 8, 16, 24, 32)"),
    "width-0": (_put(BMP, 18, "<i", 0), "image is empty (0x37 pixels)"),
    "header-cut": (BMP[:17], "BMP header is truncated (17 of 18 bytes)"),
    "info-20": (_put(BMP, 14, "<I", 20), "BMP info header is 20 bytes; expected 12 (OS/2) or 40 to 124 (Windows)"),
    "info-125": (_put(BMP, 14, "<I", 125), "BMP info header is 125 bytes; expected 12 (OS/2) or 40 to 124 (Windows)"),
    "info-39": (_put(BMP, 14, "<I", 39), "BMP info header is 39 bytes; expected 12 (OS/2) or 40 to 124 (Windows)"),
    "rows-missing": (BMP[:60], "BMP pixel rows need 5920 bytes but only 6 remain"),
    "info-past-end": (_put(BMP, 14, "<I", 124)[:100], "BMP info header declares 124 bytes but only 86 remain"),
    "negative-width": (_put(BMP, 18, "<i", -53), "BMP width -53 is negative"),
    "3-bits": (_put(BMP, 28, "<H", 3), "BMP has 3 bits per pixel; expected one of (1, 4, 8, 16, 24, 32)"),
    "offset-in-header": (_put(BMP, 10, "<I", 53),
                         f"BMP pixel data offset 53 is outside 54..{len(BMP)} (header end..data end)"),
    "offset-past-end": (_put(BMP, 10, "<I", len(BMP) + 1),
                        f"BMP pixel data offset {len(BMP) + 1} is outside 54..{len(BMP)} (header end..data end)"),
    "bitfields-rows-cut": (_put(BMP, 30, "<I", 3)[:-1], "BMP pixel rows need 5920 bytes but only 5919 remain"),
    "os2-rows-cut": (b"BM" + struct.pack("<IHHIIHHHH", 0, 0, 0, 26, 12, 53, 37, 1, 24) + BMP[54:-1],
                     "BMP pixel rows need 5920 bytes but only 5919 remain"),
}


@pytest.mark.parametrize("case", sorted(BMP_CASES))
def test_bmp_refusals(case):
    data, message = BMP_CASES[case]
    _refused(data, message)


def test_bmp_headers_that_are_accepted():
    rle8 = _put(BMP, 28, "<HI", 8, 1)  # RLE8: compressed rows, no size to compare
    assert image_header(rle8[:60]) == codec.ImageHeader("bmp", 53, 37)
    assert image_header(_put(rle8[:60], 10, "<I", 60)).width == 53  # pixel data may start at the very end
    wide_os2 = b"BM" + struct.pack("<IHHIIHHHH", 0, 0, 0, 26, 12, 40_000, 1, 1, 24) + b"\0" * 120_000
    assert image_header(wide_os2) == codec.ImageHeader("bmp", 40_000, 1)  # OS/2 sizes are unsigned
    even = RGB[:, :52].copy()  # 52 x 24 bits: rows need no padding
    assert np.array_equal(decode_image(_encode(even, ".bmp")), even)


WEBP_LOSSLESS = _encode(RGB, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))
WEBP_LOSSY = _encode(RGB, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 90))
N_LOSSLESS, N_LOSSY = len(WEBP_LOSSLESS), len(WEBP_LOSSY)


def _riff(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _webp_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)


VP8X = _webp_chunk(b"VP8X", b"\x10\0\0\0" + (52).to_bytes(3, "little") + (36).to_bytes(3, "little"))
WEBP_CASES = {
    "riff-overlong": (_put(WEBP_LOSSLESS, 4, "<I", N_LOSSLESS - 7),
                      f"WebP RIFF container declares {N_LOSSLESS - 7} bytes but only {N_LOSSLESS - 8} remain"),
    "cut": (WEBP_LOSSY[:-1], f"WebP RIFF container declares {N_LOSSY - 8} bytes but only {N_LOSSY - 9} remain"),
    "chunk-overlong": (_put(WEBP_LOSSLESS, 16, "<I", N_LOSSLESS - 19),
                       f"WebP chunk VP8L declares {N_LOSSLESS - 19} bytes but only {N_LOSSLESS - 20} remain"),
    "header-cut": (WEBP_LOSSY[:19], "WebP header is truncated (19 of 20 bytes)"),
    "no-chunk": (_riff() + b"\0" * 8, "WebP RIFF container of 4 bytes holds no chunk"),
    "unknown-chunk": (_riff(_webp_chunk(b"ABCD", b"")), "WebP has an unknown first chunk b'ABCD'"),
    "vp8-short": (_riff(_webp_chunk(b"VP8 ", WEBP_LOSSY[20:29])),
                  "WebP VP8 chunk is 9 bytes; its frame header needs 10"),
    "vp8-inter-frame": (_put(WEBP_LOSSY, 20, "B", WEBP_LOSSY[20] | 1),
                        "WebP VP8 data is not a key frame (no 9d 01 2a start code)"),
    "vp8-no-start-code": (_put(WEBP_LOSSY, 25, "B", 0x2B), "WebP VP8 data is not a key frame (no 9d 01 2a start code)"),
    "vp8l-short": (_riff(_webp_chunk(b"VP8L", WEBP_LOSSLESS[20:24])), "WebP VP8L chunk is 4 bytes; its header needs 5"),
    "vp8l-signature": (_put(WEBP_LOSSLESS, 20, "B", 0x2E), "WebP VP8L header is corrupt (signature 0x2e, version 0)"),
    "vp8l-version": (_put(WEBP_LOSSLESS, 24, "B", WEBP_LOSSLESS[24] | 0x20),
                     "WebP VP8L header is corrupt (signature 0x2f, version 1)"),
    "riff-2^32": (_put(WEBP_LOSSY, 4, "<I", 0xFFFFFFF0),
                  f"WebP RIFF container declares 4294967280 bytes but only {N_LOSSY - 8} remain"),
    "chunk-2^32": (_put(WEBP_LOSSY, 16, "<I", 0xFFFFFFF0),
                   f"WebP chunk VP8  declares 4294967280 bytes but only {N_LOSSY - 20} remain"),
    "vp8l-version-4": (_put(WEBP_LOSSLESS, 24, "B", WEBP_LOSSLESS[24] | 0x80),
                       "WebP VP8L header is corrupt (signature 0x2f, version 4)"),
    "vp8x-short": (_riff(_webp_chunk(b"VP8X", b"\0" * 9), WEBP_LOSSY[12:]), "WebP VP8X chunk is 9 bytes; it needs 10"),
    "vp8x-without-image": (_riff(VP8X, _webp_chunk(b"ALPH", b"\0" * 3)),
                           "WebP extended file has no image data (no VP8, VP8L or ANMF chunk)"),
}


@pytest.mark.parametrize("case", sorted(WEBP_CASES))
def test_webp_refusals(case):
    data, message = WEBP_CASES[case]
    _refused(data, message)


def test_webp_headers_that_are_accepted():
    assert image_header(WEBP_LOSSY) == codec.ImageHeader("webp", 53, 37)
    scaled = _put(WEBP_LOSSY, 26, "<HH", 53 | 0xC000, 37 | 0x4000)  # the top two bits ask for upscaling
    assert image_header(scaled) == codec.ImageHeader("webp", 53, 37)
    assert image_header(WEBP_LOSSLESS) == codec.ImageHeader("webp", 53, 37)
    extended = _riff(VP8X, _webp_chunk(b"ICCP", b"\0" * 5), WEBP_LOSSY[12:])  # odd-sized chunk: padded
    assert image_header(extended) == codec.ImageHeader("webp", 53, 37)
    assert np.array_equal(decode_image(extended), decode_image(WEBP_LOSSY))
    assert image_header(WEBP_LOSSLESS + b"trailing bytes") == codec.ImageHeader("webp", 53, 37)
    assert image_header(_riff(_webp_chunk(b"VP8 ", WEBP_LOSSY[20:30]))).width == 53  # the shortest VP8 header
    assert image_header(_riff(_webp_chunk(b"VP8L", WEBP_LOSSLESS[20:25]))).width == 53  # the shortest VP8L header
    animated = _riff(_put(VP8X, 8, "B", 0x02), _webp_chunk(b"ANIM", b"\0" * 6), _webp_chunk(b"ANMF", b"\0" * 16))
    assert image_header(animated) == codec.ImageHeader("webp", 53, 37)


@pytest.mark.parametrize(
    "data, words",
    [(b"", "^image bytes are empty$"),
     (b"GIF89a" + b"\0" * 20, "^unsupported or undecodable image data \\(starts with 4749"),
     (b"II*\x00", "^TIFF header is truncated \\(4 of 8 bytes\\)$"), (b"RIFF\0\0\0\0WEBP", "^WebP header is truncated")],
)
def test_bad_bytes_are_invalid_images(data, words):
    with pytest.raises(InvalidImage, match=words):
        decode_image(data)


def test_unknown_formats_are_named_and_parser_slips_are_invalid_images(monkeypatch):
    for data in (b"RIFF\0\0\0\0WAVEfmt ", b"RIFX\0\0\0\0WEBPVP8 "):  # RIFF but not WebP; WebP but not RIFF
        _refused(data, f"unsupported or undecodable image data (starts with {data[:8].hex()}); "
                       "send PNG, JPEG, TIFF, BMP or WebP bytes, or a raw tensor")

    def slip(data: bytes):
        raise struct.error("unpack_from requires a buffer of at least 4 bytes")

    monkeypatch.setattr(containers, "_png_header", slip)  # a check some parser forgot still ends as InvalidImage
    _refused(TINY_PNG, "image header is truncated or corrupt")


def test_decoder_failures_become_invalid_images(monkeypatch):
    png = _encode(RGB, ".bmp")  # OpenCV decodes it (PNG is Pillow's: test_png_decoder.py)
    assert np.array_equal(decode_image(bytearray(png)), RGB)  # any bytes-like input
    assert np.array_equal(decode_image(memoryview(png)), RGB)

    def fake(result):
        def imdecode(buf, flags):
            if isinstance(result, Exception):
                raise result
            return result
        return imdecode

    cases = [(cv2.error("boom"), "BMP data could not be decoded (corrupt or truncated)"),
             (None, "BMP data could not be decoded (corrupt or truncated)"),
             (np.zeros((0, 53, 3), np.uint8), "BMP data could not be decoded (corrupt or truncated)"),
             (np.zeros((37, 52, 3), np.uint8), "BMP header says 53x37 but it decodes to 52x37"),
             (np.zeros((36, 53, 3), np.uint8), "BMP header says 53x37 but it decodes to 53x36"),
             (np.zeros((37, 53, 2), np.uint8), "BMP has 2 channels; expected 1, 3 or 4"),
             (np.zeros((37, 53), np.float32), "BMP pixel type float32 is not supported; send 8- or 16-bit images")]
    for result, message in cases:
        monkeypatch.setattr(codec.cv2, "imdecode", fake(result))
        _refused(png, message)
    monkeypatch.setattr(codec.cv2, "imdecode", fake(np.full((37, 53, 1), 7, np.uint8)))
    assert decode_image(png).shape == (37, 53)
    monkeypatch.setattr(codec.cv2, "imdecode", fake(np.full((37, 53, 3), 0x1234, np.uint16)))
    assert decode_image(png).dtype == np.uint8 and (decode_image(png) == 0x12).all()


def test_raw_images():
    assert np.array_equal(raw_image(RGB.tobytes(), RGB.shape), RGB)
    assert np.array_equal(raw_image(GREY.tobytes(), (37, 53)), GREY)
    assert np.array_equal(raw_image(GREY.tobytes(), (37, 53, 1)), GREY)
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 200, np.uint8)])
    got = raw_image(rgba.tobytes(), (37, 53, 4))
    assert np.array_equal(got, RGB) and got.flags.writeable  # alpha dropped, the colours kept in order
    with pytest.raises(InvalidImage, match=re.escape("raw image data has 10 bytes but shape [37, 53, 3] needs 5883")):
        raw_image(b"\0" * 10, RGB.shape)
    with pytest.raises(InvalidImage, match=re.escape("raw image must have 1, 3 or 4 channels, got 2")):
        raw_image(b"\0" * 8, (2, 2, 2))
    with pytest.raises(InvalidImage, match=re.escape("raw image shape must be [height, width] or [height, width, "
                                                     "channels], got [2]")):
        raw_image(b"\0\0", (2,))
    with pytest.raises(InvalidImage, match=re.escape("image is empty (4x0 pixels)")):
        raw_image(b"", (0, 4))
    with pytest.raises(InvalidImage, match=re.escape("image is empty (0x4 pixels)")):
        raw_image(b"", (4, 0))
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
    with pytest.raises(InvalidArgument, match="HxW or HxWx3"):
        encode_png(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(InvalidArgument, match="uint8 or uint16"):
        encode_png(np.zeros((2, 2), np.float32))


def test_png_rows_are_up_filtered_and_round_trip():
    """``PNG_ENCODING``: every row Up-filtered, so libpng does not try five filters per row (1.5-3.3x
    faster, about the same size: bench_png.py); uint8 and uint16 maps and RGB come back exactly."""
    rng = np.random.default_rng(0)
    labels = cv2.resize(rng.integers(0, 11, (24, 32)).astype(np.uint8), (48, 36), interpolation=cv2.INTER_NEAREST)
    rgb = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
    for array, row_bytes in ((labels, 48), (labels.astype(np.uint16) * 300, 96), (rgb, 144)):
        png = encode_png(array)
        back = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(back if array.ndim == 2 else cv2.cvtColor(back, cv2.COLOR_BGR2RGB), array)
        idat, pos = b"", 8
        while pos < len(png):
            (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
            idat += png[pos + 8:pos + 8 + length] if kind == b"IDAT" else b""
            pos += 12 + length
        raw = zlib.decompress(idat)
        assert len(raw) == 36 * (1 + row_bytes)
        assert {raw[row * (1 + row_bytes)] for row in range(36)} == {2}  # filter type 2: Up


def test_a_tiff_naming_its_size_twice_is_refused_before_the_decoder_allocates_the_first(monkeypatch):
    """The probe's bomb: ImageWidth/ImageLength of 20000 first, then 16. libtiff took the first (OpenCV decoded
    20000x20000, +2.3 GiB and 6 s, before the size check refused it); the walk took the last and let it through."""
    strip = zlib.compress(bytes(20_000 * 256), 9)
    data = _tiff(np.frombuffer(strip, np.uint8)[None, :], replace={
        256: (4, [20_000]), 257: (4, [20_000]), 259: (3, [8]), 273: (4, [8] * 79), 278: (4, [256]),
        279: (4, [len(strip)] * 79)})
    for tag in (284, 262):  # PlanarConfiguration and PhotometricInterpretation entries become a second 16x16
        data = _put(data, _tiff_entry(data, tag), "<HHII", 256 if tag == 284 else 257, 4, 1, 16)
    _assert_cheap(_refusal_work(monkeypatch, data, "TIFF directory has a second ImageLength entry"))


def _progressive_jpeg_with_repeated_scans(extra: int) -> bytes:
    """A progressive 64x64 grey JPEG whose last scan is repeated ``extra`` more times. libjpeg only warns
    (an inconsistent progression) and runs every scan: each a pass over the whole image. The probe's 130 kB
    16-megapixel file of 2,000 scans took 2 s of CPU to decode, 20x the plain file; a 64-megapixel one, 4x that."""
    ok, buf = cv2.imencode(".jpg", np.zeros((64, 64), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = buf.tobytes()
    scan = data[data.rindex(b"\xff\xda") : data.rindex(b"\xff\xd9")]
    return data[:-2] + scan * extra + data[-2:]


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(monkeypatch):
    within = _progressive_jpeg_with_repeated_scans(400)
    assert decode_image(within).shape == (64, 64)
    bomb = _progressive_jpeg_with_repeated_scans(containers.MAX_JPEG_SCANS)
    scans = bomb.count(b"\xff\xda")
    assert scans > containers.MAX_JPEG_SCANS >= within.count(b"\xff\xda")
    _assert_cheap(_refusal_work(monkeypatch, bomb, f"JPEG has {scans} scans, over the limit of "
                                                   f"{containers.MAX_JPEG_SCANS}"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_is_decoded_turned_as_its_orientation_tag_says_and_its_header_says_so(orientation):
    """OpenCV turns a TIFF as its Orientation tag says (as Pillow's ``exif_transpose``), so 5-8 swap width and
    height: such a scan was refused as 'TIFF header says 53x37 but it decodes to 37x53'."""
    from PIL import Image, ImageOps

    data = _tiff(RGB, replace={274: (3, [orientation])})
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert image_header(data) == codec.ImageHeader("tiff", expected.shape[1], expected.shape[0], orientation)
    assert np.array_equal(decode_image(data), expected)


def _with_second_directory(data: bytes, subfile_type: int | None) -> bytes:
    """A little-endian ``_tiff`` with a second directory chained after its first (a copy of it, the same strip),
    marked with ``NewSubfileType`` ``subfile_type`` (None: no such tag, a plain second page)."""
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    entries = data[ifd + 2 : ifd + 2 + 12 * count]
    extra = b"" if subfile_type is None else struct.pack("<HHII", 254, 4, 1, subfile_type)
    second = struct.pack("<H", count + bool(extra)) + extra + entries + struct.pack("<I", 0)
    return _put(data, ifd + 2 + 12 * count, "<I", len(data)) + second


@pytest.mark.parametrize("subfile_type", [None, 2])
def test_a_tiff_of_more_than_one_page_is_refused_not_cut_to_its_first(subfile_type):
    """A stack (an EM volume, a multi-page scan) was decoded as its first page and the rest dropped in silence:
    one label map came back for thirty slices."""
    data = _with_second_directory(_tiff(RGB), subfile_type)
    with pytest.raises(InvalidImage, match=r"TIFF holds more than one page .*each page or frame as an image"):
        decode_image(data)


@pytest.mark.parametrize("subfile_type", [1, 4, 5])
def test_a_tiff_with_a_thumbnail_or_mask_directory_is_one_image(subfile_type):
    """A reduced-resolution copy (1) or a transparency mask (4) after the image is not a second page."""
    assert np.array_equal(decode_image(_with_second_directory(_tiff(RGB), subfile_type)), decode_image(_tiff(RGB)))


@pytest.mark.parametrize("fmt, match", [("PNG", r"PNG is animated \(APNG, 2 frames\)"),
                                        ("WEBP", r"WebP is animated")])
def test_an_animation_is_refused_not_cut_to_its_first_frame(fmt, match):
    from PIL import Image

    first, second = Image.fromarray(RGB), Image.fromarray(255 - RGB)
    animated, still = io.BytesIO(), io.BytesIO()
    first.save(animated, format=fmt, save_all=True, append_images=[second], lossless=True)
    first.save(still, format=fmt, lossless=True)
    with pytest.raises(InvalidImage, match=match):
        decode_image(animated.getvalue())
    assert decode_image(still.getvalue()).shape == RGB.shape


def test_a_four_band_tiff_decodes_without_opencv_s_warning_on_stderr(tmp_path) -> None:
    """A 4-band TIFF (RGB + NIR, or colour + alpha) printed libtiff's "TIFF_Warning TIFFReadDirectory: Sum of
    Photometric type-related color channels ..." to stderr, once per file, in serving and batch jobs. In a fresh
    process, as the server and ``segsvc batch`` import the codec."""
    ok, tiff = cv2.imencode(".tif", np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8))
    assert ok
    (tmp_path / "four.tif").write_bytes(tiff.tobytes())
    script = ("import sys; from segsvc.inference.codec import decode_image; "
              "print(decode_image(open(sys.argv[1], 'rb').read()).shape)")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "four.tif")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "(16, 16, 3)", run.stderr
    assert run.stderr == ""
