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
            prefix: bytes = b"", name_bytes: int = 0) -> bytes:
    """A zip whose central directory lists ``entries`` 1-byte files all pointing at one local header
    (the reviewer's repro, smaller); its end record declares ``declared`` entries (default: the truth);
    each name is padded to ``name_bytes``."""
    declared = entries if declared is None else declared
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"x"
    cd = bytearray()
    for i in range(entries):
        name = (b"f%x" % i).ljust(name_bytes - 4, b"x") + b".png"
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


def test_a_zip_directory_too_large_for_its_entries_is_refused_before_zipfile_reads_it(tmp_path, no_zipfile):
    """zipfile reads the whole central directory into memory, then a name and extra field per entry: names
    of 64 KiB would let a 2 GiB upload of few entries cost several GiB. A record takes a few hundred bytes."""
    path = _write(tmp_path, _cd_zip(10, name_bytes=2100))  # 10 entries (of 20 allowed), 21 KiB of directory
    with pytest.raises(UploadError, match=r"central directory is 21460 bytes: more than 20480 bytes"):
        extract_archive(path, "zip", tmp_path / "out", LIMITS)


class _CountingStruct:
    """``archive._CENTRAL``, counting the central directory headers the walk unpacks."""

    def __init__(self, inner: struct.Struct) -> None:
        self.inner, self.size, self.unpacked = inner, inner.size, 0

    def unpack(self, data: bytes) -> tuple:
        self.unpacked += 1
        return self.inner.unpack(data)


def test_the_reviewers_million_entry_zip_is_refused_at_once(tmp_path, no_zipfile, monkeypatch):
    """From the end record's count: not one of its 200,000 directory headers is read (counted, not timed)."""
    central = _CountingStruct(archive._CENTRAL)
    monkeypatch.setattr(archive, "_CENTRAL", central)
    path = _write(tmp_path, _cd_zip(200_000))
    with pytest.raises(UploadError, match="the zip archive lists 200000 entries: more than 20 entries"):
        extract_archive(path, "zip", tmp_path / "out", LIMITS)
    assert central.unpacked == 0
    # The walk that follows a count understating the entries stops one past the limit.
    with pytest.raises(UploadError, match="more than 20 entries"):
        extract_archive(_write(tmp_path, _cd_zip(200_000, declared=3)), "zip", tmp_path / "out", LIMITS)
    assert central.unpacked == LIMITS.max_entries


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


# -- tar headers ------------------------------------------------------------------------------
@pytest.fixture
def tar_reads(monkeypatch) -> list:
    """The readers of the tars extracted: each one's ``produced`` is the tar bytes it let tarfile have."""
    readers = []

    class Counting(archive._BoundedReader):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            readers.append(self)

    monkeypatch.setattr(archive, "_BoundedReader", Counting)
    return readers


def _tar_with_header(kind: str, size: int, pad: int = 0, mode: str = "w") -> bytes:
    """A tar whose first entry comes with a ``kind`` header of about ``size`` bytes, then a file of ``pad``
    random bytes (incompressible: the archive is then large enough for the ratio check to pass)."""
    long = "x" * size
    buf = io.BytesIO()
    fmt = tarfile.GNU_FORMAT if kind.startswith("GNU") else tarfile.PAX_FORMAT
    with tarfile.open(fileobj=buf, mode=mode, format=fmt,
                      pax_headers={"comment": long} if kind == "global pax header" else None) as tar:
        info = tarfile.TarInfo("images/" + long if kind == "GNU long-name header" else "images/a.png")
        if kind == "pax header":
            info.pax_headers = {"comment": long}
        if kind == "GNU long-link header":
            info.type, info.linkname = tarfile.SYMTYPE, long
        tar.addfile(info)
        padding = tarfile.TarInfo("images/b.png")
        padding.size = pad
        tar.addfile(padding, io.BytesIO(os.urandom(pad)))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["pax header", "global pax header", "GNU long-name header",
                                  "GNU long-link header"])
