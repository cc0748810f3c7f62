"""Untrusted uploads -> files in a fresh folder, within limits, or nothing.

An uploaded dataset arrives as a tar or zip archive, or as its files one by
one ("pairs"). Everything here assumes the bytes are hostile:

- Sizes are checked *before* writing: the spooled archive, each file of a pairs
  upload and the extracted total never pass ``max_bytes``, nor the file count
  ``max_files``. Every entry of an archive counts against ``max_entries``
  (``ENTRIES_PER_FILE`` per allowed file): files, folders and skipped names
  alike. A zip's entries are counted from its end records and its central
  directory's record headers *before* ``zipfile`` builds anything, so a
  central directory of a million entries costs nothing to refuse; nor does one
  over ``ZIP_BYTES_PER_ENTRY`` bytes per allowed entry (huge names or extra fields).
- A pairs upload keeps at most ``MAX_OPEN_FILES`` of its unfinished files open;
  the others are reopened (append, no symlink, same inode and size) for their
  next chunk, so a client cannot exhaust the server's file descriptors.
- Names must be relative POSIX paths without ``..``, ``.``, empty components,
  backslashes or NUL, and not absolute (``/x``, ``C:x``); each component
  follows ``segsvc.jobs.staging.check_upload_name``. Two entries with the same
  name, or a file where another entry needs a folder, are refused.
- Only regular files and folders: symlinks, hard links, character and block
  devices, FIFOs and sparse files are refused, and so are encrypted zip entries.
- Decompression bombs are refused twice: from the headers (each zip entry's
  declared size against ``max_ratio`` times its compressed size, the total
  against ``max_ratio`` times the archive), and while extracting, by counting
  the bytes really produced: a zip entry may not grow past its declared size
  and a compressed tar is decompressed through a reader that stops at
  ``max_ratio`` times the archive, or at ``max_bytes`` plus ``TAR_BYTES_PER_ENTRY``
  per entry if that is less. A lying header gains nothing.
- A tar's metadata never costs more than a little memory: pax and GNU long-name/long-link
  headers over ``MAX_TAR_HEADER_BYTES``, global pax headers over ``MAX_TAR_GLOBAL_HEADER_BYTES``
  (all of them together) and
  sparse maps are refused from their header block, before ``tarfile`` reads them, and
  ``tarfile`` keeps no header from one entry to the next.
- Names that ``content.is_excluded`` drops (hidden files, ``__MACOSX/``) are
  skipped, so they never reach the dataset or its hash.
- Two names that differ only in case (``a.png``, ``A.png``) are refused whatever
  the server's filesystem: on a case-insensitive one the second would land on the
  first, so a dataset's identity would depend on where the server runs.
- Every byte written (the spooled archive, each extracted file) is first charged
  to the caller's ``Charge`` (the registry's disk quota), which may refuse it.

The caller extracts into a temporary folder and removes it on any error; this
module only ever creates files with ``O_EXCL | O_NOFOLLOW`` inside it.

Example:
    >>> limits = ExtractLimits(max_bytes=1 << 30, max_files=10_000)  # doctest: +SKIP
    >>> extract_archive(Path("upload.tar"), "tar", Path("work/data"), limits)  # doctest: +SKIP
    ExtractSummary(files=400, total_bytes=5242880)
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from segsvc.datasets.content import CHUNK_BYTES, is_excluded
from segsvc.errors import InvalidArgument, UploadError
from segsvc.jobs.staging import check_upload_name

FORMATS = ("tar", "zip", "pairs")
# Below this many bytes no ratio is enforced: tiny archives of text compress well and harm nobody.
RATIO_FLOOR_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
# Entries an archive may hold per allowed file: room for a folder entry and a skipped companion
# (macOS's __MACOSX/._name) per file, while the entries zipfile builds stay bounded.
ENTRIES_PER_FILE = 2
# Unfinished files of a pairs upload that keep a descriptor. The client sends files one after another
# (1 is enough); a sender that interleaves a few files fits; beyond, the least recently written is closed
# and reopened for its next chunk.
MAX_OPEN_FILES = 16
# A pax or GNU long-name/long-link header holds one entry's metadata (a path of at most 255 bytes here,
# times); tarfile reads it whole into memory, so a larger one is refused from its declared size.
MAX_TAR_HEADER_BYTES = 64 << 10
# Global pax headers, all of them together (git archive writes one: its commit id). tarfile keeps them for the
# rest of the archive and copies them into every later entry, so each record costs time per entry.
MAX_TAR_GLOBAL_HEADER_BYTES = 1 << 10
# Tar bytes an entry may take besides its file's data: its header block, a pax or long-name header for a
# long path, the padding of its data to 512 bytes (a skipped __MACOSX companion's data too).
TAR_BYTES_PER_ENTRY = 4 << 10
# A zip's central directory bytes per entry it may hold: a record (46 bytes), a name (at most 255 bytes once
# normalised), extra fields (timestamps, Unix ids, zip64 sizes: tens of bytes) and a comment. zipfile reads the
# whole directory into memory and copies each name and extra field out of it, so its size is bounded too.
ZIP_BYTES_PER_ENTRY = 1 << 10

# Called with the bytes about to be written (negative: given back) before they are; raises to refuse them.
Charge = Callable[[int], None]


def no_charge(size: int) -> None:
    """No quota: every byte within the upload limits may be written."""


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on one uploaded dataset.

    Args:
        max_bytes: the archive as received, and the files it holds (each way).
        max_files: files in the dataset; an archive may hold ``max_entries`` entries (``ENTRIES_PER_FILE``
            times as many) of every kind: files, folders and skipped names.
        max_ratio: most bytes extracted per compressed byte, per zip entry and over
            the whole archive (beyond the first ``RATIO_FLOOR_BYTES``).
        max_pixels: most pixels (height x width) an image or mask of the dataset may declare; checked
            from its header before it is decoded (a small PNG can declare gigabytes of pixels).
    """

    max_bytes: int = 2 << 30
    max_files: int = 100_000
    max_ratio: float = 100.0
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_files", "max_ratio", "max_pixels"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"dataset limits: {name} must be positive, got {getattr(self, name)}")

    @property
    def max_entries(self) -> int:
        """Entries an archive may hold, whatever they are."""
        return ENTRIES_PER_FILE * self.max_files

    def expansion_cap(self, compressed: int) -> int:
        """Most bytes that ``compressed`` bytes may expand to."""
        return int(self.max_ratio * compressed) + RATIO_FLOOR_BYTES

    @property
    def max_tar_bytes(self) -> int:
        """Most bytes a decompressed tar may hold: the files, their headers, and a margin for its end."""
        return self.max_bytes + TAR_BYTES_PER_ENTRY * self.max_entries + RATIO_FLOOR_BYTES


