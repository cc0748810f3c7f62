"""Untrusted uploads -> files in a fresh folder, within limits, or nothing.

An uploaded dataset arrives as a tar or zip archive, or as its files one by
one ("pairs"). Everything here assumes the bytes are hostile:

- Sizes are checked *before* writing: the spooled archive, each file of a pairs
  upload and the extracted total never pass ``max_bytes``, nor the file count
  ``max_files``.
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
  ``max_ratio`` times the archive. A lying header gains nothing.
- Names that ``content.is_excluded`` drops (hidden files, ``__MACOSX/``) are
  skipped, so they never reach the dataset or its hash.

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
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from segsvc.datasets.content import CHUNK_BYTES, is_excluded
from segsvc.errors import InvalidArgument, UploadError
from segsvc.jobs.staging import check_upload_name

FORMATS = ("tar", "zip", "pairs")
# Below this many bytes no ratio is enforced: tiny archives of text compress well and harm nobody.
RATIO_FLOOR_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on one uploaded dataset.

    Args:
        max_bytes: the archive as received, and the files it holds (each way).
        max_files: files in the dataset.
        max_ratio: most bytes extracted per compressed byte, per zip entry and over
            the whole archive (beyond the first ``RATIO_FLOOR_BYTES``).
    """

    max_bytes: int = 2 << 30
    max_files: int = 100_000
    max_ratio: float = 100.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_files", "max_ratio"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"dataset limits: {name} must be positive, got {getattr(self, name)}")

    def expansion_cap(self, compressed: int) -> int:
        """Most bytes that ``compressed`` bytes may expand to."""
        return int(self.max_ratio * compressed) + RATIO_FLOOR_BYTES


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


class _Tree:
    """The names admitted so far: no duplicates, no file where a folder is needed (or the reverse)."""

    def __init__(self, limits: ExtractLimits) -> None:
        self.limits = limits
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self.total_bytes = 0

    def add_folder(self, name: str) -> None:
        if name in self.files:
            raise UploadError(f"entry {name!r} is both a file and a folder")
        self._add_parents(name + "/x")
        self.folders.add(name)

    def add_file(self, name: str, size: int = 0) -> None:
        if name in self.files:
            raise UploadError(f"entry {name!r} appears twice")
        if name in self.folders:
            raise UploadError(f"entry {name!r} is both a file and a folder")
        self._add_parents(name)
        if len(self.files) + 1 > self.limits.max_files:
            raise UploadError(f"the dataset has more than {self.limits.max_files} files (the server's limit)")
        self.add_bytes(size, name)
        self.files.add(name)

    def add_bytes(self, size: int, name: str) -> None:
        if self.total_bytes + size > self.limits.max_bytes:
            raise UploadError(f"the dataset is larger than {self.limits.max_bytes} bytes (the server's limit; "
                              f"reached at {name!r})")
        self.total_bytes += size

    def _add_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent in self.files:
                raise UploadError(f"entry {name!r} needs a folder where file {parent!r} is")
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

    def __init__(self, inner: BinaryIO, cap: int, ratio: float) -> None:
        self.inner, self.cap, self.ratio, self.produced = inner, cap, ratio, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        data = self.inner.read(len(buffer))
        self.produced += len(data)
        if self.produced > self.cap:
            raise UploadError(f"the archive expands more than {self.ratio:g} times its size: refused as a "
                              f"decompression bomb")
        buffer[: len(data)] = data
        return len(data)


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


def _extract_tar(archive: Path, dest: Path, limits: ExtractLimits) -> _Tree:
    tree = _Tree(limits)
    size = archive.stat().st_size
    with open(archive, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        opener = next((cls for prefix, cls in _MAGIC if magic.startswith(prefix)), None)
        inner: BinaryIO = opener(raw) if opener is not None else raw  # type: ignore[operator]
        bounded = io.BufferedReader(_BoundedReader(inner, limits.expansion_cap(size), limits.max_ratio))
        # Stream mode: one pass, each header judged as it is met, before its data is read.
        with tarfile.open(fileobj=bounded, mode="r|") as tar:
            for member in tar:
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


def _extract_zip(archive: Path, dest: Path, limits: ExtractLimits) -> _Tree:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Every header first: nothing is written unless the whole archive looks acceptable.
        headers = _Tree(limits)
        wanted: list[tuple[zipfile.ZipInfo, str]] = []
        declared = 0
        for info in infos:
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
        tree = _Tree(limits)
        for folder in sorted(headers.folders):
            tree.add_folder(folder)
        for info, name in wanted:
            tree.add_file(name)
            with zf.open(info) as src:
                _copy(src, dest, name, info.file_size, tree)
    return tree


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
                   NotImplementedError, RuntimeError, ValueError, gzip.BadGzipFile)


def extract_archive(archive: Path, fmt: str, dest: Path, limits: ExtractLimits) -> ExtractSummary:
    """Extract a tar (optionally gzip/bzip2/xz) or zip archive into the empty folder ``dest``.

    Raises:
        UploadError: an unsafe or malformed archive, or one over the limits; the
            caller removes ``dest``, which may hold part of the files.
    """
    if fmt not in ("tar", "zip"):
        raise InvalidArgument(f"archive format must be tar or zip, got {fmt!r}")
    try:
        tree = _extract_tar(archive, dest, limits) if fmt == "tar" else _extract_zip(archive, dest, limits)
    except UploadError:
        raise
    except _ARCHIVE_ERRORS as exc:
        raise UploadError(f"not a valid {fmt} archive: {exc}") from None
    if not tree.files:
        raise UploadError(f"the {fmt} archive holds no dataset files")
    return ExtractSummary(len(tree.files), tree.total_bytes)


class Spool:
    """An archive being received: appended chunk by chunk, never past ``max_bytes``."""

    def __init__(self, path: Path, limits: ExtractLimits) -> None:
        self.path, self.limits, self.size = path, limits, 0
        self._file = open(path, "xb")

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limits.max_bytes:
            raise UploadError(f"the upload is larger than {self.limits.max_bytes} bytes (the server's limit)")
        self._file.write(data)
        self.size += len(data)

    def close(self) -> None:
        self._file.close()


class PairsWriter:
    """A dataset sent file by file: each chunk names its file; limits are checked before writing."""

    def __init__(self, dest: Path, limits: ExtractLimits) -> None:
        self.dest = dest
        self._tree = _Tree(limits)
        self._open: dict[str, BinaryIO] = {}
        self._done: set[str] = set()

    def write(self, name: str, data: bytes, last: bool) -> None:
        out = self._open.get(name)
        if out is None:
            if name in self._done:
                raise UploadError(f"file {name!r} was already complete: a name cannot be sent twice")
            safe = entry_name(name)
            if safe is None or safe != name:
                raise UploadError(f"file name {name!r} is not a dataset file name (hidden, or not normalised)")
            self._tree.add_file(name)
            out = self._open[name] = _create(self.dest, name)
        self._tree.add_bytes(len(data), name)
        out.write(data)
        if last:
            out.close()
            del self._open[name]
            self._done.add(name)

    def finish(self) -> ExtractSummary:
        if self._open:
            shown = ", ".join(repr(n) for n in sorted(self._open)[:5])
            raise UploadError(f"{len(self._open)} file(s) lack their last chunk: {shown}")
        if not self._done:
            raise UploadError("the upload holds no files")
        return ExtractSummary(len(self._done), self._tree.total_bytes)

    def close(self) -> None:
        for out in self._open.values():
            out.close()
        self._open.clear()
