"""The registry: identity by content, validation with every problem, deterministic splits, confinement."""

from __future__ import annotations

import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import yaml

from segsvc import errors
from segsvc.data.io import write_png
from segsvc.data.layouts import index_split
from segsvc.data.spec import load_dataset_spec
from segsvc.datasets.archive import ExtractLimits
from segsvc.datasets.content import hash_folder, local_files, tar_stream
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from segsvc.datasets.split import split_fraction
from tests.datasets.helpers import assert_nothing_left, broken, flat, synth, tar_of, zip_of


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def registry(tmp_path, data_root):
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data_root))
    yield reg
    reg.close()


def upload(registry, data: bytes, fmt: str, name: str, **meta):
    up = registry.open_upload(name, fmt, **meta)
    up.write(data)
    return up.commit()


def upload_pairs(registry, folder, name: str, **meta):
    up = registry.open_upload(name, "pairs", **meta)
    for rel, path in local_files(folder):
        up.write(path.read_bytes(), rel, last=True)
    return up.commit()


def test_tar_zip_pairs_and_register_give_the_same_identity(registry, data_root):
    shapes = synth(data_root / "shapes")
    expected, files, size = hash_folder(shapes)
    a = upload(registry, tar_of(shapes, prefix="shapes/"), "tar", "a")
    assert (a.sha256, a.files, a.total_bytes) == (expected, files, size)
    # The same content again under the same name is the same dataset, whatever the format.
    assert upload(registry, zip_of(shapes), "zip", "a") == a
    assert upload_pairs(registry, shapes, "a") == a
    assert upload(registry, b"".join(tar_stream(local_files(shapes), chunk_bytes=1000)), "tar", "a") == a
    with pytest.raises(errors.AlreadyExists, match="registered as 'a'"):
        registry.register("shapes", name="b")
    registry.delete("a")
    assert registry.register("shapes").sha256 == expected
    assert_nothing_left(registry)


def test_a_dataset_records_what_training_needs(registry, data_root):
    shapes = synth(data_root / "shapes")
    d = upload(registry, tar_of(shapes), "tar", "shapes")
    assert d.source == "upload" and d.source_path == "tar" and d.format == "folder"
    assert d.class_names == ("background", "circle", "rectangle", "triangle", "ring")
    assert d.split_sizes == {"train": 6, "val": 2} and not d.split_assigned
    assert abs(sum(d.class_shares.values()) - 1.0) < 1e-9 and d.class_shares["background"] > 0.3
    spec = load_dataset_spec(d.spec_path)  # the contract with training jobs
    assert spec == d.load_spec() and spec.class_names == d.class_names and spec.name == "shapes"
    assert spec.root == (registry.root / d.sha256 / "data").resolve()
    assert [len(index_split(spec, s).samples) for s in ("train", "val")] == [6, 2]
    assert registry.get("shapes") == registry.get(d.sha256) == registry.get(d.sha256[:8].upper()) == d


def test_list_get_delete(registry, data_root):
    one = upload_pairs(registry, synth(data_root / "one"), "one")
    flat(data_root / "two", ["a", "b", "c"])
    two = registry.register("two/", name="two")
    assert [d.name for d in registry.list()] == ["one", "two"]
    assert two.source == "register" and two.source_path == "two"
    assert registry.delete(two.sha256[:10]) == two
    assert (data_root / "two" / "images" / "a.png").is_file()  # a registered folder is never touched
    assert registry.delete("one") == one and registry.list() == []
    for missing in ("one", one.sha256, "0000000000"):
        with pytest.raises(errors.NotFound):
            registry.get(missing)
    assert_nothing_left(registry)


def test_names_are_checked_and_unique(registry, data_root):
    synth(data_root / "s")
    for bad in ("", "-x", "a/b", "x" * 65, "a" * 64):
        with pytest.raises(errors.InvalidArgument):
            registry.open_upload(bad, "tar")
    registry.register("s", name="taken")
    flat(data_root / "other", ["a", "b"])
    with pytest.raises(errors.AlreadyExists, match="belongs to dataset"):
        registry.register("other", name="taken")
    assert_nothing_left(registry)


