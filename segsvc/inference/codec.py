"""Image bytes <-> uint8 arrays, with the container checked before any decoder allocates.

Decoders trust the sizes a file declares. A 50 kB PNG can declare 100 000 x
100 000 pixels (a decompression bomb), and a 261-byte PNG whose IDAT chunk
declares 4 GiB makes OpenCV allocate 4 GiB before it notices the bytes are not
there. So ``decode_image`` walks the container first, in a few milliseconds
and without copying it: every PNG chunk, the JPEG segments up to the first
scan and the number of scans, the TIFF directory with its strip and tile offsets, the BMP and WebP
headers. A declared size the bytes cannot hold is refused, then an image over
``max_pixels``. Only then does a decoder run: Pillow for PNG, OpenCV for the
rest. Only the formats the service documents are accepted (PNG, JPEG, TIFF,
BMP, WebP); anything else is refused by name. Arrays are RGB (or single-channel
grey) ``H x W [x C]`` uint8, like everywhere else in segsvc.

Images come out upright, as viewers show them, so a label map lines up with the
photo its user sees: OpenCV's TIFF decoder applies a TIFF's Orientation tag, and
the EXIF orientation of a JPEG, PNG or WebP (which ``IMREAD_UNCHANGED`` and Pillow
leave as stored) is applied here after decoding, with the function training's
reader uses (``segsvc.data.orientation``). The header check reports the upright size.

PNG goes to Pillow because its decoder stops inflating at the last row the
header declares. libpng (OpenCV's) inflates the rest of the stream to its end,
discarding it: a zlib bomb of 4 MiB behind a 24x24 image costs it about 8 s.
Guarding libpng meant inflating every PNG once more beforehand, 40% of the time
to decode a photo. Pillow gives the same arrays as OpenCV did for every colour
type, bit depth, palette and interlacing (``tests/inference/test_png_decoder.py``);
it does not check the IDAT chunks' CRCs, which libpng did, so they are checked here.
One reading differs: a zlib stream that ends before the rows its header declares
decodes them as zeros (Pillow's reading, and browsers'), where libpng refused it.

Pillow's lazy ``Image.open`` is not used for these checks: it reads PNG chunks
only up to the first IDAT and never compares BMP offsets with the data, so it
opens exactly the files above without complaint.

Example:
    >>> import numpy as np
    >>> png = encode_png(np.zeros((4, 6, 3), np.uint8))
    >>> image_header(png)
    ImageHeader(format='png', width=6, height=4, orientation=1)
    >>> decode_image(png, max_pixels=100).shape
    (4, 6, 3)
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from segsvc.data.io import quiet_decoders
from segsvc.data.orientation import apply_orientation
from segsvc.errors import ImageTooLarge, InvalidArgument, InvalidImage
from segsvc.inference.containers import (  # noqa: F401  (limits re-exported for callers of codec)
    MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, MAX_PNG_CHUNKS, MAX_TIFF_ENTRIES, MAX_TIFF_TILE_PIXELS, MAX_WEBP_CHUNKS,
    ImageHeader, check_png_crc, image_header, inspect,
)
from segsvc.palette import colorize, overlay  # noqa: F401  (numpy-only; re-exported for callers of codec)

quiet_decoders()  # this module decodes what clients send

DEFAULT_MAX_PIXELS = 64_000_000
# zlib level 1, every row filtered "Up" (minus the row above) instead of libpng's adaptive choice,
# which tries all five filters on every row. On CamVid-sized label maps, colour maps, overlays,
# confidence maps and photos: 1.5-3.3x faster, the files 7% smaller to 2% larger (bench/bench_png.py).
PNG_ENCODING = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


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

    The container is checked (``image_header``), then the size against
    ``max_pixels``, before Pillow (PNG) or OpenCV (the rest) decodes. 16-bit
    images keep their 8 most significant bits; alpha is dropped. The image is
    turned upright as its EXIF orientation (TIFF: Orientation tag) says.

    Raises:
        InvalidImage: not a supported format, a malformed container, or the
            bytes do not decode.
        ImageTooLarge: the header declares more than ``max_pixels`` pixels.
    """
    data = bytes(data)  # a private immutable copy: a caller's bytearray cannot change after the checks
    header, png_pixels = inspect(data)
    check_pixels(header.height, header.width, max_pixels)
    if png_pixels is not None:
        check_png_crc(data, png_pixels)
        return apply_orientation(_decode_png(data), header.orientation)
    name = header.format.upper()
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise InvalidImage(f"{name} data could not be decoded (corrupt or truncated)")
    if header.format != "tiff":  # OpenCV's TIFF decoder has turned it already
        image = apply_orientation(image, header.orientation)
    if image.shape[0] != header.height or image.shape[1] != header.width:
        raise InvalidImage(
            f"{name} header says {header.width}x{header.height} but it decodes to {image.shape[1]}x{image.shape[0]}"
        )
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InvalidImage(f"{name} pixel type {image.dtype} is not supported; send 8- or 16-bit images")
    if image.ndim == 3:
        c = image.shape[2]
        if c == 1:
            image = image[:, :, 0]
        elif c == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif c == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
        else:
            raise InvalidImage(f"{name} has {c} channels; expected 1, 3 or 4")
    return image


def _decode_png(data: bytes) -> np.ndarray:
    """A checked PNG's pixels as OpenCV gave them: grey ``HxW`` or RGB, the top byte of 16-bit samples.

    ``PngImageFile`` is built directly: ``Image.open`` would also apply Pillow's
    own pixel limit, which the server's ``max_pixels`` (checked already) replaces.
    """
    with io.BytesIO(data) as stream:
        try:
            img = PngImagePlugin.PngImageFile(stream)
            img.load()
        except Exception:  # whatever Pillow raises on bytes the walk let through, they do not decode
            raise InvalidImage("PNG data could not be decoded (corrupt or truncated)") from None
        return _pillow_pixels(img)


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    """A writable uint8 array of a decoded PNG in segsvc's layout (alpha dropped, palettes expanded)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return np.array(img)
    if mode == "RGBA":
        return np.asarray(img)[:, :, :3].copy()
    if mode.startswith("I"):  # 16-bit grey ("I;16"; "I" in older Pillows)
        return (np.asarray(img) >> 8).astype(np.uint8)
    if mode == "1":  # 1-bit grey: 0 and 255, as libpng expands it
        return np.array(img.convert("L"))
    if mode in ("P", "PA") and "transparency" in img.info:  # converted through RGBA, as Pillow asks
        return np.asarray(img.convert("RGBA"))[:, :, :3].copy()
    if mode in ("P", "PA", "LA"):
        return np.array(img.convert("RGB"))
    raise InvalidImage(f"PNG decodes to Pillow mode {mode}, which segsvc does not read")


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
    expected = math.prod(shape)  # Python ints: no int64 overflow
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
    ok, buf = cv2.imencode(".png", image, PNG_ENCODING)
    if not ok:
        raise InvalidArgument(f"could not PNG-encode an array of shape {image.shape}")
    return buf.tobytes()
