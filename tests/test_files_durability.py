"""State that must survive a power cut: every rename that publishes it is followed by a fsync of its folder.

``write_atomic`` (a model's DEFAULT pointer, a version's manifest.json), the removal of DEFAULT, a committed
upload and a Triton model directory; and the one helper that syncs a file or a folder (``files.fsync_path``).
The order of the calls is recorded, never timed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import pytest

from segsvc import files
from segsvc.export.onnx import export_onnx
from segsvc.export.triton import export_triton
from segsvc.files import write_atomic
from segsvc.inference.repository import DEFAULT_FILE, ModelRepository
from segsvc.jobs.staging import StagingArea
from segsvc.models.artifact import read_manifest, write_manifest
from tests.export.conftest import TINY, publish

Event = tuple[str, Path]


def _fd_path(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


class Disk:
    """Every fsync (the path it synced), rename or replace (its target) and unlink, in order; ``fail`` may
    name an errno for the fsync of a path (then raised instead)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: Callable[[Path], int | None] = lambda _: None) -> None:
        self.events: list[Event] = []
        real_fsync, real_rename, real_replace, real_unlink = os.fsync, os.rename, os.replace, os.unlink

        def fsync(fd: int) -> None:
            path = _fd_path(fd)
            code = fail(path)
            if code is not None:
                raise OSError(code, os.strerror(code))
            self.events.append(("fsync", path))
            real_fsync(fd)

        def moved(real: Callable[..., None]) -> Callable[..., None]:
            def move(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
                real(src, dst, *args, **kwargs)
                self.events.append(("rename", Path(dst).resolve()))
            return move

        def unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            real_unlink(path, *args, **kwargs)
            self.events.append(("unlink", Path(path).resolve()))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", moved(real_rename))
        monkeypatch.setattr(os, "replace", moved(real_replace))
        monkeypatch.setattr(os, "unlink", unlink)

    def after(self, kind: str, path: Path) -> list[Event]:
        """The events after the last ``kind`` event on ``path``."""
        [*_, index] = [i for i, event in enumerate(self.events) if event == (kind, path.resolve())]
        return self.events[index + 1:]

    def synced(self) -> list[Path]:
        return [path for kind, path in self.events if kind == "fsync"]


# -- write_atomic and the repository's writers --------------------------------------------------------------
def test_write_atomic_syncs_the_file_renames_it_then_syncs_the_folder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename was never synced: after a power cut the folder could still name the old file (or none)."""
    disk = Disk(monkeypatch)
    path = write_atomic(tmp_path / "DEFAULT", b"3\n")
    [(first, tmp), *rest] = disk.events
    assert first == "fsync" and tmp.name.startswith(".tmp-DEFAULT-")
    assert rest == [("rename", path.resolve()), ("fsync", tmp_path.resolve())]
    assert path.read_bytes() == b"3\n"


def _promote(root: Path) -> Path:
    ModelRepository(root).set_default("m", 1)
    return root / "m" / DEFAULT_FILE


def _unpin(root: Path) -> Path:
    ModelRepository(root).set_default("m", None)
    return root / "m" / DEFAULT_FILE


def _record_export(root: Path) -> Path:
    version = root / "m" / "1"
    write_manifest(version, read_manifest(version))
    return version / "manifest.json"


@pytest.mark.parametrize("switch, kind", [(_promote, "rename"), (_unpin, "unlink"), (_record_export, "rename")])
def test_a_switched_pointer_or_manifest_is_followed_by_a_fsync_of_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: Callable[[Path], Path], kind: str) -> None:
    """DEFAULT (a promotion, SetDefaultVersion, its removal) and manifest.json (an export recorded) were renamed
    or unlinked without syncing their folder: a power cut could bring back the old default or manifest."""
    publish(tmp_path, "m", TINY["unet"])
    ModelRepository(tmp_path).set_default("m", 1)
    disk = Disk(monkeypatch)
    path = switch(tmp_path)
    assert ("fsync", path.parent.resolve()) in disk.after(kind, path)


# -- the one helper -------------------------------------------------------------------------------------------
def test_a_folder_its_filesystem_cannot_sync_is_let_be_and_nothing_else(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL is what a filesystem without folder fsync says; a file's EINVAL, or EIO anywhere, is a failure."""
    (tmp_path / "f").write_bytes(b"x")
    Disk(monkeypatch, fail=lambda _: errno.EINVAL)
    files.fsync_folder(tmp_path)
    with pytest.raises(OSError) as info:
        files.fsync_path(tmp_path / "f")
    assert info.value.errno == errno.EINVAL
    Disk(monkeypatch, fail=lambda _: errno.EIO)
    for sync in (lambda: files.fsync_folder(tmp_path), lambda: files.fsync_path(tmp_path / "f")):
        with pytest.raises(OSError) as info:
            sync()
        assert info.value.errno == errno.EIO


# -- a committed upload ---------------------------------------------------------------------------------------
def test_a_committed_upload_has_its_folders_on_disk_before_the_rename_and_the_rename_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the staging root was synced, after the rename: the renames of the files into their folders, and the
    folders made for them, could be lost to a power cut, leaving a committed upload without its files."""
    area = StagingArea(tmp_path / "staging")
    disk = Disk(monkeypatch)
    up = area.open()
    partial = area.root / f"{up.upload_id}.partial"
    up.write("scans/a/001.png", 0, b"first", last=True)
    up.write("b.png", 0, b"second", last=True)
    final = area.path(up.commit().upload_id)
    [index] = [i for i, event in enumerate(disk.events) if event == ("rename", final)]
    synced_before = [path for kind, path in disk.events[:index] if kind == "fsync"]
    assert {partial, partial / "scans", partial / "scans" / "a"} <= set(synced_before)
    assert ("fsync", area.root) in disk.events[index + 1:]


def test_an_upload_commits_where_folders_cannot_be_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own copy of the folder fsync refused EINVAL (a filesystem without folder fsync): no upload committed."""
    area = StagingArea(tmp_path / "staging")
    up = area.open()
    up.write("a.png", 0, b"bytes", last=True)
    Disk(monkeypatch, fail=lambda path: errno.EINVAL if path.is_dir() else None)
    summary = up.commit()
    assert (area.path(summary.upload_id) / "a.png").read_bytes() == b"bytes"


# -- a Triton model directory ---------------------------------------------------------------------------------
def _exported(tmp_path: Path) -> tuple[Path, Path]:
    version_dir = publish(tmp_path / "repo", "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    export_triton(version_dir, out)
    return version_dir, out


def test_a_model_directory_whose_folder_did_not_reach_the_disk_is_not_swapped_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any failed folder fsync was let be like a filesystem without folder fsync: a folder whose fsync said EIO
    (its entries maybe not on disk) was renamed into the Triton repository all the same."""
    version_dir, out = _exported(tmp_path)
    served = os.stat(out / "m").st_ino
    Disk(monkeypatch, fail=lambda path: errno.EIO if "tmp-m-" in path.name and path.is_dir() else None)
    with pytest.raises(OSError) as info:
        export_triton(version_dir, out)
    assert info.value.errno == errno.EIO
    assert os.stat(out / "m").st_ino == served  # the old model directory, still served


def test_a_swapped_in_model_directory_is_reported_when_out_cannot_be_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The new model directory is whole once renamed: the export succeeds, and the unconfirmed rename is logged
    (it was let be silently)."""
    version_dir, out = _exported(tmp_path)
    Disk(monkeypatch, fail=lambda path: errno.EIO if path == out.resolve() else None)
    result = export_triton(version_dir, out)
    assert result.config.is_file()
    assert "is published but the disk did not confirm it (Input/output error)" in caplog.text


def test_a_write_that_fails_before_its_first_byte_closes_its_temporary(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed ``fchmod`` (a mode the filesystem refuses) left the temporary's descriptor open: a server that
    retries the write runs out of descriptors."""
    def refused(fd: int, mode: int) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "fchmod", refused)
    open_before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(PermissionError):
        write_atomic(tmp_path / "model.onnx", b"onnx", 0o644)
    assert sorted(os.listdir("/proc/self/fd")) == open_before
    assert list(tmp_path.iterdir()) == []
