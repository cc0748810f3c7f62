"""Label mapping: 16-bit masks of a folder without a class list, and colour masks with a label_map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segsvc.data.check import check_dataset
from segsvc.data.io import write_png
from segsvc.data.labels import LabelMapper
from segsvc.data.spec import spec_from_dict


def test_a_bare_folder_with_16bit_masks_checks_clean_and_counts_its_values(tmp_path: Path) -> None:
    # every 16-bit mask was reported "unreadable: labels up to 65535 do not fit the label type uint8"
    write_png(tmp_path / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.array([[300, 7, 0, 65535]] * 4, np.uint16))
    report = check_dataset(tmp_path)
    assert report.ok, report.format()
    assert report.raw_label_pixels == {0: 4, 7: 4, 300: 4, 65535: 4}


def test_without_a_class_list_16bit_values_are_kept() -> None:
    spec = spec_from_dict({"format": "folder", "root": "."}, base=Path("."))
    out = LabelMapper(spec).apply(np.array([[0, 300, 65535]], np.uint16))
    assert out.unknown == () and out.labels.tolist() == [[0, 300, 65535]]


def test_label_map_does_not_remap_the_ignore_colour() -> None:
    # label_map {255: 1} is for id masks: the ignore colour's pixels (ignore_index 255) became class 1. The
    # palette's classes still go through label_map (``{11: 255}`` ignores a palette's void class).
    spec = spec_from_dict({"format": "folder", "root": ".", "classes": ["membrane", "cell"],
                           "palette": [[0, 0, 0], [200, 0, 0]], "ignore_color": [255, 255, 255],
                           "label_map": {255: 1, 0: 1, 1: 0}}, base=Path("."))
    mapper = LabelMapper(spec)
    colours = np.array([[[255, 255, 255], [0, 0, 0], [200, 0, 0], [9, 9, 9]]], np.uint8)
    out = mapper.apply(colours)
    assert out.labels.tolist() == [[255, 1, 0, 255]]
    assert out.unknown == ((9, 9, 9),) and out.unknown_pixels == 1
    assert mapper.apply(np.array([[255, 0, 1]], np.uint8)).labels.tolist() == [[1, 1, 0]]  # id masks still mapped


def test_label_map_still_maps_a_palettes_void_class_to_the_ignore_index() -> None:
    """A palette with a void class and ``label_map: {2: 255}`` (as CamVid's ids use ``{11: 255}``) trained the
    void colour as class 2 once label_map stopped applying to colour masks."""
    spec = spec_from_dict({"format": "folder", "root": ".", "classes": ["sky", "road", "void"],
                           "palette": [[0, 0, 255], [255, 0, 0], [0, 0, 0]], "ignore_index": 255,
                           "label_map": {2: 255}}, base=Path("."))
    colours = np.array([[[0, 0, 255], [255, 0, 0], [0, 0, 0]]], np.uint8)
    assert LabelMapper(spec).apply(colours).labels.tolist() == [[0, 1, 255]]
