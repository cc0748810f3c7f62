"""What an upload may cost before it is refused: a zip's entry count is read from its end records before
``zipfile`` parses anything, every entry counts (folders and skipped names too), and a pairs upload holds
a small, fixed number of open files however many it leaves unfinished."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from segsvc.datasets import archive
from segsvc.datasets.archive import MAX_OPEN_FILES, ExtractLimits, PairsWriter, extract_archive
from segsvc.errors import UploadError
from tests.datasets.helpers import member, tar_with

LIMITS = ExtractLimits(max_bytes=64 << 20, max_files=10)  # at most 20 entries (2 per file)


def _cd_zip(entries: int, declared: int | None = None, zip64: bool = True, comment: bytes = b"",
            prefix: bytes = b"") -> bytes:
    """A zip whose central directory lists ``entries`` 1-byte files all pointing at one local header
    (the reviewer's repro, smaller); its end record declares ``declared`` entries (default: the truth)."""
    declared = entries if declared is None else declared
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"x"
    cd = bytearray()
    for i in range(entries):
        name = b"f%x.png" % i
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0,
                          0, 0) + name
    cd_off, cd_size = len(prefix) + len(local), len(cd)
    if zip64:
        eocd64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, declared, declared, cd_size, cd_off)
        loc = struct.pack("<IIQI", 0x07064B50, 0, cd_off + cd_size, 1)
        eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
        tail = eocd64 + loc + eocd
    else:
        tail = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, declared & 0xFFFF, declared & 0xFFFF, cd_size, cd_off,
                           len(comment))
    return prefix + local + bytes(cd) + tail + comment


@pytest.fixture
def no_zipfile(monkeypatch):
    """Fail the test if zipfile parses the central directory (the refusal must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("zipfile.ZipFile was built before the entry count was checked")
    monkeypatch.setattr(archive.zipfile, "ZipFile", refuse)


def _write(tmp_path: Path, data: bytes, suffix: str = "zip") -> Path:
    path = tmp_path / f"upload.{suffix}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("zip64", [True, False])
def test_a_zip_declaring_too_many_entries_is_refused_before_zipfile_reads_them(tmp_path, no_zipfile, zip64):
    path = _write(tmp_path, _cd_zip(5000, zip64=zip64, comment=b"hello"))
    with pytest.raises(UploadError, match="5000 entries: more than 20 entries"):
        extract_archive(path, "zip", tmp_path / "out", LIMITS)


def test_a_zip_whose_end_record_understates_its_entries_is_refused_after_at_most_the_limit(tmp_path, no_zipfile):
    path = _write(tmp_path, _cd_zip(5000, declared=3))
    with pytest.raises(UploadError, match="more than 20 entries"):
        extract_archive(path, "zip", tmp_path / "out", LIMITS)


def test_the_reviewers_million_entry_zip_is_refused_at_once(tmp_path, no_zipfile):
    import time
    path = _write(tmp_path, _cd_zip(200_000))
    start = time.process_time()
    with pytest.raises(UploadError, match="200000 entries"):
        extract_archive(path, "zip", tmp_path / "out", LIMITS)
    assert time.process_time() - start < 0.05


def _real_zip(names: list[str], comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, b"data")
        zf.comment = comment
    return buf.getvalue()


def test_folder_entries_count_against_the_limit(tmp_path):
    names = [f"d{i}/" for i in range(30)] + ["images/a.png"]
    with pytest.raises(UploadError, match="more than 20 entries"):
        extract_archive(_write(tmp_path, _real_zip(names)), "zip", tmp_path / "zout", LIMITS)
    tar = tar_with([(member(f"d{i}", tarfile.DIRTYPE), b"") for i in range(30)] + [(member("images/a.png"), b"x")])
    with pytest.raises(UploadError, match="more than 20 entries"):
        extract_archive(_write(tmp_path, tar, "tar"), "tar", tmp_path / "tout", LIMITS)


def test_skipped_entries_count_too(tmp_path):
    names = ["images/a.png"] + [f"__MACOSX/._{i}" for i in range(30)]
    with pytest.raises(UploadError, match="more than 20 entries"):
        extract_archive(_write(tmp_path, _real_zip(names)), "zip", tmp_path / "out", LIMITS)


def test_a_full_dataset_with_folders_and_macos_companions_still_fits(tmp_path):
    """max_files files, a folder entry and a __MACOSX companion per file: the 2-per-file budget holds them."""
    files = [f"images/{i}.png" for i in range(5)] + [f"masks/{i}.png" for i in range(5)]
    names = ["images/", "masks/"] + files + [f"__MACOSX/._{i}" for i in range(8)]
    data = b"PK-prefix-of-a-self-extractor" + _real_zip(names, comment=b"made on a Mac")
    summary = extract_archive(_write(tmp_path, data), "zip", tmp_path / "out", LIMITS)
    assert summary.files == 10 and (tmp_path / "out" / "masks" / "4.png").read_bytes() == b"data"


def test_a_garbage_zip_is_refused_as_such(tmp_path):
    with pytest.raises(UploadError, match="not a valid zip archive"):
        extract_archive(_write(tmp_path, b"PK\x05\x06" + b"\x00" * 10), "zip", tmp_path / "out", LIMITS)


# -- pairs ------------------------------------------------------------------------------------
def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_unfinished_pairs_files_hold_a_bounded_number_of_descriptors(tmp_path):
    writer = PairsWriter(tmp_path, ExtractLimits(max_files=100_000))
    before = _fds()
    names = [f"images/{i}.png" for i in range(MAX_OPEN_FILES * 4)]
    try:
        for round_ in range(3):  # interleaved: a chunk of every file, three times over
            for name in names:
                writer.write(name, b"%d," % round_, last=round_ == 2)
                assert _fds() - before <= MAX_OPEN_FILES
        assert writer.finish().files == len(names)
    finally:
        writer.close()
    assert _fds() == before
    assert all((tmp_path / name).read_bytes() == b"0,1,2," for name in names)


def test_a_pairs_file_reopened_for_its_next_chunk_is_still_never_followed_through_a_link(tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    writer = PairsWriter(dest, ExtractLimits())
    names = [f"images/{i}.png" for i in range(MAX_OPEN_FILES + 1)]
    for name in names:
        writer.write(name, b"a", last=False)
    target = tmp_path / "outside"
    target.write_bytes(b"")
    (dest / names[0]).unlink()  # the first file was closed to make room; swap it for a link
    (dest / names[0]).symlink_to(target)
    with pytest.raises(UploadError, match="changed"):
        writer.write(names[0], b"b", last=True)
    writer.close()
    assert target.read_bytes() == b""
