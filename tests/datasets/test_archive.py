"""Hostile uploads are refused, and a refused upload leaves nothing: no folder, no row."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from segsvc.datasets.archive import RATIO_FLOOR_BYTES, ExtractLimits, entry_name
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from segsvc.errors import UploadError
from tests.datasets.helpers import assert_nothing_left, member, synth, tar_of, tar_with, zip_of


@pytest.fixture
def registry(tmp_path):
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", limits=ExtractLimits(max_bytes=64 << 20, max_files=200,
                                                                                  max_ratio=20)))
    yield reg
    reg.close()


def upload(registry: DatasetRegistry, data: bytes, fmt: str = "tar", name: str = "ds", chunk: int = 1 << 16):
    up = registry.open_upload(name, fmt)
    for i in range(0, len(data), chunk):
        up.write(data[i:i + chunk])
    return up.commit()


def refused(registry: DatasetRegistry, data: bytes, match: str, fmt: str = "tar") -> None:
    with pytest.raises(UploadError, match=match):
        upload(registry, data, fmt)
    assert_nothing_left(registry)
    assert registry.list() == []


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("synth") / "shapes")


def test_a_clean_archive_is_accepted(registry, shapes):
    dataset = upload(registry, tar_of(shapes, prefix="shapes/"))
    assert dataset.files == 17 and dataset.split_sizes == {"train": 6, "val": 2}
    assert [d.sha256 for d in registry.list()] == [dataset.sha256]
    assert_nothing_left(registry)


@pytest.mark.parametrize("name, match", [
    ("../evil.png", "climbs out"),
    ("images/../../evil.png", "climbs out"),
    ("/etc/evil.png", "absolute"),
    ("C:/evil.png", "absolute"),
    ("images\\evil.png", "backslash"),
    ("images//evil.png", "empty"),
    ("images/./evil.png", "empty or '.'"),
])
def test_unsafe_names_are_refused(registry, shapes, name, match):
    good = tarfile.open(fileobj=io.BytesIO(tar_of(shapes)))
    members = [(m, good.extractfile(m).read()) for m in good.getmembers()]
    refused(registry, tar_with([*members, (member(name), b"x")]), match)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for m, data in members:
            zf.writestr(m.name, data)
        zf.writestr(name, b"x")
    refused(registry, buf.getvalue(), match, fmt="zip")


@pytest.mark.parametrize("kind, linkname, match", [
    (tarfile.SYMTYPE, "/etc/passwd", "symlink"),
    (tarfile.SYMTYPE, "../../outside", "symlink"),
    (tarfile.LNKTYPE, "images/train/000000.png", "hard link"),
    (tarfile.CHRTYPE, "", "device"),
    (tarfile.BLKTYPE, "", "device"),
    (tarfile.FIFOTYPE, "", "FIFO"),
])
def test_links_devices_and_fifos_in_a_tar_are_refused(registry, shapes, kind, linkname, match):
    good = tarfile.open(fileobj=io.BytesIO(tar_of(shapes)))
    members = [(m, good.extractfile(m).read()) for m in good.getmembers()]
    refused(registry, tar_with([*members, (member("images/train/link.png", kind, linkname), b"")]), match)
    # hidden from the dataset by its name, still refused
    refused(registry, tar_with([*members, (member(".hidden", kind, linkname), b"")]), match)


def _zip_entry(name: str, mode: int, data: bytes = b"") -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize("mode, match", [(0o120777, "symlink"), (0o020644, "device"), (0o010644, "FIFO")])
def test_links_devices_and_fifos_in_a_zip_are_refused(registry, shapes, mode, match):
    buf = io.BytesIO(zip_of(shapes))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr(_zip_entry("images/train/link.png", mode), b"/etc/passwd")
    refused(registry, buf.getvalue(), match, fmt="zip")


def test_duplicate_names_and_file_folder_clashes_are_refused(registry, shapes):
    good = tarfile.open(fileobj=io.BytesIO(tar_of(shapes)))
    members = [(m, good.extractfile(m).read()) for m in good.getmembers()]
    refused(registry, tar_with([*members, members[0]]), "appears twice")
    refused(registry, tar_with([*members, (member("dataset.yaml/x.png"), b"x")]), "needs a folder where file")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for m, data in members:
            zf.writestr(m.name, data)
        zf.writestr("./" + members[0][0].name, b"other bytes")  # the same name once normalised
    refused(registry, buf.getvalue(), "appears twice", fmt="zip")


def test_a_zip_bomb_is_refused_from_its_headers(registry):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images/bomb.png", bytes(RATIO_FLOOR_BYTES + (8 << 20)))  # 9 MiB of zeros -> ~9 KiB
    refused(registry, buf.getvalue(), "decompression bomb", fmt="zip")


def test_a_zip_that_lies_about_its_sizes_is_refused_while_extracting(registry):
    payload = bytes(4 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images/a.png", payload)
    data = bytearray(buf.getvalue())
    # Rewrite the declared uncompressed size (local header and central directory) to 1000 bytes:
    # the headers now claim a harmless ratio.
    true_size = len(payload).to_bytes(4, "little")
    for offset in [i for i in range(len(data) - 4) if data[i:i + 4] == true_size]:
        data[offset:offset + 4] = (1000).to_bytes(4, "little")
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        assert zf.getinfo("images/a.png").file_size == 1000
    refused(registry, bytes(data), "larger than its header|Bad CRC|not a valid zip", fmt="zip")


def test_a_compressed_tar_bomb_is_refused_while_decompressing(registry):
    big = tar_with([(member("images/a.png"), bytes(RATIO_FLOOR_BYTES + (8 << 20)))], mode="w:gz")
    refused(registry, big, "decompression bomb")


def test_too_many_files_are_refused(tmp_path, shapes):
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", limits=ExtractLimits(max_files=10)))
    refused(registry, tar_of(shapes), "more than 10 files")
    refused(registry, zip_of(shapes), "more than 10 files", fmt="zip")
    up = registry.open_upload("ds", "pairs")
    with pytest.raises(UploadError, match="more than 10 files"):
        for i in range(11):
            up.write(b"x", f"images/{i}.png", last=True)
    assert_nothing_left(registry)


def test_too_many_bytes_are_refused_before_they_are_written(tmp_path, shapes):
    limits = ExtractLimits(max_bytes=20_000, max_ratio=1000)
    registry = DatasetRegistry(DatasetsConfig(tmp_path / "state", limits=limits))
    tar = tar_of(shapes)
    assert len(tar) > limits.max_bytes
    up = registry.open_upload("ds", "tar")
    up.write(tar[:15_000])
    with pytest.raises(UploadError, match="larger than 20000 bytes"):
        up.write(tar[15_000:25_000])  # refused whole: the spool never passes the limit
    assert_nothing_left(registry)
    # Small when compressed, too large when extracted: counted while extracting.
    refused(registry, tar_with([(member("images/a.png"), bytes(30_000))], mode="w:gz"), "larger than 20000 bytes")
    up = registry.open_upload("ds", "pairs")
    up.write(bytes(15_000), "images/a.png", last=False)
    with pytest.raises(UploadError, match="larger than 20000 bytes"):
        up.write(bytes(6_000), "images/a.png", last=True)
    assert_nothing_left(registry)


def test_garbage_and_empty_archives_are_refused(registry):
    refused(registry, b"this is not an archive" * 100, "not a valid tar")
    refused(registry, b"PK\x03\x04 nope", "not a valid zip", fmt="zip")
    refused(registry, tar_with([(member(".DS_Store"), b"x")]), "holds no dataset files")


def test_a_corrupt_bzip2_stream_is_refused_as_such(registry, shapes):
    """bz2 reports corrupt data as a plain OSError (not a tarfile or zipfile error): it failed as INTERNAL."""
    import bz2

    refused(registry, b"BZh91AY&SY" + bytes(range(256)) * 8, "not a valid tar archive: Invalid data stream")
    data = bytearray(bz2.compress(tar_of(shapes)))
    data[len(data) // 2] ^= 0xFF
    refused(registry, bytes(data), "not a valid tar archive")


def test_entry_names():
    assert entry_name("./images/a.png") == "images/a.png"
    assert entry_name("images/") == "images"
    assert entry_name("./") is None and entry_name(".") is None
    assert entry_name("__MACOSX/images/._a.png") is None and entry_name("images/.DS_Store") is None
    with pytest.raises(UploadError, match="NUL"):
        entry_name("a\x00b")


def test_bytes_beyond_a_declared_size_are_never_written(tmp_path):
    """Whatever a decompressor yields, an entry stops at its declared size (the second line of defence)."""
    from segsvc.datasets.archive import _copy, _Tree

    tree = _Tree(ExtractLimits())
    with pytest.raises(UploadError, match="larger than its header says"):
        _copy(io.BytesIO(bytes(3 << 20)), tmp_path, "a.png", 1000, tree)
    assert tree.total_bytes <= (1 << 20)  # refused at the first chunk past the declared size