def test_a_broken_dataset_is_refused_with_every_problem_and_leaves_nothing(registry, data_root, tmp_path):
    folder = broken(data_root / "broken")
    for attempt in (lambda: upload(registry, tar_of(folder), "tar", "broken"),
                    lambda: upload_pairs(registry, folder, "broken"),
                    lambda: registry.register("broken")):
        with pytest.raises(errors.DatasetInvalid) as info:
            attempt()
        problems = sorted(info.value.problems)
        assert [(kind, path) for kind, path, _ in problems] == [
            ("image without mask", "images/lonely.png"),
            ("labels outside the classes", "masks/b.png"),
            ("mask without image", "masks/orphan.png"),
        ]
        assert "values 7 outside the classes" in problems[1][2]
        assert str(tmp_path) not in str(info.value) + repr(problems)  # no server paths in messages
        assert_nothing_left(registry)


def test_the_split_of_a_single_split_dataset_is_deterministic_and_stable(tmp_path, data_root):
    stems = [f"s{i:02d}" for i in range(30)]
    flat(data_root / "flat", stems)
    first = DatasetRegistry(DatasetsConfig(tmp_path / "one", data_root=data_root)).register("flat")
    assert first.split_assigned and sum(first.split_sizes.values()) == 30
    spec = first.load_spec()
    val = set(spec.splits["val"].ids)
    assert val == {s for s in stems if split_fraction(f"images/{s}.png") < 0.2}
    assert set(spec.splits["train"].ids) == set(stems) - val and 0 < len(val) < 30
    # Elsewhere, later, by upload: the same split.
    second = DatasetRegistry(DatasetsConfig(tmp_path / "two")).open_upload("flat", "tar")
    second.write(tar_of(data_root / "flat"))
    assert set(second.commit().load_spec().splits["val"].ids) == val
    # More samples: the old ones keep their split.
    flat(data_root / "more", stems + [f"t{i:02d}" for i in range(30)])
    more = DatasetRegistry(DatasetsConfig(tmp_path / "three", data_root=data_root)).register("more").load_spec()
    assert set(more.splits["val"].ids) & set(stems) == val


def test_a_tiny_dataset_still_gets_both_splits(registry, data_root):
    flat(data_root / "tiny", ["a", "b"])
    d = registry.register("tiny")
    assert d.split_sizes == {"train": 1, "val": 1}


def test_class_names_in_the_metadata_describe_a_bare_folder(registry, tmp_path):
    folder = flat(tmp_path / "bare", ["a", "b", "c"], classes=("bg", "fg"), yaml_file=False)
    with pytest.raises(errors.DatasetError, match="names no classes"):
        upload(registry, tar_of(folder), "tar", "bare")
    d = upload(registry, tar_of(folder), "tar", "bare", class_names=["bg", "fg"])
    assert d.class_names == ("bg", "fg") and d.split_assigned
    text = yaml.safe_dump({"format": "folder", "root": ".", "classes": ["bg", "fg"]})
    assert upload(registry, tar_of(folder), "tar", "bare2", dataset_yaml=text).class_names == ("bg", "fg")
    with pytest.raises(errors.InvalidArgument, match="holds its own dataset.yaml"):
        upload(registry, tar_of(flat(tmp_path / "full", ["a", "b"])), "tar", "x", class_names=["a", "b"])
    with pytest.raises(errors.UploadError, match="content hash mismatch"):
        upload(registry, tar_of(folder), "tar", "bare3", class_names=["bg", "fg"], sha256="0" * 64)
    assert_nothing_left(registry)


