"""A folder upload is rooted at the folder, even when the folder's only entry is a folder.

The server roots an archive of one folder (``shapes.tar`` holding ``shapes/...``) inside that folder. A folder
sent file by file (pairs) names its files relative to the folder itself, and a folder's tar stream is rooted there
too: ``mem/`` holding only ``train/`` (a dataset.yaml given as metadata naming ``train/images``) was unwrapped to
``train/`` and refused with "split 'train': folder does not exist", though ``segsvc data check`` passes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from segsvc.datasets.content import folder_tar_names, hash_folder, local_files, tar_stream
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from tests.datasets.helpers import assert_nothing_left, flat, synth, tar_of, zip_of
from tests.datasets.test_registry import upload, upload_pairs

# What the MLOps tester gave as --dataset-yaml: the splits live under train/, the upload's only top-level folder.
DESCRIPTION = yaml.safe_dump({"format": "folder", "root": ".", "classes": ["bg", "fg"],
                              "splits": {"train": {"images": "train/images", "masks": "train/masks"}}})


@pytest.fixture
def registry(tmp_path):
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state"))
    yield reg
    reg.close()


@pytest.fixture
def mem(tmp_path) -> Path:
    """A folder whose only entry is the folder ``train/`` (images/, masks/), described by ``DESCRIPTION``."""
    folder = tmp_path / "mem"
    flat(folder / "train", ["a", "b", "c", "d", "e"], yaml_file=False)
    return folder


def described(folder: Path, tmp_path: Path) -> tuple[str, int, int]:
    """The identity of ``folder`` uploaded with ``DESCRIPTION``: its files and the dataset.yaml stored with them."""
    copy = tmp_path / "described"
    shutil.copytree(folder, copy)
    (copy / "dataset.yaml").write_text(DESCRIPTION)
    return hash_folder(copy)


def folder_tar(folder: Path) -> bytes:
    """``folder`` as ``segsvc datasets upload`` sends it by default: a tar stream of its files."""
    return b"".join(tar_stream(folder_tar_names(local_files(folder))))


def test_a_folder_sent_file_by_file_is_rooted_at_the_folder_even_with_one_folder_in_it(registry, mem, tmp_path):
    expected, files, size = described(mem, tmp_path)
    d = upload_pairs(registry, mem, "mem", dataset_yaml=DESCRIPTION)
    assert (d.sha256, d.files, d.total_bytes) == (expected, files, size)
    assert sum(d.split_sizes.values()) == 5
    root = d.load_spec().root
    assert (root / "train" / "images" / "a.png").is_file() and (root / "dataset.yaml").is_file()


def test_a_folder_sent_as_a_tar_stream_is_rooted_at_the_folder_even_with_one_folder_in_it(registry, mem, tmp_path):
    d = upload(registry, folder_tar(mem), "tar", "mem", dataset_yaml=DESCRIPTION)
    assert (d.sha256, d.files, d.total_bytes) == described(mem, tmp_path)
    assert sum(d.split_sizes.values()) == 5
    assert (d.load_spec().root / "train" / "images" / "a.png").is_file()
    assert upload_pairs(registry, mem, "mem", dataset_yaml=DESCRIPTION) == d  # one folder, one dataset
    assert_nothing_left(registry)


@pytest.mark.parametrize("pack", [lambda f: (tar_of(f, prefix="mem/"), "tar"), lambda f: (zip_of(f, prefix="mem/"),
                                                                                            "zip")])
def test_an_archive_of_the_folder_is_still_rooted_inside_its_one_folder(registry, mem, pack, tmp_path):
    data, fmt = pack(mem)
    d = upload(registry, data, fmt, "mem", dataset_yaml=DESCRIPTION)
    assert d.sha256 == described(mem, tmp_path)[0] and sum(d.split_sizes.values()) == 5
    assert d.source_path == fmt


def test_other_folders_upload_as_before_whatever_the_format(registry, tmp_path):
    """A folder with more than one top-level entry: its tar stream is unchanged, and every format gives its hash."""
    shapes = synth(tmp_path / "shapes")
    assert folder_tar_names(local_files(shapes)) == local_files(shapes)
    assert folder_tar(shapes) == b"".join(tar_stream(local_files(shapes)))
    expected = hash_folder(shapes)[0]
    assert upload_pairs(registry, shapes, "shapes").sha256 == expected
    assert upload(registry, folder_tar(shapes), "tar", "shapes").sha256 == expected
    assert upload(registry, tar_of(shapes, prefix="shapes/"), "tar", "shapes").sha256 == expected


def test_only_a_folder_holding_nothing_but_one_folder_is_wrapped(tmp_path):
    one = tmp_path / "one"
    (one / "sub").mkdir(parents=True)
    (one / "sub" / "a.txt").write_text("a")
    (one / ".hidden").write_text("not part of the dataset")  # left out: the folder still holds one folder
    assert [rel for rel, _ in folder_tar_names(local_files(one))] == ["dataset/sub/a.txt"]
    (one / "b.txt").write_text("b")
    assert [rel for rel, _ in folder_tar_names(local_files(one))] == ["b.txt", "sub/a.txt"]
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.txt").write_text("a")  # one file: no folder to unwrap
    assert [rel for rel, _ in folder_tar_names(local_files(lone))] == ["a.txt"]
    assert folder_tar_names([]) == []


def test_the_client_uploads_such_a_folder_in_either_format(tmp_path, mem):
    from segsvc.datasets.archive import ExtractLimits
    from segsvc.jobs.batch import JobsConfig
    from tests.server.conftest import RunningServer, server_config

    root = tmp_path / "server"
    (root / "data").mkdir(parents=True)
    datasets = DatasetsConfig(root / "state", data_root=root / "data", limits=ExtractLimits())
    jobs = JobsConfig(state_dir=root / "jobs", output_root=root / "out")
    server = RunningServer(server_config(root / "repo", datasets=datasets, jobs=jobs))
    try:
        with server.client(timeout_s=60) as c:
            tar = c.upload_dataset(mem, "mem", dataset_yaml=DESCRIPTION)
            pairs = c.upload_dataset(mem, "mem", format="pairs", dataset_yaml=DESCRIPTION)
        assert tar.sha256 == pairs.sha256 == described(mem, tmp_path)[0]
    finally:
        server.close()
