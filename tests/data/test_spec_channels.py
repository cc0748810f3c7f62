"""A folder described without a dataset.yaml takes its channels from its images' headers.

A QA report: grey membrane slices (images/ + masks/) uploaded with ``--classes`` became a dataset with
``channels: 3`` (the spec's default), so the grey membrane model could not be fine-tuned on it, and a recipe
built a 3-channel model with ImageNet statistics for single-channel slices.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from segsvc.config import InputSpec
from segsvc.data.check import check_dataset
from segsvc.data.spec import load_dataset_spec, spec_from_folder
from segsvc.errors import DatasetError
from tests.data.test_check import run_check


def _image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _grey_folder(root: Path, stems: tuple[str, ...] = ("0", "1", "2"), images: str = "images",
                 masks: str = "masks") -> Path:
    """Grey 8-bit slices with 0/255 masks, as the membrane data is."""
    rng = np.random.default_rng(0)
    for stem in stems:
        _image(root / images / f"{stem}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
        _image(root / masks / f"{stem}.png", (rng.integers(0, 2, (16, 16)) * 255).astype(np.uint8))
    return root


def test_image_channels_reads_grey_and_colour_from_the_header(tmp_path: Path) -> None:
    from segsvc.data.channels import COLOUR, GREY, image_channels  # here: the other tests run without it

    grey, rgb = np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)
    cases = {
        "grey.png": (grey, None, GREY), "grey16.png": (np.zeros((8, 8), np.uint16), None, GREY),
        "grey_alpha.png": (np.zeros((8, 8, 2), np.uint8), "LA", GREY), "grey.tif": (grey, None, GREY),
        "grey.jpg": (grey, None, GREY), "grey.bmp": (grey, None, GREY),
        "rgb.png": (rgb, None, COLOUR), "rgba.png": (np.zeros((8, 8, 4), np.uint8), None, COLOUR),
        "rgb.jpg": (rgb, None, COLOUR), "rgb.webp": (rgb, None, COLOUR),
    }
    for name, (array, mode, expected) in cases.items():
        assert image_channels(_image(tmp_path / name, array, mode)) == expected, name
    palette = Image.fromarray(grey).convert("P")
    palette.save(tmp_path / "palette.png")
    assert image_channels(tmp_path / "palette.png") == COLOUR  # OpenCV decodes a palette PNG to BGR
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert image_channels(tmp_path / "empty.png") is None and image_channels(tmp_path / "junk.png") is None


def test_a_grey_folder_is_a_grey_dataset(tmp_path: Path) -> None:
    spec = load_dataset_spec(_grey_folder(tmp_path / "em"), num_classes=2)
    assert spec.channels == 1 and spec.input_spec() == InputSpec.default_for(1)
    assert spec.to_dict()["channels"] == 1
    # split subfolders, 16-bit slices, an undecodable file beside them (the check reports it)
    split = _grey_folder(tmp_path / "split", images="images/train", masks="masks/train")
    _grey_folder(split, ("9",), images="images/val", masks="masks/val")
    cv2.imwrite(str(split / "images" / "val" / "9.png"), np.zeros((16, 16), np.uint16))
    (split / "images" / "train" / "broken.png").write_bytes(b"\x89PNG\r\n")
    assert spec_from_folder(split).channels == 1


def test_a_colour_folder_stays_rgb(tmp_path: Path) -> None:
    rgb = tmp_path / "rgb"
    for stem, channels in (("a", 3), ("b", 4)):
        _image(rgb / "images" / f"{stem}.png", np.zeros((8, 8, channels), np.uint8))
        _image(rgb / "masks" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    assert spec_from_folder(rgb).channels == 3
    unreadable = _grey_folder(tmp_path / "unreadable", ())
    (unreadable / "images").mkdir(parents=True, exist_ok=True)
    (unreadable / "masks").mkdir(parents=True, exist_ok=True)
    (unreadable / "images" / "a.png").write_bytes(b"")
    assert spec_from_folder(unreadable).channels == 3  # nothing to go by: the default


def test_a_folder_mixing_grey_and_colour_is_refused_naming_one_of_each(tmp_path: Path) -> None:
    folder = _grey_folder(tmp_path / "mixed")
    _image(folder / "images" / "1.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DatasetError) as info:
        spec_from_folder(folder)
    message = str(info.value)
    assert "images/0.png is grey" in message and "images/1.png is colour" in message
    assert "channels: 1" in message
    # images of other splits count too; masks, hidden files and other suffixes do not
    split = _grey_folder(tmp_path / "split", images="images/train", masks="masks/train")
    _image(split / "images" / "val" / "9.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DatasetError, match="images/train/0.png is grey, images/val/9.png is colour"):
        spec_from_folder(split)
    clean = _grey_folder(tmp_path / "clean")
    _image(clean / "masks" / "0.png", np.zeros((16, 16, 3), np.uint8))  # an RGB mask is a mask
    _image(clean / "images" / ".0.png", np.zeros((16, 16, 3), np.uint8))
    _image(clean / "images" / "preview.gif", np.zeros((16, 16, 3), np.uint8))
    assert spec_from_folder(clean).channels == 1


def test_a_dataset_yaml_keeps_its_own_channels(tmp_path: Path) -> None:
    folder = _grey_folder(tmp_path / "described")
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"format": "folder", "root": ".", "channels": 3,
                                                         "classes": ["membrane", "cell"]}))
    assert spec_from_folder(folder).channels == 3
    _image(folder / "images" / "1.png", np.zeros((16, 16, 3), np.uint8))  # mixed: the YAML says what to read
    assert spec_from_folder(folder).channels == 3


def test_data_check_reports_the_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _grey_folder(tmp_path / "em")
    report = check_dataset(folder)
    assert report.ok, report.format()
    assert report.channels == 1 and "channels: 1 (grey)" in report.format().splitlines()
    code, out = run_check(folder, capsys)
    assert code == 0 and "channels: 1 (grey)" in out.splitlines()
    _image(folder / "images" / "1.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DatasetError, match="mix grey and colour"):
        check_dataset(folder)


def test_a_symlinked_image_is_not_opened_to_count_channels(tmp_path: Path) -> None:
    """Its header would be read wherever it leads, outside the dataset too, before the registry confines it."""
    root = _grey_folder(tmp_path / "em")
    outside = _image(tmp_path / "colour.png", np.zeros((16, 16, 3), np.uint8))
    (root / "images" / "3.png").symlink_to(outside)
    assert spec_from_folder(root).channels == 1  # a mix, grey beside colour, if the link were followed


def test_a_folder_of_links_to_grey_images_inside_the_dataset_is_grey(tmp_path: Path) -> None:
    """Links that stay inside the dataset are its images (the registry accepts them): skipping every link left
    such a folder with nothing to count, described as RGB again (a reviewer's find)."""
    root = _grey_folder(tmp_path / "em", images="store")
    (root / "images").mkdir()
    for stem in ("0", "1", "2"):
        (root / "images" / f"{stem}.png").symlink_to(root / "store" / f"{stem}.png")
    assert spec_from_folder(root).channels == 1