def test_class_names_for_a_folder_without_the_layout_do_not_show_server_folders(registry, tmp_path):
    folder = tmp_path / "pictures"
    write_png(folder / "pics" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(errors.DatasetError, match="not a dataset folder") as info:
        upload(registry, tar_of(folder), "tar", "pics", class_names=["bg", "fg"])
    assert str(tmp_path) not in str(info.value) and ".work-" not in str(info.value)
    assert_nothing_left(registry)


def _png_declaring(width: int, height: int) -> bytes:
    """A small grey PNG whose header declares ``width`` x ``height`` pixels (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_images_declaring_too_many_pixels_are_refused_before_they_are_decoded(tmp_path, monkeypatch):
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", limits=ExtractLimits(max_pixels=10_000)))
    folder = flat(tmp_path / "big", ["a", "b", "c"])
    write_png(folder / "images" / "a.png", np.zeros((200, 100, 3), np.uint8))  # 20 000 pixels: over
    write_png(folder / "masks" / "a.png", np.zeros((200, 100), np.uint8))
    (folder / "images" / "b.png").write_bytes(_png_declaring(40_000, 40_000))  # past OpenCV's own limit too
    decoded = []
    monkeypatch.setattr("segsvc.data.check.read_image", lambda path, **kw: decoded.append(path))
    with pytest.raises(errors.DatasetInvalid, match="3 problem") as info:
        upload(registry, tar_of(folder), "tar", "big")
    details = {path: detail for kind, path, detail in info.value.problems if kind == "unreadable file"}
    assert sorted(details) == ["images/a.png", "images/b.png", "masks/a.png"]
    assert details["images/b.png"].startswith("40000x40000 = 1600000000 pixels, over the server's limit of 10000")
    # refused from the headers: only the sample whose files passed is decoded, so one report lists every problem
    assert [path.name for path in decoded] == ["c.png"]
    assert_nothing_left(registry)
    # Another format under an image suffix: OpenCV decodes a PGM whatever the suffix, past any PNG header check.
    (folder / "images" / "b.png").write_bytes(b"P5\n40000 40000\n255\n" + bytes(64))
    with pytest.raises(errors.DatasetInvalid, match="3 problem") as info:
        upload(registry, tar_of(folder), "tar", "big")
    assert "images/b.png" in {path for _, path, _ in info.value.problems}
    assert [path.name for path in decoded] == ["c.png", "c.png"]
    monkeypatch.undo()
    (folder / "images" / "b.png").unlink()
    (folder / "masks" / "b.png").unlink()
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state2", limits=ExtractLimits(max_pixels=20_000)))
    assert upload(registry, tar_of(folder), "tar", "big").files == 5  # at the limit: accepted


def test_descriptions_and_lists_too_long_for_the_dataset_are_refused_before_they_are_read(tmp_path, monkeypatch):
    """A split list of a million lines in an 8 MB upload took a minute and 900 MB to index (one problem per
    line), and a dataset.yaml is parsed whole by PyYAML: both are bounded by the dataset's file limit."""
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", limits=ExtractLimits(max_files=10)))
    folder = flat(tmp_path / "listed", ["a", "b"])
    layout = {"images": "images", "masks": "masks"}
    description = {"format": "folder", "root": ".", "classes": ["bg", "fg"],
                   "splits": {"train": {**layout, "list": "train.txt"}, "val": {**layout, "ids": ["a"]}}}
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description))
    monkeypatch.setattr("segsvc.datasets.registry.validate", lambda *a, **k: pytest.fail("the lists were indexed"))
    (folder / "train.txt").write_text("# 20 stems\n" + "".join(f"s{i}\n\n" for i in range(20)))  # + val's 1 > 2 x 10
    with pytest.raises(errors.DatasetError, match="more than 20 samples .* the server's limit: 10 files"):
        upload(registry, tar_of(folder), "tar", "listed")
    (folder / "train.txt").write_text("a\n" + "\n" * 30_000)  # blank lines are no samples, but bytes all the same
    with pytest.raises(errors.DatasetError, match=r"split list 'train.txt' is 30002 bytes: more than \d+"):
        upload(registry, tar_of(folder), "tar", "listed")
    (folder / "train.txt").write_text("a\nb\n")
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description) + "#" * (8 << 20) + "\n")
    with pytest.raises(errors.DatasetError, match="dataset.yaml is .* bytes: more than"):
        upload(registry, tar_of(folder), "tar", "listed")
    assert_nothing_left(registry)
    monkeypatch.undo()
    (folder / "dataset.yaml").write_text(yaml.safe_dump(description))
    assert upload(registry, tar_of(folder), "tar", "listed").split_sizes == {"train": 2, "val": 1}


