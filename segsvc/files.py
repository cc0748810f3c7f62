"""Files on the server's disk: written so no reader sees them half-written, read so no path leaves its root.

``write_atomic``: a temporary sibling, fsync, a rename, then a fsync of the
folder. A reader (the model repository's scan, a server loading a version) sees
the old file or the new one, a crash leaves at most a ``.tmp-*`` sibling behind,
and once it returns a power cut keeps the new file (a rename is on disk only
once its folder is synced).

``fsync_path``, ``fsync_folder``, ``fsync_tree`` and ``fsync_published``: the one
way the package puts a file, a folder's entries or a whole tree on disk, for
every writer that publishes state by a rename.

``check_path_length``: a path a request names, refused by its length before the
filesystem is asked about it (which raises "File name too long", an internal
error to the client, rather than a refusal naming the path).

``open_beneath``: a file a request named, opened from its root one path
component at a time without following symlinks. A check that resolves the path
and finds it inside the root says nothing about the moment of the open: a
folder on the path can be swapped for a symlink in between. Opening the
already-resolved path this way makes such a swap fail the open instead of
leading it out of the root.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from segsvc.errors import InvalidArgument

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in opens at once (then is refused below) instead of blocking the reader forever.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


NAME_MAX = 255  # bytes in one path component: ext4, XFS, btrfs, APFS, NTFS (in UTF-16 units)
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included (Linux)


def check_path_length(root: str | os.PathLike[str], path: str, what: str) -> None:
    """Refuse ``path`` (relative to ``root``) with a component over ``NAME_MAX`` bytes, or longer than the OS takes
    under ``root``; ``what`` names it in the message ("input", "folder"), with the path's beginning.

    Raises:
        InvalidArgument: naming the path, which component, or how long it is against how long it may be.
    """
    shown = repr(path if len(path) <= 60 else path[:60] + "...")
    for part in PurePosixPath(path).parts:
        if (size := len(os.fsencode(part))) > NAME_MAX:
            named = repr(part if len(part) <= 24 else part[:24] + "...")
            raise InvalidArgument(f"{what} {shown} has a name of {size} bytes ({named}): more than {NAME_MAX}, the "
                                  f"longest file or folder name")
    most = PATH_MAX - 1 - len(os.fsencode(os.path.abspath(root))) - 1  # the root and the "/" after it
    if (size := len(os.fsencode(path))) > most:
        raise InvalidArgument(f"{what} {shown} is {size} bytes long: more than {most}, the longest path the server "
                              f"can open under its root")


class PathChanged(OSError):
    """A component of a path being opened is a symlink, or no longer a folder: refused, never followed."""


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically and durably.

    Args:
        path: the file to write; its folder must exist.
        data: the whole new content.
        mode: permission bits; ``None`` keeps those of the file being replaced, and a new file
            gets what a plain ``open`` would give it (0666 less the umask, a default ACL applied).

    Raises:
        OSError: the kernel's; also after the rename when the folder cannot be synced (the new file is in
            place but maybe not on disk: writing it again is harmless).

    Example:
        >>> write_atomic(tmp / "DEFAULT", b"3\\n")  # doctest: +SKIP
    """
    path = Path(path)
    if mode is None and path.exists():
        mode = path.stat().st_mode & 0o777
    fd, tmp = _temporary_file(path)
    try:
        with os.fdopen(fd, "wb") as f:  # first: whatever fails next, the descriptor is closed
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)  # the rename itself: without it a power cut may bring the old file back
    return path


