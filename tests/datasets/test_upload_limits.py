"""What an upload may cost the server: concurrent uploads, disk, class names; and how odd input fails."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from segsvc import errors
from segsvc.data.io import write_png
from segsvc.datasets.content import local_files
from segsvc.datasets.ingest import MAX_CLASSES
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from tests.datasets.helpers import assert_nothing_left, flat, tar_of, zip_of


def _registry(tmp_path, **config) -> DatasetRegistry:
    return DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=tmp_path / "data", **config))


def _work_folders(registry: DatasetRegistry) -> list[str]:
    return sorted(p.name for p in registry.root.iterdir() if p.name.startswith(".work-"))


@pytest.fixture
def registry(tmp_path):
    (tmp_path / "data").mkdir()
    reg = _registry(tmp_path)
    yield reg
    reg.close()


# -- 1. concurrent uploads and the disk quota ------------------------------------------------
def test_concurrent_uploads_are_bounded_and_a_finished_one_frees_its_slot(tmp_path):
    registry = _registry(tmp_path, max_concurrent_uploads=2)
    first = registry.open_upload("a", "tar")
    second = registry.open_upload("b", "pairs")
    with pytest.raises(errors.Overloaded, match=r"2 dataset uploads .*--max-dataset-uploads"):
        registry.open_upload("c", "tar")
    assert len(_work_folders(registry)) == 2  # the refused one made nothing
    first.abort()
    second.write(b"x", "images/a.png", last=True)
    with pytest.raises(errors.InvalidArgument):
        second.commit()  # a failed commit frees its slot too (no classes: refused)
    folder = flat(tmp_path / "ok", ["a", "b"])
    third = registry.open_upload("ok", "tar")
    third.write(tar_of(folder))
    assert third.commit().files == 5
    assert registry.open_upload("d", "tar") is not None  # a committed upload freed its slot


def test_the_disk_quota_counts_stored_datasets_and_uploads_in_flight(tmp_path):
    folder = flat(tmp_path / "ok", ["a", "b"])
    data = tar_of(folder)
    stored = sum(p.stat().st_size for _, p in local_files(folder))
    assert len(data) > stored
    # The peak of one upload: its archive, and its files extracted beside it.
    registry = _registry(tmp_path, max_disk_bytes=len(data) + stored)
    up = registry.open_upload("one", "tar")
    up.write(data)
    assert up.commit().total_bytes == stored
    second = registry.open_upload("two", "tar")
    second.write(data)  # the stored dataset and this archive fit; its files extracted beside them do not
    with pytest.raises(errors.Overloaded, match=r"datasets folder .*\(--max-datasets-disk-mb\)"):
        second.commit()
    assert_nothing_left(registry)
    # In-flight bytes count too: two uploads that each fit alone do not fit together.
    registry.delete("one")
    a, b = registry.open_upload("a", "tar"), registry.open_upload("b", "tar")
    a.write(data)
    with pytest.raises(errors.Overloaded, match="datasets folder"):
        b.write(data)
    assert len(_work_folders(registry)) == 1  # b's temp folder went with the refusal
    assert a.commit().total_bytes == stored
    assert_nothing_left(registry)


def test_the_quota_bounds_the_extracted_files_too(tmp_path):
    """A zip is spooled, then extracted next to itself: both count until the archive is removed."""
    folder = flat(tmp_path / "ok", ["a", "b"])
    data = zip_of(folder)
    registry = _registry(tmp_path, max_disk_bytes=len(data) + 100)  # the archive fits, its files do not
    up = registry.open_upload("z", "zip")
    up.write(data)
    with pytest.raises(errors.Overloaded, match="datasets folder"):
        up.commit()
    assert_nothing_left(registry)


def test_a_full_quota_refuses_a_new_upload_before_it_starts(tmp_path):
    folder = flat(tmp_path / "ok", ["a", "b"])
    stored = sum(p.stat().st_size for _, p in local_files(folder))
    registry = _registry(tmp_path, max_disk_bytes=stored)
    up = registry.open_upload("one", "pairs")
    for rel, path in local_files(folder):
        up.write(path.read_bytes(), rel, last=True)
    up.commit()
    with pytest.raises(errors.Overloaded, match="datasets folder"):
        registry.open_upload("two", "tar")
    assert_nothing_left(registry)


def test_upload_limits_must_be_positive(tmp_path):
    for field in ("max_concurrent_uploads", "upload_idle_s", "max_disk_bytes"):
        with pytest.raises(errors.InvalidArgument, match=field):
            DatasetsConfig(tmp_path, **{field: 0})


# -- 2. class names --------------------------------------------------------------------------
def test_class_names_are_bounded_in_the_metadata_and_in_dataset_yaml(registry, tmp_path):
    many = [f"c{i}" for i in range(MAX_CLASSES + 1)]
    with pytest.raises(errors.InvalidArgument, match=f"{MAX_CLASSES + 1} class names: more than {MAX_CLASSES}"):
        registry.open_upload("many", "tar", class_names=many)
    folder = flat(tmp_path / "many", ["a", "b"])
    description = {"format": "folder", "root": ".", "classes": many, "ignore_index": None}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description))
    up = registry.open_upload("many", "tar")
    up.write(tar_of(folder))
    with pytest.raises(errors.DatasetError, match=f"{MAX_CLASSES + 1} classes: more than {MAX_CLASSES}"):
        up.commit()
    assert_nothing_left(registry)
    (folder / "dataset.yaml").write_text(yaml.safe_dump({**description, "classes": many[:MAX_CLASSES]}))
    up = registry.open_upload("many", "tar")
    up.write(tar_of(folder))
    assert len(up.commit().class_names) == MAX_CLASSES


# -- 3. names that differ only in case --------------------------------------------------------
def test_a_name_differing_only_in_case_is_already_taken(registry, tmp_path):
    one, other = flat(tmp_path / "one", ["a", "b"]), flat(tmp_path / "two", ["a", "b", "c"])
    up = registry.open_upload("Shapes", "tar")
    up.write(tar_of(one))
    first = up.commit()
    up = registry.open_upload("shapes", "tar")
    up.write(tar_of(other))
    with pytest.raises(errors.AlreadyExists, match="'shapes' differs only in case from dataset 'Shapes'"):
        up.commit()
    assert registry.list() == [first]
    assert_nothing_left(registry)


def test_archive_names_differing_only_in_case_are_refused_on_any_filesystem(registry, tmp_path):
    folder = flat(tmp_path / "case", ["a", "b"])
    write_png(folder / "images" / "A.png", np.zeros((8, 8, 3), np.uint8))
    for fmt, data in (("tar", tar_of(folder)), ("zip", zip_of(folder))):
        up = registry.open_upload("case", fmt)
        up.write(data)
        with pytest.raises(errors.UploadError, match="'images/a.png' and 'images/A.png' differ only in case"):
            up.commit()
    up = registry.open_upload("case", "pairs")
    up.write(b"x", "images/A.png", last=True)
    with pytest.raises(errors.UploadError, match="differ only in case"):
        up.write(b"x", "images/a.png", last=True)
    assert_nothing_left(registry)


# -- 4. unexpected input inside ingestion ------------------------------------------------------
def test_an_absolute_split_folder_is_a_clear_error_not_an_internal_one(registry, tmp_path):
    """``images: /srv/data/shapes/images`` through a symlinked data root resolves inside the dataset, and
    assigning the split called ``relative_to`` on it: a ValueError, INTERNAL over gRPC."""
    folder = flat(tmp_path / "data" / "shapes", ["a", "b", "c"])
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path / "data")
    description = {"format": "folder", "root": ".", "classes": ["bg", "fg"],
                   "splits": {"all": {"images": str(alias / "shapes" / "images"), "masks": "masks"}}}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description))
    with pytest.raises(errors.DatasetError, match="split 'all' images is an absolute path: give it relative"):
        registry.register("shapes")
    up = registry.open_upload("shapes", "tar")
    up.write(tar_of(folder))
    with pytest.raises(errors.DatasetError, match="is an absolute path") as info:
        up.commit()
    assert str(tmp_path) not in str(info.value)  # the server's folders are not shown
    assert_nothing_left(registry)
    description["splits"]["all"]["images"] = "../shapes/images"  # relative, through its parent: fine
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description))
    assert sum(registry.register("shapes").split_sizes.values()) == 3


def test_an_unexpected_error_in_ingestion_leaves_no_files(registry, tmp_path, monkeypatch):
    folder = flat(tmp_path / "data" / "shapes", ["a", "b"])

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("segsvc.datasets.registry.write_training_spec", boom)
    for fmt, data in (("tar", tar_of(folder)), ("zip", zip_of(folder))):
        up = registry.open_upload("x", fmt)
        up.write(data)
        with pytest.raises(RuntimeError):
            up.commit()
        assert_nothing_left(registry)
    with pytest.raises(RuntimeError):
        registry.register("shapes")
    assert_nothing_left(registry)
    monkeypatch.setattr("segsvc.datasets.upload.Spool", boom)  # the upload fails as it opens
    with pytest.raises(RuntimeError):
        registry.open_upload("x", "tar")
    assert_nothing_left(registry)
    monkeypatch.undo()
    for i in range(registry.config.max_concurrent_uploads):  # no slot was kept by the failures
        registry.open_upload(f"x{i}", "tar")
