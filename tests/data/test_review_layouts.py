"""Pairing and ordering of a split's files: odd digits in names, names equal as numbers, an image or mask
listed twice, lists written on Windows, a mask split folder without its image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segsvc.data.check import check_dataset
from segsvc.data.datasets import build_dataset
from segsvc.data.io import write_png
from segsvc.data.layouts import index_split, natural_key
from segsvc.data.spec import load_dataset_spec
from segsvc.errors import DatasetError
from tests.data.helpers import FOLDER_YAML, make_folder_dataset


def test_a_superscript_digit_in_a_file_name_is_indexed_not_a_traceback(tmp_path: Path) -> None:
    # "²".isdigit() is true but int("²") raised ValueError while sorting the split
    root = make_folder_dataset(tmp_path / "ds", stems=("a", "²", "x²y"))
    index = index_split(load_dataset_spec(root), "all")
    assert not index.problems
    assert [s.name for s in index.samples] == ["a", "x²y", "²"]
    assert check_dataset(root).ok


def test_names_equal_as_numbers_sort_the_same_whatever_order_they_come_in() -> None:
    # a set of stems gave "a1"/"a01" in hash order: the sample order (and a seeded split) changed run to run
    names = ["a1", "a01", "a001", "b", "a2"]
    assert sorted(names, key=natural_key) == sorted(reversed(names), key=natural_key) == [
        "a001", "a01", "a1", "a2", "b"]


@pytest.mark.parametrize("listing", ["ids: [a, b, a]", "list: all.txt"])
def test_a_sample_listed_twice_is_a_problem(tmp_path: Path, listing: str) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    (root / "all.txt").write_text("a\nb\na.png\n")
    (root / "dataset.yaml").write_text(FOLDER_YAML.replace("masks: masks}", f"masks: masks, {listing}}}"))
    spec = load_dataset_spec(root)
    index = index_split(spec, "all")
    assert [s.name for s in index.samples] == ["a", "b"]
    assert [(p.fault.value, p.path.name) for p in index.problems] == [("layout", "a.png")]
    assert "names this image twice" in index.problems[0].detail
    with pytest.raises(DatasetError, match="names this image twice"):
        build_dataset(spec, "all")



def test_a_mask_split_folder_without_its_image_folder_is_reported(tmp_path: Path) -> None:
    # masks/val without images/val: the spec of a bare folder had only 'train', so `data check` said OK
    # while every val mask went unread
    for folder in ("images/train", "masks/train", "masks/val"):
        write_png(tmp_path / folder / "a.png", np.zeros((4, 4), np.uint8))
    spec = load_dataset_spec(tmp_path)
    assert list(spec.splits) == ["train", "val"]
    report = check_dataset(spec)
    assert [(p.fault.value, p.path.relative_to(tmp_path).as_posix()) for p in report.problems] == [
        ("layout", "images/val")]


@pytest.mark.parametrize("lists", [False, True])
def test_a_folder_inside_flat_masks_names_no_split(tmp_path: Path, lists: bool) -> None:
    """Flat images/ and masks/ with a folder of other files in masks/ (a preview/) loaded as the flat split (or
    the splits/*.txt lists); counting masks/' folders as split folders made 'preview' the only split."""
    for folder in ("images", "masks", "masks/preview"):
        for stem in ("a", "b"):
            write_png(tmp_path / folder / f"{stem}.png", np.zeros((4, 4), np.uint8))
    if lists:
        (tmp_path / "splits").mkdir()
        (tmp_path / "splits" / "train.txt").write_text("a\nb\n")
    spec = load_dataset_spec(tmp_path)
    assert list(spec.splits) == (["train"] if lists else ["all"])
    assert check_dataset(spec).ok


@pytest.mark.parametrize("lines", [
    "C:\\CamVid\\images\\a.png C:\\CamVid\\masks\\a.png\nC:\\CamVid\\images\\b.png C:\\CamVid\\masks\\b.png\n",
    "D:\\data\\a.png\nb\n",
])
def test_lists_written_on_windows_pair_by_file_name(tmp_path: Path, lines: str) -> None:
    # only the file names are used "so lists written on another machine still work": a backslash path was
    # taken whole as a file name, and every sample was "listed but its image is missing"
    root = make_folder_dataset(tmp_path / "ds")
    (root / "all.txt").write_text(lines)
    (root / "dataset.yaml").write_text(FOLDER_YAML.replace("masks: masks}", "masks: masks, list: all.txt}"))
    index = index_split(load_dataset_spec(root), "all")
    assert not index.problems
    assert [(s.name, s.image.name, s.mask.name) for s in index.samples] == [("a", "a.png", "a.png"),
                                                                              ("b", "b.png", "b.png")]


def test_one_mask_listed_with_two_images_is_a_problem(tmp_path: Path) -> None:
    # "b.png a.png": image b trained on a's labels, silently
    root = make_folder_dataset(tmp_path / "ds")
    (root / "all.txt").write_text("a.png a.png\nb.png a.png\nc.png c.png\n")
    (root / "dataset.yaml").write_text(FOLDER_YAML.replace("masks: masks}", "masks: masks, list: all.txt}"))
    index = index_split(load_dataset_spec(root), "all")
    assert [s.name for s in index.samples] == ["a", "c"]
    assert [(p.fault.value, p.path.relative_to(root).as_posix(), p.detail) for p in index.problems] == [
        ("layout", "masks/a.png", "split 'all': list all.txt pairs this mask with a.png and b.png")]


def test_a_folder_that_cannot_be_listed_is_a_problem_not_a_traceback(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a masks folder without read permission raised PermissionError out of `data check` (the test runs as
    # any user, root included, so the refusal is simulated at the listing)
    root = make_folder_dataset(tmp_path / "ds")
    listing = Path.iterdir

    def refuse(self: Path):  # type: ignore[no-untyped-def]
        if self == root / "masks":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    report = check_dataset(root)
    assert [(p.fault.value, p.path.name, p.detail) for p in report.problems] == [
        ("layout", "masks", "split 'all': cannot list the folder (Permission denied)")]
