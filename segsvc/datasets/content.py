"""A dataset's content and identity, shared by the server and the light client (standard library only).

A dataset is the set of its regular files, named by their relative POSIX paths;
names with a component starting with ``.`` (``.DS_Store``, ``.git/``,
AppleDouble ``._x``) and the ``__MACOSX/`` folder are not part of it. Its
identity is ``content_hash``: SHA-256 over the files sorted by name, each
contributing ``name`` (UTF-8), a NUL byte, its size as 8 big-endian bytes and
the SHA-256 digest of its bytes. Because only names and bytes count, a tar, a
zip and a file-by-file upload of the same files have the same hash, and the
client can compute it without the server.

``tar_stream`` packs a local folder as an uncompressed tar on the fly, one
chunk at a time (memory stays at one chunk whatever the file sizes).

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "a.txt").write_bytes(b"x")
    >>> sha, files, size = hash_folder(root)
    >>> len(sha), files, size
    (64, 1, 1)
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from segsvc.errors import InvalidArgument

CHUNK_BYTES = 1 << 20
_BLOCK = tarfile.BLOCKSIZE  # 512
_ARCHIVE_SUFFIXES = {".tar": "tar", ".tgz": "tar", ".gz": "tar", ".bz2": "tar", ".xz": "tar", ".zip": "zip"}


def is_excluded(rel: str) -> bool:
    """True for names that are not dataset content: hidden components and macOS archive debris."""
    parts = rel.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def file_digest(path: str | os.PathLike[str]) -> tuple[int, bytes]:
    """``(size, sha256 digest)`` of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return size, h.digest()


def content_hash(entries: Iterable[tuple[str, int, bytes]]) -> str:
    """The content hash of ``(relative name, size, sha256 digest)`` entries, in any order."""
    h = hashlib.sha256()
    seen: set[str] = set()
    for name, size, digest in sorted(entries):
        if name in seen:
            raise InvalidArgument(f"file name {name!r} appears twice")
        seen.add(name)
        h.update(name.encode("utf-8") + b"\0" + int(size).to_bytes(8, "big") + digest)
    return h.hexdigest()


def local_files(folder: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The dataset files under a local folder as ``(relative name, path)``, sorted by name.

    Symlinks to files and folders are followed (a local folder may link its
    data in); what is excluded by ``is_excluded`` is left out.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidArgument(f"{os.fspath(folder)} is not a folder")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames if not is_excluded(_join(rel_dir, d)))
        for name in filenames:
            rel = _join(rel_dir, name)
            path = Path(dirpath) / name
            if not is_excluded(rel) and path.is_file():
                out.append((rel, path))
    return sorted(out)


def _join(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else f"{rel_dir}/{name}"


def hash_folder(folder: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(content hash, files, bytes)`` of a local folder."""
    entries = [(rel, *file_digest(path)) for rel, path in local_files(folder)]
    return content_hash(entries), len(entries), sum(size for _, size, _ in entries)


def tar_stream(
    files: Iterable[tuple[str, Path]],
    chunk_bytes: int = CHUNK_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """Pack ``(relative name, path)`` files as an uncompressed tar, yielding chunks of at most ``chunk_bytes``.

    ``on_bytes`` is called with the number of file bytes packed (for a progress bar).

    Raises:
        InvalidArgument: a file changed size while it was being packed.
    """
    buffer = bytearray()
    for rel, path in files:
        size = path.stat().st_size
        info = tarfile.TarInfo(rel)
        info.size, info.mode, info.mtime = size, 0o644, 0
        buffer += info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
        sent = 0
        with open(path, "rb") as f:
            while sent < size:
                data = f.read(min(chunk_bytes, size - sent))
                if not data:
                    break
                buffer += data
                sent += len(data)
                if on_bytes is not None:
                    on_bytes(len(data))
                while len(buffer) >= chunk_bytes:
                    yield bytes(buffer[:chunk_bytes])
                    del buffer[:chunk_bytes]
            if sent != size or f.read(1):
                raise InvalidArgument(f"{path} changed size while it was being packed; pack it again")
        buffer += b"\0" * (-size % _BLOCK)
    buffer += b"\0" * (2 * _BLOCK)  # end-of-archive marker
    while buffer:
        yield bytes(buffer[:chunk_bytes])
        del buffer[:chunk_bytes]


def archive_format(path: Path) -> str:
    """``tar`` or ``zip`` from an archive's suffix: .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz or .zip."""
    if not path.is_file():
        raise InvalidArgument(f"{os.fspath(path)} is neither a folder nor an archive file")
    suffixes = [s.lower() for s in path.suffixes]
    fmt = _ARCHIVE_SUFFIXES.get(suffixes[-1] if suffixes else "")
    if fmt is None or (suffixes[-1] in (".gz", ".bz2", ".xz") and suffixes[-2:-1] != [".tar"]):
        raise InvalidArgument(f"{path.name}: upload a folder, a .tar (.tar.gz, .tgz, .tar.bz2, .tar.xz) or a .zip")
    return fmt


def file_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[bytes, bool]]:
    """A file's bytes in chunks, each with whether it is the last (an empty file is one empty chunk)."""
    with open(path, "rb") as f:
        data = f.read(chunk_bytes)
        while True:
            following = f.read(chunk_bytes) if data else b""
            yield data, not following
            if not following:
                return
            data = following
