"""Hidden names (``.x.png``, macOS ``._x.png``, ``.ipynb_checkpoints/``) are no part of a dataset.

The content hash leaves them out (``segsvc.datasets.content.is_excluded``) and an upload never holds
them, so the sample index and the layout a bare folder is read with leave them out too: a folder read
in place is the dataset its upload gives.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from segsvc.data.check import check_dataset
from segsvc.data.layouts import Fault, index_split, orphan_problems
from segsvc.data.spec import load_dataset_spec
from tests.data.helpers import make_folder_dataset


def with_hidden(root: Path) -> Path:
    """The tiny folder dataset plus a hidden valid pair and AppleDouble debris on both sides."""
    make_folder_dataset(root)
    for kind in ("images", "masks"):
        shutil.copy(root / kind / "a.png", root / kind / ".x.png")
        (root / kind / "._b.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    return root


def test_the_index_leaves_hidden_files_out(tmp_path: Path) -> None:
    spec = load_dataset_spec(with_hidden(tmp_path / ".cache" / "ds"))  # names count below the root only
    index = index_split(spec, "all")
    assert [s.name for s in index.samples] == ["a", "b", "c"] and index.problems == ()
    assert [s.image.name for s in index.samples] == ["a.png", "b.png", "c.png"]
    assert orphan_problems(spec) == []
    assert check_dataset(spec).ok


def test_a_list_naming_a_hidden_file_names_a_missing_sample(tmp_path: Path) -> None:
    root = with_hidden(tmp_path / "ds")
    (root / "train.txt").write_text("images/.x.png masks/.x.png\nimages/a.png masks/a.png\n")
    (root / "dataset.yaml").write_text("format: folder\nroot: .\nclasses: [background, a, b]\n"
                                       "splits: {train: {images: images, masks: masks, list: train.txt}}\n")
    index = index_split(load_dataset_spec(root), "train")
    assert [s.name for s in index.samples] == ["a"]
    assert [(p.fault, p.path.name) for p in index.problems] == [(Fault.MISSING_SAMPLE, ".x.png")]


def test_a_bare_folder_takes_no_split_from_hidden_folders_or_lists(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds")
    (root / "dataset.yaml").unlink()
    for kind in ("images", "masks"):
        for split in ("train", ".ipynb_checkpoints"):
            (root / kind / split).mkdir()
            shutil.copy(root / kind / "a.png", root / kind / split / "a.png")
    assert list(load_dataset_spec(root).splits) == ["train"]
    for kind in ("images", "masks"):
        shutil.rmtree(root / kind / "train")
        shutil.rmtree(root / kind / ".ipynb_checkpoints")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\n")
    (root / "splits" / "._train.txt").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert list(load_dataset_spec(root).splits) == ["train"]
