"""The readers: CamVid and ISBI membrane on the shared data, VOC on a fixture, the generic folder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segsvc.data import datasets as datasets_module
from segsvc.data.datasets import build_dataset
from segsvc.data.io import write_png
from segsvc.data.spec import DatasetSpec, load_dataset_spec
from segsvc.data.synthetic import SyntheticConfig, synthetic_spec
from segsvc.data.transforms import train_transform
from segsvc.errors import DatasetError

from tests.data.helpers import VOC_STEMS, make_folder_dataset


@pytest.mark.dataset
def test_camvid_resolves_foreign_list_paths(camvid: DatasetSpec) -> None:
    train, val = build_dataset(camvid, "train"), build_dataset(camvid, "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.names[0] == "0001TP_006690"
    first = train.samples[0]
    assert first.image == camvid.root / "train" / "0001TP_006690.png"
    assert first.mask == camvid.root / "trainannot" / "0001TP_006690.png"


@pytest.mark.dataset
def test_camvid_items(camvid: DatasetSpec) -> None:
    val = build_dataset(camvid, "val")
    image, mask = val.read(0)
    assert image.shape == (360, 480, 3) and image.dtype == np.uint8
    assert mask.shape == (360, 480)
    assert set(np.unique(mask).tolist()) <= set(range(11)) | {255}
    x, y = val[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 360, 480)
    assert y.dtype == torch.int64 and tuple(y.shape) == (360, 480)


@pytest.mark.dataset
def test_camvid_void_is_mapped_to_ignore(camvid: DatasetSpec) -> None:
    train = build_dataset(camvid, "train")
    labels = np.concatenate([train.read(i)[1].ravel() for i in range(3)])
    assert 11 not in labels and 255 in labels


@pytest.mark.dataset
def test_membrane_splits_and_grey_items(membrane: DatasetSpec) -> None:
    train, val = build_dataset(membrane, "train"), build_dataset(membrane, "val")
    assert train.names == [str(i) for i in range(20)] and val.names == [str(i) for i in range(20, 25)]
    image, mask = val.read(0)
    assert image.shape == (512, 512) and image.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    x, y = val[0]
    assert tuple(x.shape) == (1, 512, 512) and tuple(y.shape) == (512, 512)


@pytest.mark.dataset
def test_membrane_test_split_is_unlabelled(membrane: DatasetSpec) -> None:
    test = build_dataset(membrane, "test")
    assert len(test) == 30
    image, mask = test.read(0)
    assert image.shape == (512, 512) and (mask == 255).all()


def test_voc_reads_palette_indices_and_lists(voc_dataset: DatasetSpec) -> None:
    train = build_dataset(voc_dataset, "train")
    assert train.names == list(VOC_STEMS["train"])
    image, mask = train.read(0)
    assert image.shape == (20, 30, 3)
    assert set(np.unique(mask).tolist()) == {0, 15, 255}  # person and the boundary, as indices
    assert len(build_dataset(voc_dataset, "trainval")) == 3


def test_folder_layout_by_stem(folder_dataset: Path) -> None:
    spec = load_dataset_spec(folder_dataset)
    ds = build_dataset(spec, "all")
    assert ds.names == ["a", "b", "c"]
    image, mask = ds.read(1)
    assert image.shape == (24, 32, 3) and mask.max() <= 2


def test_folder_with_rgb_palette_masks(tmp_path: Path) -> None:
    spec = _rgb_folder_spec(tmp_path)
    ids = np.array([[0, 3, 10], [3, 255, 0]], np.uint8)  # 0 is Sky: grey (128, 128, 128)
    colours = np.array([*spec.palette, *[(0, 0, 0)] * (255 - spec.num_classes), spec.ignore_color], np.uint8)
    write_png(tmp_path / "images" / "s.png", np.zeros((2, 3, 3), np.uint8))
    write_png(tmp_path / "masks" / "s.png", colours[ids])
    assert np.array_equal(build_dataset(spec, "all").read(0)[1], ids)
    write_png(tmp_path / "masks" / "s.png", colours[np.array([[0, 0, 0], [255, 255, 0]], np.uint8)])
    assert build_dataset(spec, "all").read(0)[1].tolist() == [[0, 0, 0], [255, 255, 0]]


def _rgb_folder_spec(root: Path) -> DatasetSpec:
    camvid = load_dataset_spec("camvid")
    (root / "d.yaml").write_text(
        "format: folder\nroot: .\nclasses: [Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, "
        "Pedestrian, Bicyclist]\n"
        f"palette: {[list(c) for c in camvid.palette]}\nignore_color: [0, 0, 0]\noptions: {{mask_encoding: rgb}}\n"
        "splits: {all: {images: images, masks: masks}}\n"
    )
    return load_dataset_spec(root / "d.yaml")


def test_folder_split_list_with_stems_and_comments(folder_dataset: Path) -> None:
    (folder_dataset / "val.txt").write_text("# held out\nc\n\na.png\n")
    (folder_dataset / "dataset.yaml").write_text(
        (folder_dataset / "dataset.yaml").read_text() + "  val: {list: val.txt}\n"
    )
    assert build_dataset(load_dataset_spec(folder_dataset), "val").names == ["c", "a"]


def test_mask_suffix_option(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_png(tmp_path / "images" / "p1.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    write_png(tmp_path / "masks" / "p1_mask.png", np.ones((8, 8), np.uint8))
    (tmp_path / "dataset.yaml").write_text("root: .\nclasses: [a, b]\noptions: {mask_suffix: _mask}\n")
    ds = build_dataset(load_dataset_spec(tmp_path), "train")
    assert ds.names == ["p1"] and (ds.read(0)[1] == 1).all()


def test_missing_mask_refuses_to_build_and_names_the_file(folder_dataset: Path) -> None:
    (folder_dataset / "masks" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"image without mask\] .*images/b\.png") as info:
        build_dataset(load_dataset_spec(folder_dataset), "all")
    assert "segsvc data check" in str(info.value)


def test_unknown_labels_error_unless_the_spec_says_ignore(folder_dataset: Path) -> None:
    write_png(folder_dataset / "masks" / "a.png", np.full((24, 32), 7, np.uint8))
    ds = build_dataset(load_dataset_spec(folder_dataset), "all")
    with pytest.raises(DatasetError, match=r"a\.png: values 7 outside the classes"):
        ds.read(0)
    yaml_path = folder_dataset / "dataset.yaml"
    yaml_path.write_text(yaml_path.read_text() + "unknown_labels: ignore\n")
    ds = build_dataset(load_dataset_spec(folder_dataset), "all")
    assert (ds.read(0)[1] == 255).all()


def test_size_mismatch_is_an_error_when_reading(folder_dataset: Path) -> None:
    write_png(folder_dataset / "masks" / "c.png", np.zeros((10, 10), np.uint8))
    ds = build_dataset(load_dataset_spec(folder_dataset), "all")
    with pytest.raises(DatasetError, match=r"c\.png: mask is 10x10 but image c\.png is 32x24"):
        ds.read(2)


def test_dataset_without_classes_cannot_be_built(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    (tmp_path / "dataset.yaml").unlink()
    with pytest.raises(DatasetError, match="names no classes"):
        build_dataset(load_dataset_spec(tmp_path), "all")


def test_transform_runs_before_preprocess_and_pads_with_ignore() -> None:
    spec = synthetic_spec(SyntheticConfig(size_hw=(64, 64)))
    ds = build_dataset(spec, "val", transform=train_transform("none", crop_hw=(80, 72)))
    x, y = ds[0]
    assert tuple(x.shape) == (3, 80, 72) and tuple(y.shape) == (80, 72)
    assert int((y == 255).sum()) == 80 * 72 - 64 * 64


def test_each_dataloader_worker_gets_its_own_augmentation_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = synthetic_spec(SyntheticConfig(size_hw=(64, 64)))
    ds = build_dataset(spec, "val", transform=train_transform("em", crop_hw=(64, 64), seed=0))

    def items_in_worker(seed: int) -> list[np.ndarray]:
        monkeypatch.setattr(datasets_module, "get_worker_info", lambda: SimpleNamespace(seed=seed))
        return [ds[0][1].numpy() for _ in range(6)]

    first, other, again = items_in_worker(1), items_in_worker(2), items_in_worker(1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_unknown_split_is_named() -> None:
    spec = load_dataset_spec("synthetic")
    with pytest.raises(DatasetError, match="no split 'holdout'"):
        build_dataset(spec, "holdout")
