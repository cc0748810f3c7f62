"""Label remapping through the lookup table, and the values that fit no class."""

from __future__ import annotations

import numpy as np

from segsvc.data.labels import LabelMapper
from segsvc.data.spec import load_dataset_spec, spec_from_dict


def test_camvid_void_becomes_ignore_and_classes_stay() -> None:
    mapper = LabelMapper(load_dataset_spec("camvid"))
    out = mapper.apply(np.array([[0, 10, 11]], np.uint8))
    assert out.labels.tolist() == [[0, 10, 255]] and out.unknown == ()


def test_values_outside_the_classes_are_reported_and_set_to_ignore() -> None:
    mapper = LabelMapper(load_dataset_spec("camvid"))
    out = mapper.apply(np.array([[3, 12, 40, 12]], np.uint8))
    assert out.unknown == (12, 40) and out.unknown_pixels == 3
    assert out.labels.tolist() == [[3, 255, 255, 255]]
    assert "values 12, 40 outside the classes" in mapper.describe(out.unknown)


def test_membrane_cells_255_become_class_1() -> None:
    out = LabelMapper(load_dataset_spec("membrane")).apply(np.array([[0, 255], [7, 0]], np.uint8))
    assert out.labels.tolist() == [[0, 1], [255, 0]] and out.unknown == (7,)


def test_sixteen_bit_masks_use_a_full_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = spec_from_dict(
        {"format": "folder", "root": ".", "classes": ["a", "b"], "label_map": {1000: 1, 0: 0}}, base=tmp_path
    )
    out = LabelMapper(spec).apply(np.array([[0, 1000, 5000]], np.uint16))
    assert out.labels.tolist() == [[0, 1, 255]] and out.unknown == (5000,)


def test_rgb_masks_use_palette_and_ignore_colour() -> None:
    spec = load_dataset_spec("camvid")
    road, void, odd = spec.palette[3], spec.ignore_color, (1, 2, 3)
    out = LabelMapper(spec).apply(np.array([[road, void, odd]], np.uint8))
    assert out.labels.tolist() == [[3, 255, 255]] and out.unknown == (odd,)
    assert "colours (1, 2, 3)" in LabelMapper(spec).describe(out.unknown)


def test_without_class_list_nothing_is_unknown(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = spec_from_dict({"format": "folder", "root": "."}, base=tmp_path)
    out = LabelMapper(spec).apply(np.array([[0, 99]], np.uint8))
    assert out.unknown == () and out.labels.tolist() == [[0, 99]]
