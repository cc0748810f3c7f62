"""A staging area for images a client uploads before starting a batch job.

A client streams chunks, each naming its file, offset and whether it is the
last one; the server checks every chunk before writing it, so an upload can
never exceed its limits, write outside its folder or leave a half-written file
under a final name. The layout under the staging root::

    <id>.partial/            an upload being received (removed on abort)
        .incoming/<n>        a file still receiving chunks
        scans/a/001.png      a file whose last chunk arrived (renamed from .incoming)
    <id>/                    a committed upload: complete, never written again;
                             its mtime is the commit time (``committed_before``)
    <id>.deleting/           a committed upload being deleted

Both renames (file into place, ``<id>.partial`` to ``<id>``) are atomic, so a
reader sees either nothing or the whole thing; so is deleting (``<id>`` to
``<id>.deleting``, then the files). After a crash, ``clean_partial`` removes
whatever was left in between. Who deletes a committed upload, and when, is the
owner's business (the batch runner: when no job references it any more).

The whole folder has a budget (``max_disk_bytes``, the server's
``--max-uploads-disk-mb``), besides each upload's ``UploadLimits``: the bytes of
the committed uploads (until their files are removed) plus every byte the uploads
in progress have written. Each chunk is charged before it is written and refused
with ``Overloaded`` when it would pass the budget; an aborted upload's bytes are
freed, a committed one's when it is purged. The committed bytes are counted from
the disk (by ``clean_partial`` at start-up, else before the first upload), so a
restart counts what earlier runs left.

Example:
    >>> area = StagingArea("/srv/staging")  # doctest: +SKIP
    >>> up = area.open()  # doctest: +SKIP
    >>> up.write("scans/001.png", 0, png_bytes, last=True)  # doctest: +SKIP
    >>> summary = up.commit()  # doctest: +SKIP
    >>> area.path(summary.upload_id)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from segsvc.errors import InvalidArgument, NotFound, Overloaded, UploadError
from segsvc.files import NAME_MAX, fsync_published, fsync_tree
from segsvc.jobs.inputs import IMAGE_SUFFIXES

_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# One path component: ASCII letters, digits and a few punctuation marks; no
# leading dot (so no '.', '..' or hidden names, and no clash with '.incoming')
# or dash, no trailing space. Anything else is refused rather than escaped.
_COMPONENT = re.compile(r"[A-Za-z0-9_+@=,][A-Za-z0-9_+@=,. -]*(?<! )")
_PARTIAL, _DELETING, _INCOMING = ".partial", ".deleting", ".incoming"
# What the folder holds at most by default (``--max-uploads-disk-mb``): four uploads of the default largest size
# (``UploadLimits.max_total_bytes``, ``--max-upload-mb``).
MAX_DISK_BYTES = 8 << 30


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one upload, enforced chunk by chunk before any byte is written.

    Args:
        max_file_bytes: largest single file.
        max_total_bytes: all files of the upload together.
        max_files: number of distinct file names.
    """

    max_file_bytes: int = 64 << 20
    max_total_bytes: int = 2 << 30
    max_files: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_total_bytes", "max_files"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"UploadLimits.{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class UploadedFile:
    """One complete file of a committed upload; ``name`` is relative to the upload folder."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadSummary:
    """What a committed upload holds, files sorted by name."""

    upload_id: str
    files: tuple[UploadedFile, ...]
    total_bytes: int


class StagingArea:
    """Owns the staging root: opens, finds, deletes and cleans uploads.

    Safe to call from several threads: ids are random, every state change is
    a single ``mkdir`` or ``rename`` that the file system performs atomically,
    and the byte counts of the disk budget are kept under a lock.

    Args:
        root: folder holding the uploads; created if missing.
        limits: applied to every upload opened here.
        max_disk_bytes: most bytes the folder may hold: committed uploads plus the uploads in progress
            (``--max-uploads-disk-mb``); a chunk that would pass it is refused with ``Overloaded``.
    """

    def __init__(self, root: str | os.PathLike[str], limits: UploadLimits = UploadLimits(),
                 max_disk_bytes: int = MAX_DISK_BYTES) -> None:
        if not isinstance(max_disk_bytes, int) or max_disk_bytes < 1:
            raise InvalidArgument(f"StagingArea.max_disk_bytes must be at least 1, got {max_disk_bytes!r}")
        Path(root).mkdir(parents=True, exist_ok=True)
        self.root = Path(root).resolve(strict=True)
        self.limits = limits
        self.max_disk_bytes = max_disk_bytes
        self._lock = threading.Lock()
        # Bytes of the committed uploads, by id, until ``purge`` has removed their files (None: to be counted
        # from the disk); bytes written so far by the uploads in progress, by id. Both under ``_lock``.
        self._committed: dict[str, int] | None = None
        self._in_progress: dict[str, int] = {}

    def open(self) -> StagedUpload:
        """Start a new upload in ``<root>/<id>.partial/``.

        Raises ``Overloaded`` when the folder's budget (``max_disk_bytes``) has no byte left.
        """
        upload_id = secrets.token_hex(16)
        with self._lock:
            self._check_room(1)
            self._in_progress[upload_id] = 0
        try:
            folder = self.root / (upload_id + _PARTIAL)
            folder.mkdir()
            (folder / _INCOMING).mkdir()
        except BaseException:
            shutil.rmtree(self.root / (upload_id + _PARTIAL), ignore_errors=True)
            self._release(upload_id)
            raise
        return StagedUpload(self, upload_id, folder)

    # -- the folder's disk budget --------------------------------------------------------------
    def bytes_held(self) -> tuple[int, int]:
        """``(committed, in_progress)``: the bytes counted against ``max_disk_bytes``."""
        with self._lock:
            return sum(self._committed_bytes().values()), sum(self._in_progress.values())

    def _committed_bytes(self) -> dict[str, int]:
        """The committed (or detached, not yet purged) uploads' bytes by id, counted from the disk once (under
        ``_lock``)."""
        if self._committed is None:
            counted: dict[str, int] = {}
            for entry in self.root.iterdir():
                upload_id = entry.name.removesuffix(_DELETING)
                if _ID.fullmatch(upload_id) and entry.is_dir() and not entry.is_symlink():
                    counted[upload_id] = counted.get(upload_id, 0) + _tree_bytes(entry)
            self._committed = counted
        return self._committed

    def _check_room(self, size: int) -> None:
        """``Overloaded`` unless the folder has room for ``size`` more bytes (under ``_lock``)."""
        committed = sum(self._committed_bytes().values())
        in_flight = sum(self._in_progress.values())
        if committed + in_flight + size > self.max_disk_bytes:
            raise Overloaded(
                f"the uploads folder would hold more than {self.max_disk_bytes} bytes, the server's limit "
                f"(--max-uploads-disk-mb): {committed} bytes of committed uploads and {in_flight} of uploads in "
                f"progress; delete jobs you are done with (an upload is deleted with the last job that uses it), "
                f"or retry later: an upload that no job uses is deleted --upload-ttl-hours after its commit")

    def _charge(self, upload_id: str, size: int) -> None:
        """Count ``size`` bytes an upload in progress is about to write (negative: a refund), or refuse them."""
        with self._lock:
            if size > 0:
                self._check_room(size)
            self._in_progress[upload_id] = self._in_progress.get(upload_id, 0) + size

    def _release(self, upload_id: str) -> None:
        """An upload in progress ended without a commit: its bytes are free."""
        with self._lock:
            self._in_progress.pop(upload_id, None)

    def path(self, upload_id: str) -> Path:
        """The folder of a committed upload; ``NotFound`` while it is partial or after delete."""
        folder = self.root / _check_id(upload_id)
        if not folder.is_dir():
            raise NotFound(f"upload {upload_id!r} does not exist (never committed, or deleted)")
        return folder

    def no_images(self, upload_id: str) -> UploadError | None:
        """The refusal of a job over a committed upload that holds no image file, naming what it holds; None when
        it holds one.

        ``write`` refuses other files now, but an upload committed before it did (or written beside this class)
        may hold only notes; a job over it would be refused as "input '.' matches no image under the data
        root", which names neither the upload nor its files.
        """
        folder = self.path(upload_id)
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        if any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
            return None
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        held = f"it holds {len(names)} {'file' if len(names) == 1 else 'files'}: {shown}" if names else "it is empty"
        return UploadError(f"upload {upload_id} holds no image files ({held}): a job reads the "
                           f"{', '.join(IMAGE_SUFFIXES)} files of an upload; upload images")

    def delete(self, upload_id: str) -> None:
        """Remove a committed upload: renamed away first, so ``path`` never sees it half-gone."""
        self.detach(upload_id)
        self.purge(upload_id)

    def detach(self, upload_id: str) -> None:
        """The first, atomic half of ``delete``: rename ``<id>`` to ``<id>.deleting``.

        From then on ``path`` raises ``NotFound``; ``purge`` (or, after a crash,
        ``clean_partial``) removes the files. Quick, so it can run inside a store
        transaction. Raises ``NotFound`` when the upload is not committed.
        """
        folder = self.root / _check_id(upload_id)
        try:
            folder.rename(self.root / (upload_id + _DELETING))
        except FileNotFoundError:
            raise NotFound(f"upload {upload_id!r} does not exist (never committed, or deleted)") from None

    def purge(self, upload_id: str) -> None:
        """The second half of ``delete``: remove the files of a detached upload (none left: nothing to do).

        Its bytes stay counted against ``max_disk_bytes`` until its files are gone.
        """
        shutil.rmtree(self.root / (_check_id(upload_id) + _DELETING), ignore_errors=True)
        with self._lock:
            if self._committed is not None and not (self.root / upload_id).exists():
                self._committed.pop(upload_id, None)

    def committed_before(self, cutoff: float) -> list[str]:
        """Ids of the committed uploads whose commit time (the folder's mtime) is before ``cutoff``.

        ``commit`` removes ``.incoming`` just before its rename, and nothing is
        written into a committed upload, so its mtime is when it was committed.
        """
        found = []
        for entry in self.root.iterdir():
            if not _ID.fullmatch(entry.name):
                continue
            try:
                info = entry.lstat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_mtime < cutoff:
                found.append(entry.name)
        return sorted(found)

    def clean_partial(self) -> int:
        """Remove uploads left unfinished by a crash; returns how many folders went.

        Call at start-up, before any ``open``: it cannot tell a leftover from an
        upload in progress. Then counts the committed uploads' bytes from the disk (``max_disk_bytes``).
        """
        removed = 0
        for entry in self.root.iterdir():
            if entry.name.endswith((_PARTIAL, _DELETING)) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        with self._lock:
            self._committed = None
            self._committed_bytes()
        return removed


def _tree_bytes(folder: Path) -> int:
    """The sizes of the regular files under ``folder`` (links not followed; files gone meanwhile skipped)."""
    total = 0
    for parent, _dirs, names in os.walk(folder):
        for name in names:
            try:
                info = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _check_id(upload_id: str) -> str:
    """Refuse anything but the ids ``open`` makes, so an id can never name another path."""
    if not isinstance(upload_id, str) or not _ID.fullmatch(upload_id):
        raise InvalidArgument(f"upload id {upload_id!r} is malformed: expected 32 lower-case hex digits")
    return upload_id


def check_upload_name(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise ``UploadError`` saying why."""
    if not isinstance(name, str) or not name:
        raise UploadError("upload file name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        raise UploadError(f"upload file name {name[:40]!r}... is longer than {NAME_MAX} bytes")
    if "\x00" in name:
        raise UploadError(f"upload file name {name!r} contains a NUL character")
    if "\\" in name:
        raise UploadError(f"upload file name {name!r} contains a backslash: separate folders with '/'")
    if name.startswith("/"):
        raise UploadError(f"upload file name {name!r} is absolute: give a path relative to the upload")
    for part in name.split("/"):
        if part == "":
            raise UploadError(f"upload file name {name!r} has an empty component ('//' or a trailing '/')")
        if part in (".", ".."):
            raise UploadError(f"upload file name {name!r} contains {part!r}")
        if not _COMPONENT.fullmatch(part):
            raise UploadError(
                f"upload file name {name!r}: component {part!r} may use only letters, digits, "
                f"space and _+@=,.- and may not start with '.', '-' or ' ' nor end with ' '"
            )
    return name


@dataclass
class _Incoming:
    """Progress of one file: where its bytes go and what has arrived."""

    tmp: Path
    received: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    done: bool = False


class StagedUpload:
    """One upload being received; used by one caller (not thread-safe).

    Every refused chunk leaves the upload as it was, but the caller is
    expected to ``abort`` on an error (a client that broke a limit is not
    worth waiting for). ``commit`` succeeds only if every named file is
    complete.
    """

    def __init__(self, area: StagingArea, upload_id: str, folder: Path) -> None:
        self.upload_id = upload_id
        self._area = area
        self._limits = area.limits
        self._folder = folder
        self._files: dict[str, _Incoming] = {}
        self._folders: set[str] = set()  # parent folders of the names, to refuse 'a' next to 'a/b'
        self._total_bytes = 0
        self._closed = ""  # "committed" or "aborted" once it is

    def write(self, name: str, offset: int, data: bytes, *, last: bool, sha256: str = "") -> None:
        """Append one chunk of ``name`` at ``offset``; with ``last`` the file is complete.

        Raises:
            UploadError: unsafe name, a name reused, a chunk out of order or
                after the last one, a limit that this chunk would pass, a
                malformed or mismatching ``sha256``; nothing is written then.
            Overloaded: the chunk would take the staging folder past its
                budget (``StagingArea.max_disk_bytes``); nothing is written.
        """
        if self._closed:
            raise UploadError(f"upload {self.upload_id} is already {self._closed}")
        state = self._files.get(name)
        if state is None:
            state = self._register(name, offset)
        if state.done:
            raise UploadError(f"file {name!r} is already complete: a name cannot be written twice")
        if offset != state.received:
            raise UploadError(f"chunk for {name!r} at offset {offset}, expected {state.received}")
        limits = self._limits
        if state.received + len(data) > limits.max_file_bytes:
            raise UploadError(f"file {name!r} exceeds the per-file limit of {limits.max_file_bytes} bytes")
        if self._total_bytes + len(data) > limits.max_total_bytes:
            raise UploadError(f"upload exceeds its total limit of {limits.max_total_bytes} bytes")
        hasher = state.hasher.copy()
        hasher.update(data)
        if last and sha256:
            if not _SHA256.fullmatch(sha256):
                raise UploadError(f"sha256 for {name!r} is not 64 hex digits")
            if hasher.hexdigest() != sha256.lower():
                raise UploadError(f"hash mismatch for {name!r}: the received bytes differ from the client's")
        if data:  # charged against the folder's budget before a byte is written; refused: Overloaded
            self._area._charge(self.upload_id, len(data))
        try:
            _write_at(state.tmp, state.received, data, sync=last)
        except BaseException:
            if data:  # nothing counts as written (the next write at this offset cuts any tail)
                self._area._charge(self.upload_id, -len(data))
            raise
        state.hasher = hasher
        state.received += len(data)
        self._total_bytes += len(data)
        if last:
            final = self._folder / name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(state.tmp, final)
            state.done = True

    def _register(self, name: str, offset: int) -> _Incoming:
        """Admit a new file name: safe, unused, not clashing with a folder, within max_files."""
        check_upload_name(name)
        if name in self._folders:
            raise UploadError(f"file name {name!r} is already a folder of another uploaded file")
        parents = name.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            if "/".join(parents[:i]) in self._files:
                raise UploadError(f"file name {name!r} puts a folder where file {'/'.join(parents[:i])!r} is")
        if not name.lower().endswith(IMAGE_SUFFIXES):
            # a job reads an upload as a folder, by suffix: another file would be kept, then left out unread
            raise UploadError(f"upload file {name!r} is not an image file: a job reads only the "
                              f"{', '.join(IMAGE_SUFFIXES)} files of an upload (by name); upload images only")
        if offset != 0:
            raise UploadError(f"chunk for {name!r} at offset {offset}, expected 0")
        if len(self._files) + 1 > self._limits.max_files:
            raise UploadError(f"upload exceeds its limit of {self._limits.max_files} files")
        state = _Incoming(self._folder / _INCOMING / str(len(self._files)))
        self._files[name] = state
        self._folders.update("/".join(parents[:i]) for i in range(1, len(parents) + 1))
        return state

    def commit(self) -> UploadSummary:
        """Seal the upload: every file must be complete; ``<id>.partial`` becomes ``<id>`` atomically."""
        if self._closed:
            raise UploadError(f"upload {self.upload_id} is already {self._closed}")
        if not self._files:
            raise UploadError(f"upload {self.upload_id} has no files")
        incomplete = sorted(n for n, s in self._files.items() if not s.done)
        if incomplete:
            shown = ", ".join(repr(n) for n in incomplete[:5]) + (" ..." if len(incomplete) > 5 else "")
            raise UploadError(f"cannot commit: {len(incomplete)} file(s) lack their last chunk: {shown}")
        (self._folder / _INCOMING).rmdir()  # also stamps the folder's mtime: the commit time
        # Its files were synced as each completed; their renames into place, and the folders made for them, are
        # synced here: a power cut must not leave a committed upload that lacks files.
        fsync_tree(self._folder, files=False)
        area = self._area
        with area._lock:  # the bytes move from "in progress" to "committed" with the rename, never counted twice
            os.rename(self._folder, area.root / self.upload_id)
            self._closed = "committed"
            area._in_progress.pop(self.upload_id, None)
            area._committed_bytes()[self.upload_id] = self._total_bytes
        fsync_published(f"upload {self.upload_id}", [self._area.root])
        files = tuple(
            UploadedFile(name, s.received, s.hasher.hexdigest())
            for name, s in sorted(self._files.items())
        )
        return UploadSummary(self.upload_id, files, self._total_bytes)

    def abort(self) -> None:
        """Drop everything received; safe to call twice, and a no-op after ``commit``."""
        if self._closed:
            return
        self._closed = "aborted"
        shutil.rmtree(self._folder, ignore_errors=True)
        self._area._release(self.upload_id)


def _write_at(path: Path, offset: int, data: bytes, *, sync: bool) -> None:
    """Write ``data`` at ``offset`` and cut the file there, so a failed earlier write leaves no tail."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        os.ftruncate(fd, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
