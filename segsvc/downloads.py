"""Downloads of a job's output files: a stream of ``FileChunk`` written under a folder, safely.

Each file is written under a temporary name beside its final one, fsynced and renamed; the folders it
changed are synced before ``download`` returns. A name the server sends is confined to the folder
(symlinks included), a file sent twice is refused, and what a killed download left is removed by the
next. A server that goes quiet for ``idle_timeout_s`` (ten times that before its first chunk) ends the
download with ``DeadlineExceeded``; a stream the server broke (it died, or stopped) with ``StreamLost``, which
says how many whole files this download wrote. A download run again fetches every file again, replacing those
there (which are whole: a file is renamed into place only once all of it is in).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import grpc

from segsvc.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from segsvc.files import fsync_folder
from segsvc.progress import progress_bar
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.wire import error_from_rpc

_TEMP_SUFFIX = re.compile(r"[0-9a-f]{12}")  # of a download's temporary: .<name>.part-<12 hex>
# The first chunk may wait this many idle limits: the server lists the job's outputs before it sends one (minutes
# for millions of files on slow storage), yet a connection that died before then must not hang the fetch for ever.
FIRST_WAIT_FACTOR = 10


class StreamLost(Unavailable):
    """The server broke the stream (it died: "Stream removed", or a stopping one cancelled it) after ``written``
    whole files were written by this download; the file in progress was removed. A new download fetches every
    file again."""

    def __init__(self, message: str, written: int) -> None:
        super().__init__(message)
        self.written = written


def download(stream: Iterable[jobs_pb.FileChunk], dest: str | os.PathLike, progress: bool = False,
             idle_timeout_s: float | None = None) -> list[Path]:
    """Write a stream of ``FileChunk`` under ``dest``; returns the paths written.

    Each file is written under a temporary name beside it, fsynced, and renamed
    once its last chunk arrived, so an interrupted download leaves no half file
    under a final name (its temporary is removed); the folders it changed are
    synced before it returns, so what it returned survives a power cut. The
    server's names and offsets are checked: a path outside ``dest`` (or ``dest``
    itself, or through a symlink in it), a NUL byte, a file sent twice, a chunk
    of another file before the current one ended, or an offset other than the
    bytes received so far is refused with ``InvalidArgument``.

    A download that ends early cancels the stream (a gRPC call), so the server
    stops sending. ``idle_timeout_s``: a server that sends nothing for that long
    (hung, or a network that dropped without a reset) ends it with
    ``DeadlineExceeded``; None waits as long as the stream lasts. The first chunk
    may take ``FIRST_WAIT_FACTOR`` times that: the server lists the job's outputs
    before it.
    """
    root = _resolved(Path(dest), f"the folder {os.fspath(dest)!r}")
    written: list[Path] = []
    seen: set[Path] = set()
    changed: dict[Path, None] = {}  # folders that gained an entry, in order: synced once the files are in
    current: _Incoming | None = None
    leftovers = _Leftovers()
    watchdog = _Watchdog(stream, idle_timeout_s)
    ended = False
    try:
        for chunk in progress_bar(progress, watchdog.chunks(), unit="chunk", desc="fetch"):
            if current is None:
                path = _local_path(root, chunk.path)
                if path in seen:  # a second copy would silently replace the first
                    raise InvalidArgument(f"the server sent {chunk.path!r} twice")
                seen.add(path)
                changed.update(dict.fromkeys(_make_folders(path.parent)))
                current = _Incoming(path, chunk.path)
            current.write(chunk)
            if chunk.last:
                written.append(current.finish())
                leftovers.remove(current, seen)
                changed[current.path.parent] = None
                current = None
        if current is not None:
            raise InvalidArgument(f"the stream ended in the middle of {current.name!r}")
        for folder in changed:
            fsync_folder(folder)
        ended = True
    except grpc.RpcError as exc:
        if watchdog.fired is not None:
            where = f" while {current.name!r} was at {current.size} bytes" if current is not None else ""
            raise DeadlineExceeded(f"the server sent nothing for {watchdog.fired:g} s{where}; {len(written)} whole "
                                   "files written: fetch again (it fetches every file again)") from None
        error = error_from_rpc(exc)
        if isinstance(error, (Unavailable, Cancelled)):
            raise StreamLost(str(error), len(written)) from None
        raise error from None
    finally:
        watchdog.stop()
        if not ended and callable(getattr(stream, "cancel", None)):
            stream.cancel()  # type: ignore[attr-defined]
        if current is not None:
            current.discard()
    return written


def _local_path(root: Path, name: str) -> Path:
    """Where a file the server names goes under ``root``: inside it, never ``root`` itself, nor through a
    symlink in it that leads out."""
    if "\x00" in name:  # no file can have it: Path.resolve and open raise ValueError
        raise InvalidArgument(f"the server sent a file name with a NUL byte: {name!r}")
    named = Path(os.path.normpath(root / name))
    if named == root or not named.is_relative_to(root):
        raise InvalidArgument(f"the server sent a file outside the folder: {name!r}")
    path = _resolved(root / name, repr(name))
    if path == root or not path.is_relative_to(root):
        raise InvalidArgument(f"{name!r} leads out of the folder through a symlink in it ({root}); remove the "
                              "link or fetch into another folder")
    return path


def _resolved(path: Path, what: str) -> Path:
    """``path.resolve()``; a symlink loop (Python 3.11 raises RuntimeError) is an ``InvalidArgument``."""
    try:
        return path.resolve()
    except RuntimeError:
        raise InvalidArgument(f"{what} leads into a symlink loop") from None


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns the folders that gained an entry (the parents of those
    made), which a durable download syncs."""
    missing: list[Path] = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)  # exist_ok: another download into the same folder made it meanwhile
    return [made.parent for made in reversed(missing)]


