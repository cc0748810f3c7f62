"""Reading and writing images and label masks.

Every reader takes the file's bytes first and decodes them with OpenCV
(``cv2.imdecode``), so that a missing file, an empty file, a truncated file and
an undecodable file each get their own message naming the path: ``cv2.imread``
returns ``None`` for all of them alike.

Masks come in three encodings, all returned as an ``H x W`` array of ids:
single-channel class-id PNGs (CamVid, ISBI), palette-index PNGs (Pascal VOC:
the pixel values *are* the ids, the palette only colours them) and RGB colour
PNGs, which are mapped back to ids through a palette.

Images and masks are returned upright, as image viewers show them: the EXIF
orientation of a JPEG (APP1 Exif), a PNG (eXIf) or a WebP (EXIF chunk) is
applied after decoding (``segsvc.data.orientation``), and
OpenCV's TIFF decoder applies a TIFF's Orientation tag itself. The server's
decoder (``segsvc.inference.codec.decode_image``) reads the orientation with
the same function, so a phone photo, its annotation and what serving sees line up.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from segsvc.data.orientation import apply_orientation, exif_orientation
from segsvc.errors import DatasetError, InvalidImage, NotFound


def quiet_decoders() -> None:
    """Keep OpenCV's and libtiff's warnings about a file off stderr: a 4-band TIFF printed ``[ WARN:0@0.646] global
    grfmt_tiff.cpp:123 TIFF_Warning TIFFReadDirectory: Sum of Photometric ...`` once per file, in serving, batch
    jobs and training alike. What matters about a file its reader refuses, or the README documents; OpenCV's
    errors still show."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


quiet_decoders()

RGB = tuple[int, int, int]
Palette = Sequence[RGB] | Mapping[RGB, int]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"
_PNG_PALETTE_COLOUR_TYPE = 3
_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

def read_bytes(path: str | Path) -> bytes:
    """Return the file's bytes, raising ``NotFound`` (missing) or ``InvalidImage`` (empty)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidImage(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise InvalidImage(f"{path}: file is empty")
    return data


def truncation_problem(data: bytes) -> str | None:
    """Say why PNG/JPEG bytes look cut short, or ``None`` if they look complete.

    OpenCV returns ``None`` for a truncated PNG (so the cause is lost) and
    silently returns a partly grey image for a truncated JPEG, so both are
    checked by their end markers before decoding.
    """
    if data.startswith(_PNG_SIGNATURE):
        if data.rfind(_PNG_TRAILER) == -1:
            return f"truncated PNG ({len(data)} bytes, no IEND chunk)"
    elif data.startswith(_JPEG_SOI):
        last_scan = data.rfind(_JPEG_SOS)
        if last_scan == -1 or data.find(_JPEG_EOI, last_scan) == -1:
            return f"truncated JPEG ({len(data)} bytes, no end-of-image marker)"
    return None


def _decode(path: Path, data: bytes, flags: int, error: type[Exception]) -> np.ndarray:
    problem = truncation_problem(data)
    if problem is not None:
        raise error(f"{path}: {problem}")
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:  # e.g. a header declaring more than OpenCV's pixel limit (CV_IO_MAX_IMAGE_PIXELS)
        reason = (exc.err or str(exc)).strip().splitlines()[-1]
        raise error(f"{path}: OpenCV cannot decode it (failed check: {reason})") from None
    if array is None or array.size == 0:
        raise error(f"{path}: not a decodable image ({len(data)} bytes, starts with {data[:8]!r})")
    # IMREAD_UNCHANGED keeps depth and alpha but skips EXIF (OpenCV turns TIFFs in their decoder): turned here.
    return apply_orientation(array, exif_orientation(data))


def _to_rgb_or_grey(array: np.ndarray) -> np.ndarray:
    """OpenCV order (BGR/BGRA) to RGB; alpha is dropped; grey stays ``H x W``."""
    if array.ndim == 3 and array.shape[2] == 1:
        return array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    if array.ndim == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return array


def _high_byte(path: Path, array: np.ndarray) -> np.ndarray:
    """uint8 samples; 16-bit ones keep their 8 most significant bits, as the server's decoder keeps them
    (``segsvc.inference.codec.decode_image``), so training and eval see the pixels the server sees."""
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise InvalidImage(f"{path}: pixel type {array.dtype} is not supported; use 8- or 16-bit images")
    return array


def read_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Read an image as uint8 RGB ``H x W x 3`` or grey ``H x W``.

    Args:
        path: any format OpenCV decodes (PNG, JPEG, BMP, TIFF...). 16-bit
            images keep their 8 most significant bits, and an EXIF orientation
            turns them upright, as the server decodes them.
        channels: ``None`` keeps the file's own layout (grey stays ``H x W``);
            ``3`` always returns RGB (grey repeated); ``1`` always returns grey
            ``H x W`` (RGB converted to luminance).

    Raises:
        NotFound: the file does not exist.
        InvalidImage: the file is empty, truncated or not an image.

    Example:
        >>> read_image("train/0001TP_006690.png").shape  # doctest: +SKIP
        (360, 480, 3)
    """
    if channels not in (None, 1, 3):
        raise InvalidImage(f"read_image: channels must be None, 1 or 3, got {channels!r}")
    path = Path(path)
    raw = _decode(path, read_bytes(path), cv2.IMREAD_UNCHANGED, InvalidImage)  # the flags the server decodes with
    image = _to_rgb_or_grey(_high_byte(path, raw))
    if channels == 3 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if channels == 1 and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image