def test_a_large_tar_metadata_header_is_refused_before_tarfile_reads_it(tmp_path, tar_reads, kind):
    """The reviewer's pax bomb, smaller: 4 MiB of header in a gzip tar that passes the ratio check."""
    path = _write(tmp_path, _tar_with_header(kind, 4 << 20, pad=64 << 10, mode="w:gz"), "tar.gz")
    assert (4 << 20) < ExtractLimits().expansion_cap(path.stat().st_size)
    with pytest.raises(UploadError, match=f"{kind} of .* bytes.*: more than (65536|1024) bytes"):
        extract_archive(path, "tar", tmp_path / "out", ExtractLimits())
    assert tar_reads[0].produced < 256 << 10  # the header block and a buffer or two, never the header's data


def test_tar_headers_are_not_kept_from_one_entry_to_the_next(tmp_path):
    """Many headers each under the limit: tarfile holds one entry's at a time, not all of them."""
    import tracemalloc

    names = [f"__MACOSX/._{i}" for i in range(100)] + ["images/a.png"]  # skipped names, one 60 KiB pax each
    tar = tar_with([(_pax_member(name, {"comment": "x" * (60 << 10)}), b"x") for name in names])
    path = _write(tmp_path, tar, "tar")
    tracemalloc.start()
    try:
        summary = extract_archive(path, "tar", tmp_path / "out", ExtractLimits(max_files=100))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.files == 1
    assert peak < len(tar) / 3, f"{peak} bytes held while reading a {len(tar)}-byte tar"


def _pax_member(name: str, pax: dict[str, str]) -> tarfile.TarInfo:
    info = member(name)
    info.pax_headers = pax
    return info


def test_global_pax_headers_share_one_small_budget(tmp_path):
    """tarfile keeps global headers to the end and copies them into every entry: a small budget for all."""
    blocks = b"".join(tarfile.TarInfo.create_pax_global_header({f"k{i}": "x" * 400}) for i in range(3))
    data = tar_with([(member("images/a.png"), b"x")])
    path = _write(tmp_path, blocks + data, "tar")
    with pytest.raises(UploadError, match="global pax header of 1.* bytes, all together: more than 1024 bytes"):
        extract_archive(path, "tar", tmp_path / "out", LIMITS)


def test_a_pax_sparse_map_is_refused_before_tarfile_reads_it(tmp_path, tar_reads):
    """GNU sparse 1.0 keeps its map in the file's data, which tarfile reads whole: sparse files are refused."""
    info = _pax_member("images/a.png", {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                        "GNU.sparse.realsize": "1"})
    sparse_map = b"1000000000\n" + b"0\n" * (2 << 20)
    path = _write(tmp_path, tar_with([(info, sparse_map)], mode="w:gz"), "tar.gz")
    with pytest.raises(UploadError, match="sparse"):
        extract_archive(path, "tar", tmp_path / "out", ExtractLimits(max_ratio=10_000))
    assert tar_reads[0].produced < 256 << 10


def test_the_tar_stream_is_bounded_by_the_dataset_limit_not_only_the_ratio(tmp_path, tar_reads):
    """A skipped entry's data counts toward no file, yet the tar may not grow past max_bytes plus headers."""
    limits = ExtractLimits(max_bytes=256 << 10, max_files=2, max_ratio=1000)
    tar = tar_with([(member("__MACOSX/._big"), bytes(16 << 20)), (member("images/a.png"), b"x")], mode="w:gz")
    path = _write(tmp_path, tar, "tar.gz")
    assert (16 << 20) < limits.expansion_cap(len(tar))  # the ratio alone lets it through
    with pytest.raises(UploadError, match="256 KiB|262144 bytes"):
        extract_archive(path, "tar", tmp_path / "out", limits)
    assert tar_reads[0].produced < 2 << 20


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_a_commit_id_in_a_tar_still_extract(tmp_path, fmt):
    """What real tools write: a pax or GNU long-name header for a long path, git archive's global header."""
    name = "images/" + "a" * 200 + ".png"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt, pax_headers={"comment": "0123abcd" * 5}) as tar:
        info = tarfile.TarInfo(name)
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    summary = extract_archive(_write(tmp_path, buf.getvalue(), "tar.gz"), "tar", tmp_path / "out", LIMITS)
    assert summary.files == 1 and (tmp_path / "out" / name).read_bytes() == b"hello"


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