def test_a_description_given_twice_is_refused_before_the_files_are_sent(registry):
    text = yaml.safe_dump({"format": "folder", "root": ".", "classes": ["bg", "fg"]})
    with pytest.raises(errors.InvalidArgument, match="either in dataset_yaml or as class_names"):
        registry.open_upload("x", "tar", dataset_yaml=text, class_names=["bg", "fg"])
    assert_nothing_left(registry)


def test_a_dataset_without_samples_is_refused_not_registered(registry, tmp_path):
    """Images in a format the layout does not read (or one folder too deep) made a split of 0 samples, and the
    upload succeeded: a dataset nothing can train on, registered without a word."""
    folder = tmp_path / "gifs"
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True)
        (folder / kind / "a.gif").write_bytes(b"GIF89a")
    flat(folder, [])  # its dataset.yaml
    with pytest.raises(errors.DatasetInvalid, match="1 problem") as info:
        upload(registry, tar_of(folder), "tar", "gifs")
    [(kind, subject, detail)] = info.value.problems
    assert (kind, subject) == ("layout", "images") and detail.startswith("split 'train' has no samples"), detail
    assert_nothing_left(registry)


def test_an_uploaded_yaml_cannot_point_at_server_files(registry, tmp_path):
    folder = flat(tmp_path / "evil", ["a", "b"])
    for evil in ({"root": str(tmp_path)}, {"root": "${datasets}/camvid"}, {"root": ".."},
                 {"root": ".", "splits": {"train": {"images": "../../..", "masks": "masks"}}},
                 {"root": ".", "splits": {"train": {"images": "images", "masks": "masks", "list": "../../../x.txt"}}}):
        (folder / "dataset.yaml").write_text(yaml.safe_dump({"format": "folder", "classes": ["bg", "fg"], **evil}))
        with pytest.raises(errors.PathOutsideRoot, match="leads outside the dataset"):
            upload(registry, tar_of(folder), "tar", "evil")
        assert_nothing_left(registry)


def test_a_metadata_yaml_loses_its_root_so_a_builtin_spec_can_be_sent_as_is(registry, tmp_path):
    """The description sent next to an upload says where the files were on the uploader's machine;
    on the server the upload is the root, so its ``root`` (here one outside the dataset) becomes ``.``."""
    folder = flat(tmp_path / "bare", ["a", "b", "c"], yaml_file=False)
    text = yaml.safe_dump({"format": "folder", "root": str(tmp_path), "classes": ["bg", "fg"]})
    d = upload(registry, tar_of(folder), "tar", "described", dataset_yaml=text)
    assert d.class_names == ("bg", "fg") and sum(d.split_sizes.values()) == 3
    assert d.load_spec().root.resolve().is_relative_to(d.spec_path.parent.resolve())


