"""Dataset descriptions: built-ins, YAML parsing and validation, bare folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.config import InputSpec
from segsvc.data.spec import (
    DatasetSpec,
    builtin_specs,
    datasets_dir,
    load_dataset_spec,
    repo_root,
    spec_from_dict,
)
from segsvc.errors import DatasetError, NotFound

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")  # fmt: skip


def test_builtins_are_listed() -> None:
    assert {"camvid", "membrane", "synthetic", "voc"} <= set(builtin_specs())


def test_camvid_builtin() -> None:
    spec = load_dataset_spec("camvid")
    assert spec.format == "camvid" and spec.class_names == CAMVID_CLASSES
    assert dict(spec.label_map) == {11: 255} and spec.ignore_index == 255
    assert len(spec.palette) == 11 and spec.palette[3] == (128, 64, 128)  # Road
    assert spec.root == datasets_dir() / "camvid"
    assert spec.splits["train"].list == "train.txt" and spec.splits["val"].masks == "valannot"
    assert spec.input_spec() == InputSpec.default_for(3)


def test_membrane_builtin() -> None:
    spec = load_dataset_spec("membrane")
    assert spec.class_names == ("membrane", "cell") and spec.channels == 1
    assert dict(spec.label_map) == {255: 1}
    assert spec.splits["train"].ids == tuple(str(i) for i in range(20))
    assert spec.splits["val"].ids == tuple(str(i) for i in range(20, 25))
    assert not spec.splits["test"].labelled


def test_synthetic_builtin() -> None:
    spec = load_dataset_spec("synthetic")
    assert spec.class_names[0] == "background" and 4 <= spec.num_classes <= 5
    assert {"train", "val"} <= set(spec.splits) and spec.splits["train"].count > 0


def test_default_datasets_dir_is_next_to_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGSVC_DATASETS", raising=False)
    assert datasets_dir() == (repo_root().parent / "shared" / "datasets").resolve()


def test_datasets_env_overrides_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGSVC_DATASETS", str(tmp_path))
    assert load_dataset_spec("camvid").root == tmp_path / "camvid"


def test_relative_root_resolves_against_the_yaml_folder(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "d.yaml").write_text("format: folder\nroot: ../data\nclasses: [a, b]\n")
    spec = load_dataset_spec(tmp_path / "cfg" / "d.yaml")
    assert spec.root == (tmp_path / "data").resolve()
    assert spec.name == "d" and spec.splits["train"].images == "images"  # defaults of the folder format


def test_to_dict_round_trips(tmp_path: Path) -> None:
    spec = load_dataset_spec("camvid")
    again = spec_from_dict(spec.to_dict(), base=tmp_path)
    for field in ("name", "format", "root", "class_names", "palette", "ignore_index", "ignore_color",
                  "label_map", "splits", "channels"):  # fmt: skip
        assert getattr(again, field) == getattr(spec, field), field


def test_spec_is_frozen() -> None:
    spec = load_dataset_spec("membrane")
    with pytest.raises(AttributeError):
        spec.channels = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.label_map[3] = 4  # type: ignore[index]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("format: nope\nroot: .\n", "unknown dataset format 'nope'"),
        ("format: folder\nroot: .\ncolour: red\n", "colour: unknown key; valid keys here: name, format"),
        ("format: folder\n", "'root'"),
        ("format: folder\nroot: .\nclasses: [a, b]\npalette: [[0, 0, 0]]\n", "palette has 1 colours for 2 classes"),
        ("format: folder\nroot: .\nclasses: [a, b]\nlabel_map: {7: 5}\n", "label_map sends 7 to 5"),
        ("format: folder\nroot: .\nclasses: [a, b]\nignore_index: 1\n", "outside the class ids"),
        ("format: folder\nroot: .\nclasses: [a, a]\n", "unique"),
        ("format: folder\nroot: .\nchannels: 2\n", "channels must be 1 or 3"),
        ("format: folder\nroot: .\nunknown_labels: maybe\n", "unknown_labels"),
        ("format: folder\nroot: .\nsplits: {train: {imgs: x}}\n", r"splits.train.imgs: unknown key \(did you mean 'images'\?\)"),
        ("format: folder\nroot: .\nsplits: {train: {ids: abc}}\n", "splits.train.ids: expected a list, got 'abc'"),
        ("format: folder\nroot: .\nsplits: {train: {count: 2.5}}\n", "splits.train.count: expected an integer"),
        ("format: folder\nroot: .\nclasses: road\n", "classes: expected a list, got 'road'"),
        ("format: folder\nroot: .\nclasses: [a, b]\nignore_color: [1, 2]\n", r"ignore_color: expected 3 integers \(r, g, b\)"),
        ("format: folder\nroot: .\nlabel_map: {x: 1}\n", r"label_map\.x \(key\): expected an integer"),
        ("format: folder\nroot: .\npalette: [[0, 0, 300]]\nclasses: [a]\n", "0..255"),
        ("format: folder\nroot: .\noptions: {mask_encoding: hex}\n", "mask_encoding must be one of"),
        ("format: [unclosed\n", "invalid YAML"),
    ],
)
def test_malformed_specs_are_rejected_with_a_reason(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset_spec(path)
    assert "bad.yaml" in str(info.value)


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(NotFound, match="camvid"):
        load_dataset_spec("cityscapes-not-here")


def test_unknown_split_lists_the_splits() -> None:
    with pytest.raises(DatasetError, match="splits: train, val"):
        load_dataset_spec("camvid").split("test")


def _touch_pair(root: Path, images: str, masks: str, stem: str) -> None:
    for folder in (images, masks):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{stem}.png").write_bytes(b"")


def test_bare_folder_with_split_subfolders(tmp_path: Path) -> None:
    _touch_pair(tmp_path, "images/train", "masks/train", "a")
    _touch_pair(tmp_path, "images/val", "masks/val", "b")
    spec = load_dataset_spec(tmp_path)
    assert set(spec.splits) == {"train", "val"} and spec.splits["val"].images == "images/val"
    assert spec.class_names == ()  # unknown without a dataset.yaml


def test_bare_folder_with_split_lists_and_num_classes(tmp_path: Path) -> None:
    _touch_pair(tmp_path, "images", "masks", "a")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\n")
    spec = load_dataset_spec(tmp_path, num_classes=3)
    assert spec.splits["train"].list == "splits/train.txt"
    assert spec.class_names == ("class_0", "class_1", "class_2")


def test_bare_flat_folder_is_one_split(tmp_path: Path) -> None:
    _touch_pair(tmp_path, "images", "masks", "a")
    assert list(load_dataset_spec(tmp_path).splits) == ["all"]


def test_folder_dataset_yaml_wins(folder_dataset: Path) -> None:
    spec = load_dataset_spec(folder_dataset)
    assert spec.name == "tiny" and spec.class_names == ("background", "a", "b")
    assert spec.root == folder_dataset.resolve()


def test_folder_without_layout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images/ and masks/"):
        load_dataset_spec(tmp_path)


def test_default_palette_has_one_colour_per_class() -> None:
    spec = DatasetSpec(name="x", format="folder", root=Path("."), class_names=("a", "b", "c"),
                       splits={"all": load_dataset_spec("camvid").splits["train"]})  # fmt: skip
    assert spec.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))  # the VOC colour map


def test_package_data_ships_the_builtin_yamls() -> None:
    pyproject = (repo_root() / "pyproject.toml").read_text()
    assert 'segsvc = ["data/specs/*.yaml"]' in pyproject
