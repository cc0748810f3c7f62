"""Training reads images and masks upright, as viewers show them and as the server decodes them.

A phone photo stored sideways with an EXIF Orientation tag is annotated as viewers show it; training must
see the photo that way (so image and mask line up) and see what serving sees. Pillow's
``ImageOps.exif_transpose`` is the reference.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from segsvc.data.check import check_dataset
from segsvc.data.datasets import FileDataset
from segsvc.data.io import read_image, read_label_file, read_mask
from segsvc.data.spec import load_dataset_spec
from segsvc.inference.codec import decode_image

STORED = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # 40 wide, 24 high, as stored
_Y, _X = np.mgrid[:24, :40]
SMOOTH = np.dstack([_X * 6, _Y * 10, np.full_like(_X, 200)]).astype(np.uint8)  # survives JPEG coding
FORMATS = {".jpg": ("JPEG", {"quality": 100}), ".png": ("PNG", {}), ".webp": ("WEBP", {"lossless": True}),
           ".tif": ("TIFF", {})}


def _save(path: Path, image: Image.Image, orientation: int | None) -> Path:
    name, options = FORMATS[path.suffix]
    if orientation is not None:
        exif = image.getexif()
        exif[274] = orientation
        options = {**options, "exif": exif}
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, name, **options)
    return path


def _upright(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", FORMATS)
def test_images_are_read_upright_and_as_the_server_decodes_them(tmp_path: Path, suffix: str, orientation: int) -> None:
    path = _save(tmp_path / f"photo{suffix}", Image.fromarray(SMOOTH if suffix == ".jpg" else STORED), orientation)
    image = read_image(path)
    expected = _upright(path)
    assert image.shape == expected.shape == (((40, 24) if orientation >= 5 else (24, 40)) + (3,))
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= (6 if suffix == ".jpg" else 0)
    assert np.array_equal(image, decode_image(path.read_bytes()))  # training sees what serving sees


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["ids", "ids16", "palette", "rgb"])
def test_masks_that_declare_an_orientation_are_read_upright(tmp_path: Path, kind: str, orientation: int) -> None:
    """Class-id PNGs (8- and 16-bit), palette-index PNGs (read through Pillow) and RGB colour PNGs alike."""
    ids = np.random.default_rng(2).integers(0, 3, (24, 40), dtype=np.uint8)
    palette = [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    scale = 1000 if kind == "ids16" else 1
    if kind == "palette":
        mask = Image.fromarray(ids, "P")
        mask.putpalette([v for colour in palette for v in colour])
    elif kind == "rgb":
        mask = Image.fromarray(np.array(palette, np.uint8)[ids])
    else:
        mask = Image.fromarray(ids.astype(np.uint16 if scale > 1 else np.uint8) * scale)
    path = _save(tmp_path / "mask.png", mask, orientation)
    expected = np.asarray(_turn(Image.fromarray(ids), orientation)).astype(np.uint16 if scale > 1 else np.uint8)
    assert expected.shape == ((40, 24) if orientation >= 5 else (24, 40))
    assert np.array_equal(read_mask(path, palette=palette), expected * scale)
    if kind == "rgb":
        assert np.array_equal(read_label_file(path), _upright(path))


def _turn(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned as viewers turn a file with this orientation (Pillow's own table)."""
    exif = image.getexif()
    exif[274] = orientation
    out = io.BytesIO()
    image.save(out, "PNG", exif=exif)
    return ImageOps.exif_transpose(Image.open(io.BytesIO(out.getvalue())))


YAML = "root: .\nclasses: [a, b]\nsplits:\n  train: {images: images, masks: masks}\n"


def test_a_sideways_phone_photo_and_its_annotation_line_up(tmp_path: Path) -> None:
    """The annotation is drawn on the photo as viewers show it: upright, 24 wide and 40 high. The photo is
    stored 40 wide, 24 high, with Orientation 6 (turn a quarter clockwise); its bright top rows are the
    upright photo's right-hand columns, which the annotation labels 1. Reading the photo as stored gave a
    size mismatch."""
    root = tmp_path / "ds"
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:6] = 255  # the top rows as stored
    _save(root / "images" / "a.jpg", Image.fromarray(stored), 6)
    annotation = np.zeros((40, 24), np.uint8)
    annotation[:, -6:] = 1  # the right-hand columns, upright
    _save(root / "masks" / "a.png", Image.fromarray(annotation), None)
    (root / "dataset.yaml").write_text(YAML)
    assert not check_dataset(root).problems
    image, labels = FileDataset(load_dataset_spec(root / "dataset.yaml"), "train").read(0)
    assert image.shape == (40, 24, 3) and labels.shape == (40, 24)
    assert np.array_equal(image.mean(axis=2) > 128, labels == 1)
