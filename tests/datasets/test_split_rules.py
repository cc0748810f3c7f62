"""When the server assigns a val split: a dataset without one gets it by hash from its training samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from segsvc.data.spec import DatasetSpec, SplitSpec, load_dataset_spec
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from segsvc.datasets.split import assign_splits, needs_split, split_fraction
from tests.datasets.helpers import flat


def with_splits(folder: Path, splits: dict[str, int], unlabelled: tuple[str, ...] = ()) -> Path:
    """``images/<split>`` + ``masks/<split>`` of ``n`` samples each, and a dataset.yaml naming them."""
    described = {}
    for split, n in splits.items():
        flat(folder / "tmp" / split, [f"{split}{i}" for i in range(n)], yaml_file=False)
        for kind in ("images", "masks"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            shutil.move(folder / "tmp" / split / kind, folder / kind / split)
        described[split] = {"images": f"images/{split}", "masks": None if split in unlabelled else f"masks/{split}"}
    shutil.rmtree(folder / "tmp")
    (folder / "dataset.yaml").write_text(yaml.safe_dump(
        {"format": "folder", "root": ".", "classes": ["bg", "fg"], "splits": described}, sort_keys=False))
    return folder


@pytest.fixture
def registry(tmp_path: Path):
    (tmp_path / "data").mkdir()
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=tmp_path / "data"))
    yield reg
    reg.close()


def test_train_and_test_without_val_get_val_from_train(registry, tmp_path):
    with_splits(tmp_path / "data" / "tt", {"train": 20, "test": 5})
    d = registry.register("tt", name="tt")
    assert d.split_assigned
    assert d.split_sizes["test"] == 5 and d.split_sizes["train"] + d.split_sizes["val"] == 20
    spec = d.load_spec()
    val = set(spec.splits["val"].ids)
    assert val == {f"train{i}" for i in range(20) if split_fraction(f"images/train/train{i}.png") < 0.2}
    assert set(spec.splits["train"].ids) == {f"train{i}" for i in range(20)} - val
    assert spec.splits["test"] == SplitSpec(images="images/test", masks="masks/test")  # as it was


def spec_of(tmp_path: Path, splits: dict[str, int], unlabelled: tuple[str, ...] = ()) -> DatasetSpec:
    return load_dataset_spec(with_splits(tmp_path / "ds", splits, unlabelled))


@pytest.mark.parametrize(("splits", "unlabelled", "expected"), [
    ({"train": 6, "test": 3}, (), ["train", "val", "test"]),
    ({"test": 3, "train": 6}, ("test",), ["test", "train", "val"]),   # an unlabelled test split stays
    ({"all": 6}, (), ["train", "val"]),                                  # one split: as before
    ({"train": 6}, (), ["train", "val"]),
    ({"train": 6, "val": 2, "test": 2}, (), ["train", "val", "test"]),  # a val split: nothing assigned
    ({"train": 6, "test": 3}, ("train",), ["train", "test"]),           # unlabelled train: nothing to split
])
def test_which_splits_are_assigned(tmp_path, splits, unlabelled, expected):
    spec = spec_of(tmp_path, splits, unlabelled)
    out = assign_splits(spec)
    assert list(out.splits) == expected
    assigned = "val" not in spec.splits and "val" in out.splits
    assert needs_split(spec) == assigned
    for name in set(spec.splits) - {"train", "all"}:
        assert name not in out.splits or out.splits[name] == spec.splits[name]
