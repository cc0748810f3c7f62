"""Builders of tiny datasets for the data tests (the fixtures in conftest.py wrap them)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segsvc.data.io import write_png
from segsvc.data.registration import shift_image
from segsvc.data.spec import DatasetSpec, load_dataset_spec, with_root

FOLDER_YAML = """\
name: tiny
format: folder
root: .
classes: [background, a, b]
ignore_index: 255
splits:
  all: {images: images, masks: masks}
"""

VOC_STEMS = {"train": ("2007_000032", "2007_000039"), "val": ("2007_000063",)}


def random_image(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_labels(rng: np.random.Generator, h: int = 24, w: int = 32, classes: int = 3) -> np.ndarray:
    return rng.integers(0, classes, (h, w), dtype=np.uint8)


def make_folder_dataset(root: Path, stems: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> Path:
    """A clean generic-layout dataset (3 classes, RGB PNG images, class-id masks) with its dataset.yaml."""
    rng = np.random.default_rng(seed)
    for stem in stems:
        write_png(root / "images" / f"{stem}.png", random_image(rng))
        write_png(root / "masks" / f"{stem}.png", random_labels(rng))
    (root / "dataset.yaml").write_text(FOLDER_YAML)
    return root


def make_voc_dataset(root: Path) -> DatasetSpec:
    """A VOC2012-layout folder: JPEGImages, palette-index SegmentationClass PNGs, ImageSets lists.

    Masks hold classes 0, 15 (person) and 255 (the boundary/ignore value), and
    JPEGImages holds one detection-only image without a mask, as the real one does.
    """
    spec = with_root(load_dataset_spec("voc"), root)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    # VOC's 256-colour palette: the class colours, then black, with the boundary colour at 255
    palette = [*spec.palette, *[(0, 0, 0)] * (255 - spec.num_classes), (224, 224, 192)]
    rng = np.random.default_rng(7)
    for split, stems in VOC_STEMS.items():
        (lists / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
        for stem in stems:
            labels = np.zeros((20, 30), np.uint8)
            labels[5:15, 5:20] = 15
            labels[4, 5:20] = 255
            cv2.imwrite(str(root / "JPEGImages" / f"{stem}.jpg"), random_image(rng, 20, 30))
            write_png(root / "SegmentationClass" / f"{stem}.png", labels, palette=palette)
    (lists / "trainval.txt").write_text("".join(f"{s}\n" for stems in VOC_STEMS.values() for s in stems))
    cv2.imwrite(str(root / "JPEGImages" / "2008_000001.jpg"), random_image(rng, 20, 30))
    return spec


def membranes(seed: int = 0, size: int = 128) -> np.ndarray:
    """A mask of thin random lines in every direction, like cell membranes (1 = membrane)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(size // 9):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(mask, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 1, thickness=int(rng.integers(2, 5)))
    return mask


def image_of(mask: np.ndarray, offset: tuple[float, float], dark: bool = True, seed: int = 1) -> np.ndarray:
    """A noisy grey image whose structures sit ``offset`` px from ``mask`` (the image is what moved)."""
    moved = shift_image(cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8), offset)
    grey = 200 - 150 * moved if dark else 50 + 150 * moved
    noise = np.random.default_rng(seed).normal(0, 8, mask.shape)
    return np.clip(grey + noise, 0, 255).astype(np.uint8)
