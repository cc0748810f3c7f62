"""segsvc.files: write_atomic (the modes of what it writes, and what it leaves behind) and sha256_hex."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from segsvc.files import sha256_hex, write_atomic


def _written_under(umask: int, path: Path, data: bytes, mode: int | None = None) -> int:
    old = os.umask(umask)
    try:
        write_atomic(path, data, mode)
    finally:
        os.umask(old)
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_mode_the_umask_allows(tmp_path, umask, expected) -> None:
    """A new file was 0644 whatever the umask: under 077 a manifest, a run's metrics or a CLI
    label map was readable by every user, while the weights beside it were 0600."""
    path = tmp_path / "metrics.json"
    assert _written_under(umask, path, b"{}\n") == expected
    assert path.read_bytes() == b"{}\n"


def test_a_replaced_file_keeps_its_mode(tmp_path) -> None:
    path = tmp_path / "DEFAULT"
    path.write_bytes(b"1\n")
    path.chmod(0o600)
    assert _written_under(0o022, path, b"2\n") == 0o600
    assert path.read_bytes() == b"2\n"


def test_a_given_mode_wins_over_the_umask_and_the_old_file(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    path.chmod(0o600)
    assert _written_under(0o077, path, b"new", 0o640) == 0o640


def test_no_temporary_is_left_behind(tmp_path) -> None:
    path = tmp_path / "a.png"
    write_atomic(path, b"1")
    write_atomic(path, b"2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "DEFAULT"
    path.write_bytes(b"1\n")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"2\n")
    assert path.read_bytes() == b"1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DEFAULT"]


def test_sha256_hex_of_a_path_and_of_an_open_file_from_where_it_stands(tmp_path) -> None:
    """One helper for the weights' and the exports' checksums (three copies before): a path is hashed whole,
    an open file from its position (the loader hashes the file it has open, after nothing was read)."""
    data = os.urandom(3 << 20) + b"tail"  # over one read chunk
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    assert sha256_hex(path) == sha256_hex(str(path)) == hashlib.sha256(data).hexdigest()
    with open(path, "rb") as f:
        f.seek(5)
        assert sha256_hex(f) == hashlib.sha256(data[5:]).hexdigest()