def test_register_is_confined_to_the_data_root(registry, data_root, tmp_path):
    outside = flat(tmp_path / "outside", ["a", "b"])
    inside = flat(data_root / "inside", ["a", "b"])
    os.symlink(outside, data_root / "link-out")
    (data_root / "mixed").mkdir()
    shutil.copytree(inside / "images", data_root / "mixed" / "images")
    shutil.copy(inside / "dataset.yaml", data_root / "mixed" / "dataset.yaml")
    os.symlink(outside / "masks", data_root / "mixed" / "masks")  # one folder leads out
    os.symlink(outside / "images" / "a.png", inside / "images" / "c.png")  # one file leads out
    for path, error in (("../outside", errors.PathOutsideRoot), (str(outside), errors.PathOutsideRoot),
                        ("link-out", errors.PathOutsideRoot), ("mixed", errors.PathOutsideRoot),
                        ("inside", errors.PathOutsideRoot), ("missing", errors.InvalidArgument),
                        ("in*", errors.InvalidArgument)):
        with pytest.raises(error):
            registry.register(path, name="x")
        assert_nothing_left(registry)
    (inside / "images" / "c.png").unlink()
    os.symlink(data_root / "inside" / "images" / "a.png", inside / "images" / "c.png")  # inside: fine
    write_png(inside / "masks" / "c.png", np.zeros((8, 8), np.uint8))
    assert registry.register("inside").split_sizes == {"train": 2, "val": 1}


def test_a_nul_character_in_a_registered_path_is_refused_by_name(registry, data_root):
    synth(data_root / "shapes")
    with pytest.raises(errors.InvalidArgument, match="NUL character"):
        registry.register("shapes\x00/x", name="x")
    assert_nothing_left(registry)


def test_register_needs_a_data_root(tmp_path):
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state"))
    with pytest.raises(errors.FailedPrecondition, match="--data-root"):
        registry.register("x")


def test_leftovers_of_a_crash_are_removed_at_start(tmp_path, data_root):
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data_root))
    synth(data_root / "s")
    kept = registry.register("s")
    registry.close()
    for leftover in (".work-0123456789abcdef", ".deleting-abc", "f" * 64):
        (registry.root / leftover / "data").mkdir(parents=True)
    reopened = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data_root))
    assert [d.sha256 for d in reopened.list()] == [kept.sha256]
    assert_nothing_left(reopened)


CHANGED = "changed since it was registered (or a link now leads outside the data root): register it again"


def test_a_folder_registered_in_place_is_checked_again_with_the_same_walk_and_hash(registry, data_root, tmp_path,
                                                                                  monkeypatch):
    """What a training job calls at its start: a registered folder must still hash to its identity, through the
    confined walk (a file replaced by a link leading outside the data root is refused, whatever it holds)."""
    synth(data_root / "shapes")
    shapes = registry.register("shapes")
    assert registry.check_unchanged("shapes") == shapes  # untouched
    val = sorted((data_root / "shapes" / "images" / "val").glob("*.png"))
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    shutil.copy(val[0], secret)  # the very same bytes: only the walk can tell
    val[0].unlink()
    os.symlink(secret, val[0])
    with pytest.raises(errors.FailedPrecondition) as info:
        registry.check_unchanged(shapes.sha256)
    assert str(info.value) == f"dataset 'shapes' {CHANGED}" and str(tmp_path) not in str(info.value)
    val[0].unlink()
    shutil.copy(secret, val[0])
    assert registry.check_unchanged("shapes") == shapes  # back as registered
    write_png(val[1], np.zeros((32, 32, 3), np.uint8))  # other content, no link
    with pytest.raises(errors.FailedPrecondition, match="changed since it was registered"):
        registry.check_unchanged("shapes")
    shutil.rmtree(data_root / "shapes")
    with pytest.raises(errors.FailedPrecondition, match="changed since it was registered"):
        registry.check_unchanged("shapes")
    # An uploaded dataset is a copy in the state folder: it is not walked again.
    other = upload(registry, tar_of(flat(tmp_path / "up", ["a", "b", "c"]), prefix="up/"), "tar", "up")
    monkeypatch.setattr("segsvc.datasets.registry.registered_files",
                        lambda *a, **k: pytest.fail("an upload was walked again"))
    assert registry.check_unchanged("up") == other
    with pytest.raises(errors.NotFound):
        registry.check_unchanged("f" * 64)
