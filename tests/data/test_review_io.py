"""Mask and image files that used to escape as tracebacks (cv2.error, Pillow's SyntaxError) or be read wrongly."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from segsvc.data.check import check_dataset
from segsvc.data.io import read_image, read_label_file
from segsvc.errors import DatasetError, InvalidImage
from tests.data.helpers import make_folder_dataset


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, colour_type: int, body: list[bytes]) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(body) + _chunk(b"IEND", b"")


def test_png_over_opencvs_pixel_limit_is_a_domain_error_naming_the_file(tmp_path: Path) -> None:
    # 50000 x 50000 declared in a 70-byte file: OpenCV's own limit raised cv2.error (a traceback in `data check`)
    path = tmp_path / "huge.png"
    path.write_bytes(_png(50_000, 50_000, 0, [_chunk(b"IDAT", zlib.compress(b"\0" * 16))]))
    with pytest.raises(InvalidImage, match="huge.png: OpenCV cannot decode it"):
        read_image(path)
    with pytest.raises(DatasetError, match="huge.png: OpenCV cannot decode it"):
        read_label_file(path)


def test_broken_chunk_in_a_palette_mask_is_a_domain_error(tmp_path: Path) -> None:
    # Pillow raises SyntaxError("broken PNG file") for a bad chunk between two IDATs
    data = zlib.compress(b"".join(b"\0" + bytes(5) for _ in range(4)))
    body = [_chunk(b"PLTE", bytes(768)), _chunk(b"IDAT", data[:5]), _chunk(b"\x00\x01\x02\x03", b"x"),
            _chunk(b"IDAT", data[5:])]
    path = tmp_path / "mask.png"
    path.write_bytes(_png(5, 4, 3, body))
    with pytest.raises(DatasetError, match="mask.png: cannot decode palette PNG .*broken PNG file"):
        read_label_file(path)


def test_data_check_lists_such_masks_instead_of_crashing(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    (root / "masks" / "b.png").write_bytes(_png(50_000, 50_000, 0, [_chunk(b"IDAT", zlib.compress(b"\0" * 16))]))
    report = check_dataset(root)
    assert [(p.fault.value, p.path.name) for p in report.problems] == [("unreadable file", "b.png")]


def test_float_colour_mask_is_refused_in_every_encoding(tmp_path: Path) -> None:
    # a float TIFF's colours were returned as floats in the 'rgb' (and, when not grey, 'auto') encodings,
    # then truncated to integers when matched against the palette
    colours = np.zeros((3, 3, 3), np.float32)
    colours[0, 0] = (0.5, 128.7, 3.0)
    ok, buf = cv2.imencode(".tiff", colours)
    assert ok
    path = tmp_path / "mask.tiff"
    path.write_bytes(buf.tobytes())
    for encoding in ("auto", "rgb"):
        with pytest.raises(DatasetError, match="mask.tiff: mask pixels must be 8- or 16-bit integers, got float32"):
            read_label_file(path, encoding)


def test_a_one_bit_mask_saved_by_pillow_reads_as_0_and_1(tmp_path: Path) -> None:
    # Pillow saves a boolean mask as a 1-bit PNG; OpenCV scaled its 1s to 255, the ignore index of a
    # two-class dataset: every foreground pixel was silently left out of the loss and the metrics
    from PIL import Image

    mask = np.array([[0, 1, 1, 0]] * 3, bool)
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert read_label_file(tmp_path / "m.png").tolist() == mask.astype(np.uint8).tolist()


@pytest.mark.parametrize(("bits", "row", "ids"), [(2, bytes([0b00011011]), [0, 1, 2, 3]),
                                                  (4, bytes([0x1F, 0x80]), [1, 15, 8, 0])])
def test_low_bit_depth_grey_masks_read_their_stored_ids(tmp_path: Path, bits: int, row: bytes, ids: list[int]) -> None:
    # a 4-bit label PNG of class 1 read as 17: "values 17 outside the classes"
    path = tmp_path / "m.png"
    header = struct.pack(">IIBBBBB", 4, 1, bits, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" + row))
                     + _chunk(b"IEND", b""))
    assert read_label_file(path).tolist() == [ids]
    assert read_image(path).tolist() == [[v * (255 // ((1 << bits) - 1)) for v in ids]]  # images keep intensities