def _is_palette_png(data: bytes) -> bool:
    # IHDR is always the first chunk: signature (8) + length (4) + type (4) +
    # width (4) + height (4) + bit depth (1), then the colour type byte.
    return data.startswith(_PNG_SIGNATURE) and len(data) > 25 and data[25] == _PNG_PALETTE_COLOUR_TYPE


def _png_grey_bits(data: bytes) -> int | None:
    """The bit depth of a greyscale PNG (colour type 0 or 4), from its IHDR; ``None`` for anything else."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) <= 25 or data[25] not in (0, 4):
        return None
    return data[24]


def _read_palette_indices(path: Path, data: bytes) -> np.ndarray:
    """Palette-index PNG -> its indices (OpenCV would expand them to colours), upright as ``_decode`` turns them."""
    from PIL import Image  # Pillow ships with torchvision; only VOC-style masks need it

    try:
        with Image.open(_io.BytesIO(data)) as im:
            if im.mode != "P":
                raise DatasetError(f"{path}: palette PNG decoded as mode {im.mode}, expected P")
            indices = np.array(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"{path}: palette mask is larger than Pillow's decoding limit ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow says "broken PNG file" with a SyntaxError
        raise DatasetError(f"{path}: cannot decode palette PNG ({exc})") from None
    return apply_orientation(indices, exif_orientation(data))


MASK_ENCODINGS = ("auto", "ids", "rgb")


def read_label_file(path: str | Path, encoding: str = "auto") -> np.ndarray:
    """Read a mask file's labels: ``H x W`` ids (uint8/uint16) or ``H x W x 3`` RGB colours.

    Palette-index PNGs return their indices. A mask whose file declares an EXIF
    orientation is turned upright like an image (``read_image``), so it lines up
    with the image as viewers show both. Readers that know the dataset's
    palette map RGB colours with ``colors_to_ids``.

    Args:
        encoding: ``"auto"`` treats a colour file whose three channels are equal
            as a grey id map saved as RGB; ``"rgb"`` keeps every colour file as
            colours (for palettes with grey colours, such as CamVid's Sky);
            ``"ids"`` insists on single-channel ids.

    Raises:
        NotFound: the file does not exist.
        DatasetError: the file is empty, truncated, not an image, or not in ``encoding``.
    """
    if encoding not in MASK_ENCODINGS:
        raise DatasetError(f"mask encoding must be one of {MASK_ENCODINGS}, got {encoding!r}")
    path = Path(path)
    try:
        data = read_bytes(path)
    except InvalidImage as exc:
        raise DatasetError(str(exc)) from None
    if encoding != "rgb" and _is_palette_png(data) and truncation_problem(data) is None:
        return _read_palette_indices(path, data)
    raw = _decode(path, data, cv2.IMREAD_UNCHANGED, DatasetError)
    if raw.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{path}: mask pixels must be 8- or 16-bit integers, got {raw.dtype}")
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[:, :, :3]
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    grey = raw.ndim == 2 or (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]))
    if encoding == "rgb":
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB if raw.ndim == 2 else cv2.COLOR_BGR2RGB)
    if raw.ndim == 3 and not grey:
        if encoding == "ids":
            raise DatasetError(f"{path}: mask is a colour image but the dataset's masks are single-channel ids")
        return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    raw = raw[:, :, 0].copy() if raw.ndim == 3 else raw
    bits = _png_grey_bits(data)
    if bits in (1, 2, 4):  # libpng scales 1/2/4-bit samples to 0..255 (1 -> 255): the ids are the stored samples
        raw = raw // (255 // ((1 << bits) - 1))
    return raw


def _color_keys(rgb: np.ndarray) -> np.ndarray:
    # 16 bits per channel, so 8- and 16-bit colours share one key space without collisions
    rgb = rgb.astype(np.int64, copy=False)
    return (rgb[..., 0] << 32) | (rgb[..., 1] << 16) | rgb[..., 2]


def colors_to_ids(rgb: np.ndarray, palette: Palette) -> tuple[np.ndarray, np.ndarray]:
    """Map an ``H x W x 3`` RGB mask to ids; also return which pixels had a palette colour.

    ``palette`` is a sequence of colours (colour ``i`` is id ``i``) or a mapping
    colour -> id (to add, say, a void colour mapped to the ignore index). Pixels
    of unknown colours get id 0; callers decide whether they are an error
    (``unique_colors(rgb[~known])`` names them).
    """
    table = dict(palette) if isinstance(palette, Mapping) else {tuple(c): i for i, c in enumerate(palette)}
    if not table:
        raise DatasetError("colors_to_ids: the palette is empty")
    keys = _color_keys(np.array([tuple(int(v) for v in c) for c in table], dtype=np.int64).reshape(-1, 3))
    ids = np.array(list(table.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, ids = keys[order], ids[order]
    pixel_keys = _color_keys(rgb)
    pos = np.clip(np.searchsorted(keys, pixel_keys), 0, len(keys) - 1)
    known = keys[pos] == pixel_keys
    dtype = np.uint8 if 0 <= ids.min() and ids.max() <= 255 else np.int32
    return np.where(known, ids[pos], 0).astype(dtype), known


def unique_colors(pixels: np.ndarray) -> list[RGB]:
    """The distinct RGB colours among ``pixels`` (any shape ending in 3), sorted."""
    keys = np.unique(_color_keys(pixels.reshape(-1, 3)))
    return [(int(k >> 32) & 0xFFFF, int(k >> 16) & 0xFFFF, int(k) & 0xFFFF) for k in keys]


def read_mask(path: str | Path, palette: Palette | None = None) -> np.ndarray:
    """Read a mask as ``H x W`` integer class ids.

    Args:
        path: a class-id PNG (8/16-bit), a palette-index PNG, or an RGB colour PNG.
        palette: needed for RGB colour masks: colour ``i`` of a sequence is id
            ``i``, or a mapping colour -> id.

    Raises:
        DatasetError: unreadable file, an RGB mask without a palette, or colours
            the palette does not contain (the message lists them).
    """
    path = Path(path)
    raw = read_label_file(path)
    if raw.ndim == 2:
        return raw
    if palette is None:
        raise DatasetError(f"{path}: mask is an RGB colour image but no palette was given to map colours to ids")
    ids, known = colors_to_ids(raw, palette)
    if not known.all():
        unknown = unique_colors(raw[~known])
        shown = ", ".join(str(c) for c in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise DatasetError(f"{path}: {len(unknown)} mask colour(s) not in the palette: {shown}")
    return ids


def write_png(path: str | Path, array: np.ndarray, palette: Sequence[RGB] | None = None) -> Path:
    """Write an RGB/grey image or an id mask as PNG, creating parent folders.

    Args:
        path: the target file (``.png`` is not enforced but PNG is what is written).
        array: uint8 ``H x W x 3`` RGB, or uint8/uint16 ``H x W``.
        palette: with an ``H x W`` uint8 array, write a palette-index PNG (the
            Pascal VOC mask encoding) using these colours.

    Raises:
        InvalidImage: unsupported shape or dtype, or the encoder failed.
    """
    path = Path(path)
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
        raise InvalidImage(f"write_png {path}: need uint8/uint16 HxW or HxWx3, got {array.dtype} {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:
        return _write_palette_png(path, array, palette)
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 and array.shape[2] == 3 else array
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise InvalidImage(f"write_png {path}: OpenCV could not encode a {array.dtype} {array.shape} array")
    path.write_bytes(buf.tobytes())
    return path


def _write_palette_png(path: Path, array: np.ndarray, palette: Sequence[RGB]) -> Path:
    from PIL import Image

    if array.ndim != 2 or array.dtype != np.uint8:
        raise InvalidImage(f"write_png {path}: a palette PNG needs a uint8 HxW array, got {array.dtype} {array.shape}")
    if len(palette) > 256:
        raise InvalidImage(f"write_png {path}: a PNG palette holds at most 256 colours, got {len(palette)}")
    flat = [int(v) for colour in palette for v in colour]
    h, w = array.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(array).tobytes())
    im.putpalette(flat + [0] * (768 - len(flat)))
    im.save(path, format="PNG")
    return path
