"""Odd files a dataset may hold: EXIF-rotated JPEGs, palette bombs, non-UTF-8 lists and specs, 16-bit colours."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segsvc.data.check import check_dataset
from segsvc.data.io import read_image, read_label_file, read_mask
from segsvc.data.layouts import Fault
from segsvc.data.spec import load_dataset_spec
from segsvc.errors import DatasetError

YAML = "root: .\nclasses: [a, b]\n"


def _dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "dataset.yaml").write_text(YAML)
    return root


def test_exif_orientation_turns_the_image_upright_like_its_mask(tmp_path: Path) -> None:
    """An image is read as viewers show it (as the serving codec decodes it), so it lines up with the mask
    drawn on it (tests/data/test_exif_orientation_io.py covers every orientation)."""
    root = _dataset(tmp_path / "ds")
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:8, :] = 255  # bright top rows as stored: the right-hand columns once turned
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(pixels).save(root / "images" / "a.jpg", exif=exif.tobytes(), quality=100)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, -8:] = 1  # drawn on the upright image
    Image.fromarray(mask).save(root / "masks" / "a.png")
    image = read_image(root / "images" / "a.jpg")
    bright_columns = np.flatnonzero(image.mean(axis=(0, 2)) > 128)
    mask_columns = np.flatnonzero(read_label_file(root / "masks" / "a.png").any(axis=0))
    assert list(bright_columns) == list(mask_columns) == list(range(24, 32))
    # the colour behaviour of IMREAD_ANYCOLOR is kept: a grey image stays H x W
    Image.fromarray(mask * 200).save(root / "images" / "g.jpg", exif=exif.tobytes())
    assert read_image(root / "images" / "g.jpg").shape == (32, 32)


def test_palette_png_over_pillows_limit_is_listed(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / "a.png")
    Image.new("P", (20, 20)).save(root / "masks" / "a.png")
    data = bytearray((root / "masks" / "a.png").read_bytes())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR claims 400 Mpixel
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (root / "masks" / "a.png").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="a.png"):
        read_label_file(root / "masks" / "a.png")
    report = check_dataset(root)
    assert [(p.fault, p.path.name) for p in report.problems] == [(Fault.UNREADABLE, "a.png")]
    assert "larger than" in report.problems[0].detail


def test_split_list_not_utf8_is_a_dataset_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "masks" / "a.png")
    (root / "train.txt").write_bytes(b"a\n\xff\xfe\n")
    (root / "dataset.yaml").write_text(YAML + "splits: {train: {list: train.txt}}\n")
    with pytest.raises(DatasetError, match=r"train\.txt.*UTF-8"):
        check_dataset(root)


def test_dataset_yaml_not_utf8_is_a_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.yaml").write_bytes(b"root: .\nclasses: [\xe9]\n")
    with pytest.raises(DatasetError, match=r"dataset\.yaml.*UTF-8"):
        load_dataset_spec(root / "dataset.yaml")


def test_16bit_colours_do_not_collide_with_8bit_palette(tmp_path: Path) -> None:
    bgr = np.zeros((4, 4, 3), np.uint16)
    bgr[..., 0] = 256  # RGB (0, 0, 256): not palette colour (0, 1, 0)
    cv2.imwrite(str(tmp_path / "m16.png"), bgr)
    with pytest.raises(DatasetError, match=r"\(0, 0, 256\)"):
        read_mask(tmp_path / "m16.png", palette=[(0, 0, 0), (0, 1, 0)])
    bgr[..., 0] = 1  # 16-bit storage of an 8-bit colour still matches
    cv2.imwrite(str(tmp_path / "m16.png"), bgr)
    assert np.unique(read_mask(tmp_path / "m16.png", palette=[(0, 0, 0), (0, 0, 1)])).tolist() == [1]
