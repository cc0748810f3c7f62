"""Edges of a dataset's files and description: ``content.local_files`` and the class names ``ingest`` takes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from segsvc.datasets.content import hash_folder, local_files
from segsvc.datasets.ingest import MAX_CLASS_NAME_BYTES, add_metadata_yaml, load_confined
from segsvc.errors import DatasetError, InvalidArgument
from tests.datasets.helpers import flat


def _tree(root: Path) -> Path:
    for rel in ("a.txt", "sub/b.txt", "sub/deep/c.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return root


def test_an_unreadable_folder_is_named_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.walk`` skips a folder it cannot list in silence: the upload went out without its files."""
    root = _tree(tmp_path / "data")
    real_scandir = os.scandir

    def scandir(path=".", *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == root / "sub" / "deep":  # mode 000 cannot stop root, which the tests may run as
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path, *args, **kwargs)

    assert [rel for rel, _ in local_files(root)] == ["a.txt", "sub/b.txt", "sub/deep/c.txt"]
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InvalidArgument, match=r"cannot read folder 'sub/deep' \(Permission denied\)") as info:
        local_files(root)
    assert str(tmp_path) not in str(info.value)  # relative to the folder: the server runs it on its own folders


def test_a_folder_link_into_its_own_ancestor_is_refused_not_listed_forty_times(tmp_path: Path) -> None:
    """``os.walk(followlinks=True)`` went round a loop until the kernel's ELOOP: every file under it was listed
    once per turn (sub/loop/sub/b.txt, sub/loop/sub/loop/sub/b.txt, ...), then the error was skipped."""
    root = _tree(tmp_path / "data")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    with pytest.raises(InvalidArgument, match=r"folder link 'sub/loop' leads back into a folder it lies in"):
        local_files(root)


def test_links_to_other_folders_and_files_are_still_followed(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    elsewhere = _tree(tmp_path / "elsewhere")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "b-link.txt").symlink_to(root / "sub" / "b.txt")
    (root / "twice").symlink_to(root / "sub", target_is_directory=True)  # a sibling, not an ancestor: no loop
    names = [rel for rel, _ in local_files(root)]
    assert names == ["a.txt", "b-link.txt", "linked/a.txt", "linked/sub/b.txt", "linked/sub/deep/c.txt",
                     "sub/b.txt", "sub/deep/c.txt", "twice/b.txt", "twice/deep/c.txt"]


def test_a_dangling_link_is_named_not_skipped(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    (root / "sub" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(InvalidArgument, match=r"'sub/gone.png' is a link to nothing"):
        local_files(root)


def _metadata_upload(root: Path, names: list[str]) -> None:
    flat(root, ["a", "b"], yaml_file=False)
    add_metadata_yaml(root, class_names=names)


def test_a_class_name_over_the_byte_limit_is_refused_from_the_metadata(tmp_path: Path) -> None:
    long_name = "é" * (MAX_CLASS_NAME_BYTES // 2 + 1)  # within the limit in characters, over it in UTF-8 bytes
    with pytest.raises(DatasetError, match=rf"class 1 .* is {MAX_CLASS_NAME_BYTES + 2} bytes in UTF-8: more than "
                                           rf"{MAX_CLASS_NAME_BYTES}"):
        _metadata_upload(tmp_path / "d", ["bg", long_name])
    assert not (tmp_path / "d" / "dataset.yaml").exists()


def test_a_class_name_over_the_byte_limit_is_refused_from_dataset_yaml(tmp_path: Path) -> None:
    root = flat(tmp_path / "d", ["a", "b"], classes=("bg", "x" * (MAX_CLASS_NAME_BYTES + 1)))
    with pytest.raises(DatasetError, match=rf"class 1 \('xxx.*\.\.\.'\) is {MAX_CLASS_NAME_BYTES + 1} bytes") as info:
        load_confined(root, "d")
    assert len(str(info.value)) < 300  # the name is cut in the message, not repeated whole


def test_a_class_name_at_the_byte_limit_is_taken(tmp_path: Path) -> None:
    names = ["bg", "é" * (MAX_CLASS_NAME_BYTES // 2)]
    _metadata_upload(tmp_path / "d", names)
    assert yaml.safe_load((tmp_path / "d" / "dataset.yaml").read_text())["classes"] == names
    assert load_confined(tmp_path / "d", "d").class_names == tuple(names)


def test_a_file_name_that_is_not_utf8_is_named_not_a_unicode_traceback(tmp_path: Path) -> None:
    """A Linux file name is bytes: one that is not UTF-8 reached ``content_hash`` (and the tar header) as a
    surrogate escape and failed there with UnicodeEncodeError, naming no file."""
    root = _tree(tmp_path / "data")
    (root / "sub").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")  # Latin-1, as an old archive has it
    with pytest.raises(InvalidArgument, match=r"'sub/caf\\udce9.png' is not a UTF-8 name"):
        hash_folder(root)
