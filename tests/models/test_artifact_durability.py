"""A published version survives a crash or a power cut whole, and a manifest's name is a model name."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from segsvc.config import ModelSpec
from segsvc.errors import AlreadyExists, ArtifactError, InvalidArgument
from segsvc.models.artifact import (
    MANIFEST_FILE, WEIGHTS_FILE, load_artifact, read_manifest, save_artifact, write_manifest,
)
from segsvc.models.registry import build_model

SPEC = ModelSpec("unet", 3, 1, {"base_channels": 4, "depth": 2})


def publish(root: Path, name: str = "m", version: int | None = None) -> Path:
    return save_artifact(build_model(SPEC), root, name, spec=SPEC, version=version)


class DiskEvents:
    """Every fsync (the path of the file or folder it synced) and rename (its source and target), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, Path, Path | None]] = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")), None))
            real_fsync(fd)

        def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.events.append(("rename", Path(src).resolve(), Path(dst).resolve()))
            return real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def synced_before(self, index: int) -> list[Path]:
        return [path for kind, path, _ in self.events[:index] if kind == "fsync"]

    def publishing(self, final: Path) -> int:
        """The index of the rename that made ``final`` appear."""
        [index] = [i for i, (kind, _, dst) in enumerate(self.events) if kind == "rename" and dst == final.resolve()]
        return index


@pytest.mark.parametrize("new_model", [True, False])
def test_every_file_and_the_folder_are_on_disk_before_the_rename_and_the_rename_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_model: bool) -> None:
    """Files written and renamed into place without fsync: after a power cut the rename can be on disk while
    the data is not, an empty or torn weights.safetensors published as a version."""
    root = tmp_path / "repo"
    if not new_model:
        publish(root)
    disk = DiskEvents(monkeypatch)
    final = publish(root)
    index = disk.publishing(final)
    _, tmp, _ = disk.events[index]
    before = disk.synced_before(index)
    assert {tmp / WEIGHTS_FILE, tmp / MANIFEST_FILE, tmp} <= set(before)
    after = [path for kind, path, _ in disk.events[index + 1:] if kind == "fsync"]
    assert final.parent.resolve() in after  # the rename itself
    if new_model:
        assert root.resolve() in after  # the new model folder's entry in the root


def test_a_failed_fsync_publishes_nothing_and_leaves_no_temporary(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    publish(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ArtifactError, match="cannot write model m version 2: .*No space left"):
        publish(tmp_path)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_a_failed_sync_after_the_rename_still_reports_the_version_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The version is whole once renamed: reporting it unwritten (or "already exists") would have the caller
    publish the same weights again under the next number."""
    publish(tmp_path)
    model_dir = (tmp_path / "m").resolve()
    real_fsync = os.fsync

    def failing_on_the_model_folder(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == model_dir:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_on_the_model_folder)
    final = publish(tmp_path)
    assert final.name == "2" and read_manifest(final).version == 2
    assert "m/2 is published but the disk did not confirm it (Input/output error)" in caplog.text


# -- the manifest's name -------------------------------------------------------------------------------------
HOSTILE = ["m\nERROR forged log line", "../../etc", "", ".hidden", "m{job=\"x\"}", "a" * 200_000]


def _set_name(version: Path, name: object) -> None:
    data = json.loads((version / MANIFEST_FILE).read_text())
    data["name"] = name
    (version / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize("name", HOSTILE)
def test_a_manifest_naming_no_valid_model_is_refused_when_read(tmp_path: Path, name: str) -> None:
    version = publish(tmp_path)
    _set_name(version, name)
    for read in (read_manifest, load_artifact):
        with pytest.raises(ArtifactError, match="^manifest is invalid: invalid model name") as info:
            read(version)
        assert len(str(info.value)) < 500 and "\n" not in str(info.value)  # never the whole name, raw


def test_a_manifest_name_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    version = publish(tmp_path)
    _set_name(version, ["m"])
    with pytest.raises(ArtifactError, match="invalid model name"):
        read_manifest(version)


@pytest.mark.parametrize("name", HOSTILE[:3])
def test_a_manifest_naming_no_valid_model_is_never_written(tmp_path: Path, name: str) -> None:
    version = publish(tmp_path)
    before = (version / MANIFEST_FILE).read_bytes()
    with pytest.raises(ArtifactError, match="invalid model name"):
        write_manifest(version, replace(read_manifest(version), name=name))
    assert (version / MANIFEST_FILE).read_bytes() == before


@pytest.mark.parametrize("entry", ["\u00b2", "1234567890123456789"])
def test_a_folder_that_is_no_version_number_does_not_set_the_next_version(tmp_path: Path, entry: str) -> None:
    """``str.isdigit`` took "²" (``int`` then raised ValueError) and 19 digits (the next version, 20 digits, was
    published where the repository, which reads at most 18, never sees it)."""
    publish(tmp_path)
    (tmp_path / "m" / entry).mkdir()
    assert publish(tmp_path).name == "2"


@pytest.mark.parametrize("kind", ["file", "broken symlink"])
def test_a_version_number_taken_by_something_else_than_a_folder_is_not_published_again(tmp_path: Path,
                                                                                     kind: str) -> None:
    """Only folders counted: a file "2" made every publish pick 2 and fail with AlreadyExists (a retrain job's
    publish retried the same number until it gave up); a dangling symlink "2" failed the rename."""
    publish(tmp_path)
    taken = tmp_path / "m" / "2"
    if kind == "file":
        taken.write_text("not a version")
    else:
        taken.symlink_to(tmp_path / "missing")
    assert publish(tmp_path).name == "3"


def test_a_version_the_repository_could_not_read_is_never_published(tmp_path: Path) -> None:
    """Version 10**18 (19 digits) was written, where the repository, which reads at most 18, never saw it."""
    with pytest.raises(InvalidArgument, match="model versions have at most 18 digits, got 1000000000000000000"):
        publish(tmp_path, version=10**18)
    assert list((tmp_path / "m").iterdir()) == []
    assert publish(tmp_path, version=10**18 - 1).name == "9" * 18


def test_a_version_number_taken_by_a_dangling_symlink_already_exists(tmp_path: Path) -> None:
    """``exists`` follows the link: it said the number was free, and the rename failed with an OSError."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "2").symlink_to(tmp_path / "missing")
    with pytest.raises(AlreadyExists, match="model m version 2 already exists"):
        publish(tmp_path, version=2)
