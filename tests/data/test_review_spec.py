"""Dataset specs that passed validation and broke later (or read labels wrongly) are refused when loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segsvc.data.labels import LabelMapper
from segsvc.data.spec import load_dataset_spec, spec_from_dict
from segsvc.errors import DatasetError

BASE = "format: folder\nroot: .\nclasses: [road, car]\n"


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + text)
    load_dataset_spec(path)


@pytest.mark.parametrize(("text", "message"), [
    # a ModelConfigError only when the dataset was built (mean of one value for an RGB dataset)
    ("mean: [0.5]\nstd: [0.25]\n", "mean/std need 3 values each, got 1 and 1"),
    ("mean: [0.5, 0.5, 0.5]\nstd: [0, 1, 1]\n", "std values must be positive"),
    # silently ignored: one without the other fell back to the ImageNet statistics
    ("mean: [0.1, 0.2, 0.3]\n", r"give mean and std together \(only mean is given\)"),
    ("std: [0.1, 0.2, 0.3]\n", r"give mean and std together \(only std is given\)"),
    # read as int32 labels, then refused by the augmentation (0..65535) or overflowing the label table
    ("ignore_index: 70000\n", "ignore_index must be at most 65535"),
    # a mask value past 16 bits can never occur: the entry silently did nothing
    ("label_map: {70000: 1}\n", "label_map entries must be int: int within 0..65535"),
])
def test_values_that_broke_later_are_refused_with_the_file_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        _load(tmp_path, text)
    assert str(info.value).startswith(str(tmp_path / "spec.yaml"))


def test_two_classes_of_one_colour_are_refused(tmp_path: Path) -> None:
    # colour masks mapped both to the last class with that colour: class 0 silently vanished
    with pytest.raises(DatasetError, match=r"palette colour \[1, 2, 3\] is both class 0 and class 1"):
        _load(tmp_path, "palette: [[1, 2, 3], [1, 2, 3]]\n")


def test_an_ignore_colour_that_is_a_class_colour_is_refused(tmp_path: Path) -> None:
    # the default palette paints class 0 black: with ignore_color black every road pixel became ignored
    data = {"format": "folder", "root": ".", "classes": ["road", "car"], "ignore_color": [0, 0, 0]}
    with pytest.raises(DatasetError, match=r"ignore_color \[0, 0, 0\] is also the colour of class 0 \('road'\)"):
        spec_from_dict(data, tmp_path)
    spec = spec_from_dict({**data, "ignore_color": [255, 255, 255]}, tmp_path)
    mask = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
    assert LabelMapper(spec).apply(mask).labels.tolist() == [[0, 255]]


def test_id_masks_may_draw_classes_in_one_colour(tmp_path: Path) -> None:
    """With ``mask_encoding: ids`` the palette only draws the classes: colours shared (or the ignore colour a
    class's) mislabel nothing, and such specs, registered before the colour checks, must still load."""
    _load(tmp_path, "palette: [[1, 2, 3], [1, 2, 3]]\nignore_index: 255\nignore_color: [1, 2, 3]\n"
                    "options: {mask_encoding: ids}\n")


def test_invalid_yaml_is_named_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nformat: [folder\n")
    with pytest.raises(DatasetError) as info:
        load_dataset_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: invalid YAML: expected ',' or ']'") and "line 3, column 1" in message


@pytest.mark.parametrize(("text", "key"), [
    ("splits:\n  train: {images: a, masks: b}\n  train: {images: c, masks: d}\n", "'train'"),
    ("label_map: {1: 0}\nlabel_map: {2: 0}\n", "'label_map'"),
])
def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(DatasetError, match=f"invalid YAML: key {key} is given twice in one mapping at line"):
        _load(tmp_path, text)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + "splits:\n  train: &t {images: a, masks: b}\n  val:\n    <<: *t\n    images: c\n")
    assert load_dataset_spec(path).splits["val"].images == "c"


@pytest.mark.parametrize(("text", "message"), [
    # `mask_suffix: null` stripped the text "None" from mask names (str(None)), `true` did nothing
    ("options: {mask_suffix: null}\n", "options.mask_suffix must be text added to a mask's file stem, got None"),
    ("options: {mask_suffix: masks/x}\n", "options.mask_suffix must be text"),
    # `images_without_masks: true` silently meant "not allowed"
    ("options: {images_without_masks: true}\n", "options.images_without_masks can only be 'allowed'"),
    # the ignore colour's pixels were counted as unknown colours
    ("ignore_index: null\nignore_color: [9, 9, 9]\n", "ignore_color needs an ignore_index"),
])
def test_options_that_silently_did_something_else_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        _load(tmp_path, text)
