"""Files that readers must never see half-written: a temporary sibling, fsync, then a rename.

A reader (the model repository's scan, a server loading a version) sees the old
file or the new one, and a crash leaves at most a ``.tmp-*`` sibling behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically and durably.

    Args:
        path: the file to write; its folder must exist.
        data: the whole new content.
        mode: permission bits; ``None`` keeps those of the file being replaced
            (0644 for a new one), since a temporary file starts at 0600.

    Example:
        >>> write_atomic(tmp / "DEFAULT", b"3\\n")  # doctest: +SKIP
    """
    path = Path(path)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