@dataclass(frozen=True)
class ExtractSummary:
    files: int
    total_bytes: int


def entry_name(raw: str) -> str | None:
    """An archive entry's name made safe: the relative POSIX path, ``None`` to skip it, or ``UploadError``.

    Skipped: the archive's root (``.``, ``./``) and excluded names (hidden
    files, ``__MACOSX/``). Folder entries come back without their trailing ``/``.
    """
    if "\x00" in raw:
        raise UploadError(f"entry {raw!r} contains a NUL character")
    if "\\" in raw:
        raise UploadError(f"entry {raw!r} contains a backslash: archives separate folders with '/'")
    if raw.startswith("/") or _DRIVE.match(raw):
        raise UploadError(f"entry {raw!r} is an absolute path")
    name = raw
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name in ("", "."):
        return None
    parts = name.split("/")
    if ".." in parts:
        raise UploadError(f"entry {raw!r} climbs out of the dataset with '..'")
    if "" in parts or "." in parts:
        raise UploadError(f"entry {raw!r} has an empty or '.' component")
    if is_excluded(name):
        return None
    return check_upload_name(name)


def _too_many_entries(limits: ExtractLimits, what: str) -> str:
    return (f"{what} more than {limits.max_entries} entries (the server's limit: {ENTRIES_PER_FILE} per file of "
            f"at most {limits.max_files} files; folders and skipped names count too)")