def fsync_path(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """``fsync`` a file, or a folder (its entries: the names renamed, made or removed in it).

    A file is opened without following a symlink, so what is synced is the file written; a folder is
    followed (a Triton ``out`` may be a symlink to one). A folder its filesystem cannot sync (``EINVAL``:
    some network and FUSE filesystems) is let be; any other failure (``EIO``) is raised: what it was to
    put on disk may not be there.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY if folder else os.O_RDONLY | os.O_NOFOLLOW
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike[str]) -> None:
    """Put the entries of the folder ``path`` on disk: POSIX makes a rename, a new name or a removed one in
    it durable only once the folder itself is synced (``fsync_path``)."""
    fsync_path(path, folder=True)


def fsync_tree(root: str | os.PathLike[str], *, files: bool = True) -> None:
    """``fsync`` every file under the folder ``root`` (unless ``files`` is false: the caller synced them), then
    every folder, deepest first: a tree renamed into place before it is on disk could be published empty or
    torn by a power cut. A folder that cannot be listed is raised, not skipped."""
    for dirpath, _, filenames in os.walk(root, topdown=False, onerror=_raise):
        for name in filenames if files else ():
            fsync_path(os.path.join(dirpath, name))
        fsync_folder(dirpath)


def _raise(exc: OSError) -> None:
    raise exc


def fsync_published(what: str, folders: Iterable[str | os.PathLike[str]]) -> None:
    """Sync ``folders`` after a rename published ``what`` whole (``fsync_folder``); a failure is logged, not
    raised.

    What was renamed was on disk before: were the rename lost, a power cut would leave the old state, never
    a torn one. A caller told it failed would publish it again (a second model version, an upload the client
    sends anew).
    """
    try:
        for folder in folders:
            fsync_folder(folder)
    except OSError as exc:
        log.warning("%s is published but the disk did not confirm it (%s); a power cut may lose it",
                    what, exc.strerror or type(exc).__name__)


def _temporary_file(path: Path) -> tuple[int, Path]:
    """A new, empty ``.tmp-<name>-XXXXXXXX`` beside ``path``, open for writing, created as ``open`` creates files.

    ``tempfile.mkstemp`` creates 0600 whatever the umask; this leaves the mode to the umask
    (and a default ACL), as ``open`` does.
    """
    for _ in range(100):
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(path.parent))


def sha256_hex(source: str | os.PathLike[str] | BinaryIO) -> str:
    """The hex SHA-256 of a file: a path, or a file opened in binary mode on disk, read from where it stands to
    its end (``hashlib.file_digest`` hashes an in-memory ``BytesIO`` whole, wherever it stands)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.file_digest(source, "sha256").hexdigest()


def widen_to_umask(folder: str | os.PathLike[str]) -> None:
    """Give a private temporary ``folder`` and the files in it the permissions a plain ``mkdir`` and ``open``
    would have: what the process umask allows (0755 and 0644 under umask 022).

    ``tempfile.mkdtemp`` makes a folder 0700, and writers that go through a private temporary
    file (safetensors) leave 0600. A model version published that way could be read only by
    the user who wrote it: a server or a copy running as another user (a container's uid)
    could not load it. Call it before the folder is renamed into place. The modes are read from a probe folder and file made here,
    so no umask is changed (that is process-wide, and racy with other threads).
    """
    folder = Path(folder)
    probe = folder / ".umask-probe"
    os.mkdir(probe, 0o777)
    try:
        dir_mode = stat.S_IMODE(probe.stat().st_mode)  # with the setgid bit a group-shared repository passes on
    finally:
        os.rmdir(probe)
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o666))
    try:
        file_mode = probe.stat().st_mode & 0o777
    finally:
        os.unlink(probe)
    for path in folder.iterdir():
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            os.chmod(path, file_mode)
        elif stat.S_ISDIR(info.st_mode):
            widen_to_umask(path)
    os.chmod(folder, dir_mode)


def open_beneath(root: str | os.PathLike[str], rel: str | os.PathLike[str]) -> BinaryIO:
    """Open the regular file ``root/rel`` for reading, following no symlink below ``root``.

    ``rel`` is a path the caller has already resolved and confined (it names no
    symlink), so any symlink met on the way appeared since that check: the open
    fails rather than follow it, whichever component it replaced. ``root`` itself
    is opened normally (it is configuration, not a request).

    Args:
        root: the folder the file must lie in.
        rel: the file's path below ``root``: relative, without ``.``, ``..`` or empty components.

    Returns:
        The open file (binary); the caller closes it.

    Raises:
        PathChanged: a component is now a symlink, or no longer a folder (``ELOOP``, ``ENOTDIR``).
        OSError: anything else the kernel says (missing, permissions), or the file is not a regular file.
        ValueError: ``rel`` is absolute or has a ``.``, ``..`` or empty component.

    Example:
        >>> with open_beneath(real_root, "scans/a/001.png") as f:  # doctest: +SKIP
        ...     data = f.read()
    """
    parts = str(rel).split("/")
    if PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{str(rel)!r} is not a plain relative path")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                child = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # Linux says ENOTDIR for a link opened as a folder
                    raise PathChanged(exc.errno, _what_changed(part, fd)) from None
                raise
            os.close(fd)
            fd = child
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "rb")  # buffered: read(n) returns n bytes unless the file ends first
    except BaseException:
        os.close(fd)
        raise


def _what_changed(part: str, dir_fd: int) -> str:
    """Why ``part`` (in the folder ``dir_fd``) could not be opened without following a symlink, for a message."""
    try:
        is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    return "a symlink appeared on its path" if is_link else "a folder on its path was replaced"