class _Incoming:
    """One file being downloaded: its chunks in order, into a temporary fsynced and renamed at the end."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name, self.size = path, name, 0
        self.temp = path.with_name(f"{_temp_prefix(path.name)}{os.urandom(6).hex()}")
        self.file = open(self.temp, "xb")
        try:  # in use: another download's clean-up leaves it (``_Leftovers``)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (NFS without lockd): the download goes on unguarded
            pass

    def write(self, chunk: jobs_pb.FileChunk) -> None:
        if chunk.path != self.name or chunk.offset != self.size:
            raise InvalidArgument(f"the server sent {chunk.path!r} at offset {chunk.offset} while {self.name!r} "
                                  f"was at {self.size} bytes")
        self.file.write(chunk.data)
        self.size += len(chunk.data)

    def finish(self) -> Path:
        self.file.flush()
        os.fsync(self.file.fileno())  # before the rename: else a power cut may leave the final name empty
        try:
            os.replace(self.temp, self.path)  # still locked: closed first, another clean-up could remove it
        finally:
            self.file.close()
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _temp_prefix(name: str) -> str:
    """``.<name>.<hash>.part-``: a bounded part of the name (one near the 255-byte limit has no room for more)
    and a hash of all of it, so names alike in their first 32 characters have temporaries of their own."""
    return f".{name[:32]}.{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}.part-"


class _Leftovers:
    """The temporaries that killed downloads left in the folders this one writes: a fetch run again replaces
    their files, and nothing else would ever remove them. Each folder is listed once, when this download
    first finishes a file in it (its own temporary is renamed by then). A temporary another download still
    writes (into the same folder at the same time) is locked by it and left alone; a killed one's lock went
    with its process."""

    def __init__(self) -> None:
        self._found: dict[Path, dict[str, list[Path]]] = {}

    def remove(self, done: "_Incoming", keep: set[Path]) -> None:
        """Remove those of the file ``done`` just replaced; a file of this download (``keep``) is not one."""
        folder = done.path.parent
        if folder not in self._found:
            self._found[folder] = {}
            for entry in os.scandir(folder):
                prefix, sep, suffix = entry.name.rpartition(".part-")
                if sep and entry.name.startswith(".") and _TEMP_SUFFIX.fullmatch(suffix) \
                        and entry.is_file(follow_symlinks=False):
                    self._found[folder].setdefault(prefix + sep, []).append(Path(entry.path))
        for path in self._found[folder].pop(_temp_prefix(done.path.name), ()):
            if path not in keep and not _in_use(path):
                path.unlink(missing_ok=True)


def _in_use(path: Path) -> bool:
    """Whether ``path``, a temporary, may be a live download's (``_Incoming`` locks it while it writes): only one
    this download could open and lock is known to be a killed one's."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: on NFS a read-only descriptor may take it
    except FileNotFoundError:
        return False  # gone meanwhile: nothing to remove
    except OSError:  # locked, unreadable (another user's), or no locks here (NFS): it may be a live one's
        return True
    return False


class _Watchdog:
    """Cancels a server stream (a gRPC call) that sends nothing for ``idle_s`` (``FIRST_WAIT_FACTOR`` times that
    for its first chunk: the server lists the job's outputs before it); the time the caller spends on a chunk
    (writing it) is not counted. Off when ``idle_s`` is None or the stream cannot be cancelled. ``fired`` is the
    limit that ended the stream, if one did."""

    def __init__(self, stream: Iterable[jobs_pb.FileChunk], idle_s: float | None) -> None:
        self._stream, self._idle_s = stream, idle_s
        self.fired: float | None = None
        self._waiting_since: float | None = None
        self._limit_s = (idle_s or 0.0) * FIRST_WAIT_FACTOR
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if idle_s is not None and callable(getattr(stream, "cancel", None)):
            self._thread = threading.Thread(target=self._watch, name="fetch-idle-watchdog", daemon=True)
            self._thread.start()

    def chunks(self) -> Iterator[jobs_pb.FileChunk]:
        """The stream's chunks, each wait for the next one timed."""
        chunks = iter(self._stream)
        while True:
            self._waiting_since = time.monotonic()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                self._waiting_since = None
            self._limit_s = self._idle_s or 0.0  # the first chunk came
            yield chunk

    def _watch(self) -> None:
        assert self._idle_s is not None
        while True:
            since, limit = self._waiting_since, self._limit_s
            left = self._idle_s if since is None else since + limit - time.monotonic()
            if self._stopped.wait(max(left, 0.0)):
                return
            since, limit = self._waiting_since, self._limit_s
            if since is not None and time.monotonic() - since >= limit:
                self.fired = limit
                self._stream.cancel()  # type: ignore[attr-defined]  # the wait raises CANCELLED
                return

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