class _Tree:
    """The names admitted so far: no duplicates, none differing only in case, no file where a folder is needed
    (or the reverse). ``charge`` is told of every byte before it is written (``_copy``, ``PairsWriter``); the
    tree of a zip's headers, which writes nothing, has none."""

    def __init__(self, limits: ExtractLimits, charge: Charge = no_charge) -> None:
        self.limits = limits
        self.charge = charge
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self.total_bytes = 0
        self.entries = 0
        self._by_lower: dict[str, str] = {}  # name.lower() -> the name admitted

    def _claim(self, name: str) -> None:
        other = self._by_lower.setdefault(name.lower(), name)
        if other != name:
            raise UploadError(f"entries {name!r} and {other!r} differ only in case: a case-insensitive "
                              f"filesystem cannot hold both; rename one")

    def add_entry(self) -> None:
        """Count one entry of an archive, whatever it is (file, folder, skipped): before it is looked at."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UploadError(_too_many_entries(self.limits, "the archive has"))

    def add_folder(self, name: str) -> None:
        if name in self.files:
            raise UploadError(f"entry {name!r} is both a file and a folder")
        self._add_parents(name + "/x")
        self._claim(name)
        self.folders.add(name)

    def add_file(self, name: str, size: int = 0) -> None:
        if name in self.files:
            raise UploadError(f"entry {name!r} appears twice")
        if name in self.folders:
            raise UploadError(f"entry {name!r} is both a file and a folder")
        self._add_parents(name)
        self._claim(name)
        if len(self.files) + 1 > self.limits.max_files:
            raise UploadError(f"the dataset has more than {self.limits.max_files} files (the server's limit)")
        self.add_bytes(size, name)
        self.files.add(name)

    def add_bytes(self, size: int, name: str) -> None:
        if self.total_bytes + size > self.limits.max_bytes:
            raise UploadError(f"the dataset is larger than {self.limits.max_bytes} bytes (the server's limit; "
                              f"reached at {name!r})")
        self.charge(size)
        self.total_bytes += size

    def _add_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent in self.files:
                raise UploadError(f"entry {name!r} needs a folder where file {parent!r} is")
            self._claim(parent)
            self.folders.add(parent)


def _create(dest: Path, name: str) -> BinaryIO:
    """Open a new file for writing below ``dest``, never through a symlink and never over a file."""
    path = dest / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "wb")


def _copy(src: BinaryIO, dest: Path, name: str, declared: int, tree: _Tree) -> None:
    """Copy one entry, counting the bytes really produced against its declared size and the total."""
    written = 0
    with _create(dest, name) as out:
        while chunk := src.read(CHUNK_BYTES):
            written += len(chunk)
            if written > declared:
                raise UploadError(f"entry {name!r} is larger than its header says ({declared} bytes): refused")
            tree.add_bytes(len(chunk), name)
            out.write(chunk)
    if written != declared:
        raise UploadError(f"entry {name!r} is shorter than its header says ({written} of {declared} bytes)")


# -- tar ----------------------------------------------------------------------------------
_MAGIC = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


class _BoundedReader(io.RawIOBase):
    """A decompressed stream that refuses to produce more than ``cap`` bytes (a bomb stops here)."""

    def __init__(self, inner: BinaryIO, cap: int, refusal: str) -> None:
        self.inner, self.cap, self.refusal, self.produced = inner, cap, refusal, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        data = self.inner.read(len(buffer))
        self.produced += len(data)
        if self.produced > self.cap:
            raise UploadError(self.refusal)
        buffer[: len(data)] = data
        return len(data)


_TAR_METADATA = {tarfile.XHDTYPE: "pax header", tarfile.SOLARIS_XHDTYPE: "pax header",
                 tarfile.XGLTYPE: "global pax header", tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
                 tarfile.GNUTYPE_LONGLINK: "GNU long-link header"}


class _TarHeader(tarfile.TarInfo):
    """A tar header block, judged before ``tarfile`` reads what it announces into memory."""

    def _proc_member(self, tar: _TarReader) -> tarfile.TarInfo:  # tarfile's hook: one block read so far
        kind = _TAR_METADATA.get(self.type)
        if kind is not None:
            size, limit, together = self.size, MAX_TAR_HEADER_BYTES, ""
            if self.type == tarfile.XGLTYPE:
                size, limit, together = size + tar.global_header_bytes, MAX_TAR_GLOBAL_HEADER_BYTES, ", all together"
            if size > limit:
                raise UploadError(f"the archive has a {kind} of {size} bytes{together}: more than {limit} bytes, "
                                  f"the server's limit")
            if self.type == tarfile.XGLTYPE:
                tar.global_header_bytes = size
        if self.type == tarfile.GNUTYPE_SPARSE:  # its map would be read block after block
            raise UploadError(f"entry {self.name!r} is a sparse file: only files and folders are accepted")
        return super()._proc_member(tar)

    def _refuse_sparse(self, entry: tarfile.TarInfo, *args: object) -> None:
        raise UploadError(f"entry {entry.name!r} is a sparse file: only files and folders are accepted")

    # A pax header's sparse map (format 1.0: in the file's data, read whole) is refused before it is read.
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


class _TarReader(tarfile.TarFile):
    tarinfo = _TarHeader
    global_header_bytes = 0


def _tar_kind(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is refused, or None for a regular file or folder."""
    if member.issym():
        return f"a symlink (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    if not (member.isreg() or member.isdir()):
        return f"of unsupported type {member.type!r}"
    return None


