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
chunk at a time (memory stays at one chunk whatever the file sizes), with the
names ``folder_tar_names`` gives its files.

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
from typing import Callable, Iterable, Iterator, Sequence

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
    data in); what is excluded by ``is_excluded`` is left out. Nothing else is
    left out in silence: the upload would go without it, and at best the
    server's check would say that a file is missing.

    Raises:
        InvalidArgument: ``folder`` is not a folder; a folder under it cannot be listed; a folder link leads
            into a folder it lies in (a loop, which would list every file under it once per turn until the
            kernel's ELOOP); a link leads to nothing; a name is not UTF-8. Each is named relative to ``folder``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidArgument(f"{os.fspath(folder)} is not a folder")
    out: list[tuple[str, Path]] = []
    stack: list[tuple[Path, str, frozenset[str]]] = [(root, "", frozenset({os.path.realpath(root)}))]
    while stack:
        path, rel_dir, ancestors = stack.pop()
        for entry in _listing(path, rel_dir.rstrip("/") or "."):
            rel = rel_dir + entry.name
            if is_excluded(rel):
                continue
            _check_utf8(rel)
            if _is_dir(entry, rel):
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    raise InvalidArgument(f"folder link {rel!r} leads back into a folder it lies in (a loop): "
                                          f"remove it")
                stack.append((Path(entry.path), rel + "/", ancestors | {real}))
            elif entry.is_file():
                out.append((rel, Path(entry.path)))
            elif entry.is_symlink() and not os.path.exists(entry.path):
                raise InvalidArgument(f"{rel!r} is a link to nothing: its target does not exist")
    return sorted(out)


def _check_utf8(rel: str) -> None:
    """A dataset's names are UTF-8 (``content_hash``, the tar headers): a Linux name that is not reaches here
    with surrogate escapes and would fail there with UnicodeEncodeError, naming nothing."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{rel!r} is not a UTF-8 name (the bytes shown as \\udcXX): rename it") from None


def _listing(folder: Path, shown: str) -> list[os.DirEntry[str]]:
    """The entries of ``folder``; ``InvalidArgument`` naming it as ``shown`` when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        raise InvalidArgument(f"cannot read folder {shown!r} ({exc.strerror or type(exc).__name__})") from None


def _is_dir(entry: os.DirEntry[str], rel: str) -> bool:
    """Whether an entry is a folder, through symlinks (its ``stat`` may fail: EACCES, ELOOP)."""
    try:
        return entry.is_dir()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {rel!r} ({exc.strerror or type(exc).__name__})") from None


def hash_folder(folder: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(content hash, files, bytes)`` of a local folder."""
    entries = [(rel, *file_digest(path)) for rel, path in local_files(folder)]
    return content_hash(entries), len(entries), sum(size for _, size, _ in entries)


# The folder a folder's tar stream wraps its files in when the folder's only entry is a folder (``folder_tar_names``).
FOLDER_TAR_WRAPPER = "dataset"


def folder_tar_names(files: Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """A local folder's files (``local_files``) as its upload's tar stream names them.

    The server takes an uploaded tar whose only top-level entry is a folder for
    an archive of that folder (``shapes.tar`` holding ``shapes/...``) and roots
    the dataset inside it. A folder's tar stream is rooted at the folder itself,
    so when the folder's only entry is a folder (``mem/`` holding only ``train/``)
    its files go under one more folder, which the server takes off again: the
    dataset's files, and so its content hash, are the folder's, as they are
    for every other folder (whose stream is sent unchanged).
    """
    tops = {rel.split("/", 1)[0] for rel, _ in files}
    if len(tops) == 1 and all("/" in rel for rel, _ in files):
        return [(f"{FOLDER_TAR_WRAPPER}/{rel}", path) for rel, path in files]
    return list(files)


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
