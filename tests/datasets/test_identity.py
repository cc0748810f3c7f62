"""One identity, one training set: a folder registered in place is the dataset an upload of it gives.

The content hash names what an upload of a folder holds (``content.local_files``: hidden names left out,
each symlink by its own name and content). Registering the folder must hash those files and train on
exactly the samples among them, no more (hidden files) and no fewer (links to the same file).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from segsvc import errors
from segsvc.datasets.archive import ExtractLimits
from segsvc.datasets.content import hash_folder, local_files, tar_stream
from segsvc.datasets.registry import Dataset, DatasetRegistry, DatasetsConfig
from tests.datasets.helpers import assert_nothing_left, flat


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def registry(tmp_path: Path, data_root: Path):
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data_root))
    yield reg
    reg.close()


def uploaded(tmp_path: Path, folder: Path, name: str) -> Dataset:
    """``folder`` as ``segsvc datasets upload`` sends it, to a registry of its own."""
    other = DatasetRegistry(DatasetsConfig(tmp_path / f"state-{name}"))
    up = other.open_upload(name, "tar")
    for chunk in tar_stream(local_files(folder)):
        up.write(chunk)
    return up.commit()


def split_ids(dataset: Dataset) -> dict[str, list[str]]:
    splits = yaml.safe_load(dataset.spec_path.read_text())["splits"]
    return {name: split.get("ids") for name, split in splits.items()}


def assert_same_dataset(registered: Dataset, upload: Dataset) -> None:
    assert (registered.sha256, registered.files, registered.total_bytes) == (
        upload.sha256, upload.files, upload.total_bytes)
    assert registered.split_sizes == upload.split_sizes
    assert split_ids(registered) == split_ids(upload)


def test_hidden_files_are_no_part_of_a_registered_dataset(registry, data_root, tmp_path):
    folder = flat(data_root / "hid", ["a", "b", "c", "d"])
    extra = flat(tmp_path / "extra", ["x"], yaml_file=False)
    for kind in ("images", "masks"):  # a valid pair, under a hidden name
        shutil.copy(extra / kind / "x.png", folder / kind / ".x.png")
    registered = registry.register("hid", name="hid")
    assert sum(registered.split_sizes.values()) == 4
    assert ".x" not in sum(split_ids(registered).values(), [])
    assert_same_dataset(registered, uploaded(tmp_path, folder, "hid"))


def test_macos_debris_beside_the_images_does_not_break_a_registration(registry, data_root, tmp_path):
    folder = flat(data_root / "mac", ["a", "b", "c"])
    (folder / "images" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "masks" / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    registered = registry.register("mac", name="mac")
    assert sum(registered.split_sizes.values()) == 3
    assert_same_dataset(registered, uploaded(tmp_path, folder, "mac"))


def test_each_symlink_counts_by_its_own_name_as_in_an_upload(registry, data_root, tmp_path):
    folder = flat(data_root / "sym", ["a", "b", "c"])
    os.symlink("a.png", folder / "images" / "x.png")  # two names, one file: two samples
    os.symlink("a.png", folder / "masks" / "x.png")
    notes = data_root / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("shared notes")
    os.symlink("../notes", folder / "docs")  # a linked folder inside the data root
    expected, files, size = hash_folder(folder)
    assert files == 10
    registered = registry.register("sym", name="sym")
    assert (registered.sha256, registered.files, registered.total_bytes) == (expected, files, size)
    assert sum(registered.split_sizes.values()) == 4
    assert_same_dataset(registered, uploaded(tmp_path, folder, "sym"))


def test_a_folder_link_loop_is_refused_by_name(registry, data_root):
    folder = flat(data_root / "loop", ["a", "b"])
    os.symlink("..", folder / "images" / "again")  # images/again/images/again/...
    with pytest.raises(errors.DatasetError, match="'loop/images/again'.*loop") as info:
        registry.register("loop", name="loop")
    assert str(data_root) not in str(info.value)
    assert_nothing_left(registry)


def test_a_link_out_of_the_data_root_stays_refused_without_showing_server_paths(registry, data_root, tmp_path):
    outside = flat(tmp_path / "outside", ["z"], yaml_file=False)
    folder = flat(data_root / "out", ["a", "b"])
    os.symlink(outside / "images" / "z.png", folder / "images" / "z.png")
    with pytest.raises(errors.PathOutsideRoot, match="'out/images/z.png'") as info:
        registry.register("out", name="out")
    assert str(tmp_path) not in str(info.value)
    assert_nothing_left(registry)


@pytest.mark.parametrize("path", [".", "./", "sub/..", "sub/../"])
def test_registering_the_data_root_itself_asks_for_a_name(registry, data_root, path):
    flat(data_root, ["a", "b", "c"])
    (data_root / "sub").mkdir()
    with pytest.raises(errors.InvalidArgument, match="give the dataset a name") as info:
        registry.register(path)
    assert "'.'" in str(info.value) and str(data_root) not in str(info.value)
    assert registry.register(path, name="everything").source_path == "."
    assert_nothing_left(registry)


def test_a_folder_whose_name_is_no_dataset_name_asks_for_one(registry, data_root):
    flat(data_root / "my data", ["a", "b"])
    with pytest.raises(errors.InvalidArgument, match="give the dataset a name"):
        registry.register("my data")
    assert registry.register("my data", name="mine").name == "mine"


def test_a_hidden_link_is_no_part_of_the_dataset_and_is_not_judged(registry, data_root, tmp_path):
    folder = flat(data_root / "cache", ["a", "b"])
    os.symlink(tmp_path, folder / ".cache")  # leads out, but hidden: neither hashed, read nor uploaded
    assert registry.register("cache").sha256 == hash_folder(folder)[0]


def test_registering_stops_beyond_the_file_limit(tmp_path, data_root):
    flat(data_root / "big", ["a", "b", "c", "d"])  # 9 files
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "small", data_root=data_root, limits=ExtractLimits(max_files=8)))
    with pytest.raises(errors.InvalidArgument, match="more than 8 files"):
        reg.register("big")
    assert_nothing_left(reg)