def _extract_tar(archive: Path, dest: Path, limits: ExtractLimits, charge: Charge) -> _Tree:
    tree = _Tree(limits, charge)
    size = archive.stat().st_size
    with open(archive, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        opener = next((cls for prefix, cls in _MAGIC if magic.startswith(prefix)), None)
        inner: BinaryIO = opener(raw) if opener is not None else raw  # type: ignore[operator]
        cap = min(limits.expansion_cap(size), limits.max_tar_bytes)
        if cap == limits.max_tar_bytes:
            refusal = (f"the archive holds more than {cap} bytes once decompressed (the server's limit: "
                       f"{limits.max_bytes} bytes of files, {TAR_BYTES_PER_ENTRY} bytes per entry for its headers)")
        else:
            refusal = (f"the archive expands more than {limits.max_ratio:g} times its size: refused as a "
                       f"decompression bomb")
        bounded = io.BufferedReader(_BoundedReader(inner, cap, refusal))
        # Stream mode: one pass, each header judged as it is met, before its data is read.
        with _TarReader.open(fileobj=bounded, mode="r|") as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile would keep every header it met (pax records too) until the end
                tree.add_entry()
                name = entry_name(member.name)
                refused = _tar_kind(member)
                if refused:  # whatever its name: a hidden link is refused too
                    raise UploadError(f"entry {member.name!r} is {refused}: only files and folders are accepted")
                if name is None:
                    continue
                if member.isdir():
                    tree.add_folder(name)
                    continue
                tree.add_file(name)
                if tree.total_bytes + member.size > limits.max_bytes:
                    raise UploadError(f"the dataset is larger than {limits.max_bytes} bytes (the server's limit; "
                                      f"reached at {name!r})")
                src = tar.extractfile(member)
                assert src is not None  # a regular file
                _copy(src, dest, name, member.size, tree)
    return tree


# -- zip ----------------------------------------------------------------------------------
def _zip_kind(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry is refused (from the Unix mode its creator recorded), or None."""
    if info.flag_bits & 0x1:
        return "encrypted"
    mode = info.external_attr >> 16
    if info.create_system != 3 or not stat.S_IFMT(mode):  # no Unix file type recorded: a plain entry
        return None
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "of unsupported type"
    return None


# The records zipfile reads to find the central directory (APPNOTE 4.3.14-16), and a central directory
# record's fixed part: signature, ..., name, extra and comment lengths at fields 12, 13 and 14.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_MAX_COMMENT = (1 << 16) - 1


def _zip_end(f: BinaryIO, size: int) -> tuple[int, int, int, bool] | None:
    """Where ``zipfile`` will find the end of central directory record, as it does (``zipfile._EndRecData``):
    ``(its offset, entries it declares, central directory bytes, zip64)``, or None if there is none."""
    if size < _EOCD.size:
        return None
    f.seek(size - _EOCD.size)
    data = f.read(_EOCD.size)
    if data[:4] == zipfile.stringEndArchive and data[-2:] == b"\x00\x00":  # no archive comment
        location = size - _EOCD.size
    else:  # a comment follows the record: the last signature within its reach
        first = max(size - _MAX_COMMENT - _EOCD.size, 0)
        f.seek(first)
        tail = f.read()
        found = tail.rfind(zipfile.stringEndArchive)
        if found < 0 or len(tail) - found < _EOCD.size:
            return None
        location, data = first + found, tail[found:found + _EOCD.size]
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack(data)
    zip64 = False
    if location >= _EOCD64_LOCATOR.size:
        f.seek(location - _EOCD64_LOCATOR.size)
        sig, disk, _, disks = _EOCD64_LOCATOR.unpack(f.read(_EOCD64_LOCATOR.size))
        if sig == zipfile.stringEndArchive64Locator:
            if disk != 0 or disks > 1:
                raise UploadError("not a valid zip archive: it spans several disks")
            start = location - _EOCD64_LOCATOR.size - _EOCD64.size
            if start >= 0:
                f.seek(start)
                record = _EOCD64.unpack(f.read(_EOCD64.size))
                if record[0] == zipfile.stringEndArchive64:
                    entries, cd_size, zip64 = record[7], record[8], True
    return location, entries, cd_size, zip64


def _zip_entry_count(archive: Path, limits: ExtractLimits) -> int:
    """The entries ``zipfile.ZipFile(archive)`` would build, counted without building them; ``UploadError``
    as soon as they are known to pass ``limits.max_entries``.

    The end record's count refuses a large directory at once. Since zipfile reads the directory by its
    byte size and ignores that count, the records are then walked as zipfile walks them (headers only,
    a constant amount of memory), stopping one past the limit, so a count that understates gains nothing.
    """
    with open(archive, "rb", buffering=1 << 20) as f:
        end = _zip_end(f, f.seek(0, os.SEEK_END))
        if end is None:
            raise UploadError("not a valid zip archive: no end of central directory record")
        location, declared, cd_size, zip64 = end
        if declared > limits.max_entries:
            raise UploadError(_too_many_entries(limits, f"the zip archive lists {declared} entries:"))
        # zipfile's position of the directory: just before the end records, whatever their offset field says.
        start = location - cd_size - ((_EOCD64.size + _EOCD64_LOCATOR.size) if zip64 else 0)
        if start < 0:
            raise UploadError("not a valid zip archive: bad offset of the central directory")
        f.seek(start)
        count = walked = 0
        while walked < cd_size:
            count += 1
            if count > limits.max_entries:
                raise UploadError(_too_many_entries(limits, "the zip archive lists"))
            header = f.read(_CENTRAL.size)
            short = len(header) != _CENTRAL.size or walked + _CENTRAL.size > cd_size
            if short or header[:4] != zipfile.stringCentralDir:
                raise UploadError("not a valid zip archive: truncated or corrupt central directory")
            fields = _CENTRAL.unpack(header)
            skip = fields[12] + fields[13] + fields[14]
            f.seek(skip, os.SEEK_CUR)
            walked += _CENTRAL.size + skip
    if cd_size > ZIP_BYTES_PER_ENTRY * limits.max_entries:
        raise UploadError(f"the zip archive's central directory is {cd_size} bytes: more than "
                          f"{ZIP_BYTES_PER_ENTRY * limits.max_entries} bytes, the server's limit "
                          f"({ZIP_BYTES_PER_ENTRY} bytes per entry, {limits.max_entries} entries)")
    return count


def _extract_zip(archive: Path, dest: Path, limits: ExtractLimits, charge: Charge) -> _Tree:
    _zip_entry_count(archive, limits)  # before zipfile builds a ZipInfo per entry
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Every header first: nothing is written unless the whole archive looks acceptable.
        headers = _Tree(limits)
        wanted: list[tuple[zipfile.ZipInfo, str]] = []
        declared = 0
        for info in infos:
            headers.add_entry()
            name = entry_name(info.filename)
            refused = _zip_kind(info)
            if refused:
                raise UploadError(f"entry {info.filename!r} is {refused}: only plain files and folders are accepted")
            if name is None:
                continue
            if info.is_dir():
                headers.add_folder(name)
                continue
            headers.add_file(name, info.file_size)
            if info.file_size > limits.expansion_cap(info.compress_size):
                raise UploadError(f"entry {name!r} expands {info.file_size} bytes from {info.compress_size}: "
                                  f"more than {limits.max_ratio:g} times, refused as a decompression bomb")
            declared += info.file_size
            wanted.append((info, name))
        if declared > limits.expansion_cap(archive.stat().st_size):
            raise UploadError(f"the archive expands more than {limits.max_ratio:g} times its size: refused as a "
                              f"decompression bomb")
        tree = _Tree(limits, charge)
        for folder in sorted(headers.folders):
            tree.add_folder(folder)
        for info, name in wanted:
            tree.add_file(name)
            with zf.open(info) as src:
                _copy(src, dest, name, info.file_size, tree)
    return tree


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
                   NotImplementedError, RuntimeError, ValueError, gzip.BadGzipFile)


def extract_archive(archive: Path, fmt: str, dest: Path, limits: ExtractLimits,
                    charge: Charge = no_charge) -> ExtractSummary:
    """Extract a tar (optionally gzip/bzip2/xz) or zip archive into the empty folder ``dest``.

    Raises:
        UploadError: an unsafe or malformed archive, or one over the limits; the
            caller removes ``dest``, which may hold part of the files. Whatever
            ``charge`` raises (a full disk quota) passes through.
    """
    if fmt not in ("tar", "zip"):
        raise InvalidArgument(f"archive format must be tar or zip, got {fmt!r}")
    extract = _extract_tar if fmt == "tar" else _extract_zip
    try:
        tree = extract(archive, dest, limits, charge)
    except UploadError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise UploadError(f"not a valid {fmt} archive: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # the server's disk (full, failing): not the archive's fault
            raise
        raise UploadError(f"not a valid {fmt} archive: {exc}") from None  # bz2's 'Invalid data stream'
    if not tree.files:
        raise UploadError(f"the {fmt} archive holds no dataset files")
    return ExtractSummary(len(tree.files), tree.total_bytes)


class Spool:
    """An archive being received: appended chunk by chunk, never past ``max_bytes``, each chunk charged first."""

    def __init__(self, path: Path, limits: ExtractLimits, charge: Charge = no_charge) -> None:
        self.path, self.limits, self.size, self.charge = path, limits, 0, charge
        self._file = open(path, "xb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limits.max_bytes:
            raise UploadError(f"the upload is larger than {self.limits.max_bytes} bytes (the server's limit)")
        self.charge(len(data))
        self._file.write(data)
        self.size += len(data)

    def close(self) -> None:
        self._file.close()


class PairsWriter:
    """A dataset sent file by file: each chunk names its file; limits are checked before writing.

    Chunks of different files may interleave. At most ``MAX_OPEN_FILES`` unfinished files keep a
    descriptor (the most recently written); another one's next chunk reopens it for appending, never
    through a symlink, and only if it is still the file this writer created, at the size it left it.
    """

    def __init__(self, dest: Path, limits: ExtractLimits, charge: Charge = no_charge) -> None:
        self.dest = dest
        self._tree = _Tree(limits, charge)
        self._open: OrderedDict[str, BinaryIO] = OrderedDict()  # least recently written first
        self._unfinished: dict[str, tuple[int, int, int]] = {}  # name -> (st_dev, st_ino, bytes written)
        self._done: set[str] = set()

    def write(self, name: str, data: bytes, last: bool) -> None:
        if name not in self._unfinished:
            if name in self._done:
                raise UploadError(f"file {name!r} was already complete: a name cannot be sent twice")
            safe = entry_name(name)
            if safe is None or safe != name:
                raise UploadError(f"file name {name!r} is not a dataset file name (hidden, or not normalised)")
            self._tree.add_file(name)
            self._make_room()
            out = self._open[name] = _create(self.dest, name)
            st = os.fstat(out.fileno())
            self._unfinished[name] = (st.st_dev, st.st_ino, 0)
        else:
            out = self._handle(name)
        self._tree.add_bytes(len(data), name)
        out.write(data)
        dev, ino, written = self._unfinished[name]
        self._unfinished[name] = (dev, ino, written + len(data))
        if last:
            del self._open[name], self._unfinished[name]
            out.close()
            self._done.add(name)

    def _make_room(self) -> None:
        while len(self._open) >= MAX_OPEN_FILES:
            _, out = self._open.popitem(last=False)
            out.close()

    def _handle(self, name: str) -> BinaryIO:
        """The open file of an unfinished ``name``, reopened for appending if it was closed to make room."""
        out = self._open.get(name)
        if out is not None:
            self._open.move_to_end(name)
            return out
        changed = UploadError(f"file {name!r} changed on the server while it was being received")
        self._make_room()
        try:
            fd = os.open(self.dest / name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except OSError:
            raise changed from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino, st.st_size) != self._unfinished[name]:
            os.close(fd)
            raise changed
        out = self._open[name] = os.fdopen(fd, "ab")
        return out

    def finish(self) -> ExtractSummary:
        if self._unfinished:
            shown = ", ".join(repr(n) for n in sorted(self._unfinished)[:5])
            raise UploadError(f"{len(self._unfinished)} file(s) lack their last chunk: {shown}")
        if not self._done:
            raise UploadError("the upload holds no files")
        return ExtractSummary(len(self._done), self._tree.total_bytes)

    def close(self) -> None:
        for out in self._open.values():
            out.close()
        self._open.clear()
        self._unfinished.clear()
