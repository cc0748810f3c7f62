"""A registered dataset is on disk before its row says so: files and folders synced, renamed, the root synced."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from segsvc.datasets import registry as registry_module
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from tests.datasets.helpers import synth, tar_of


def test_a_dataset_is_on_disk_before_the_rename_and_the_rename_before_its_row(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    """Before: nothing was synced, so after a power cut the row could name a missing or torn folder."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data_root))
    events: list[tuple[str, str, str]] = []
    fsync, rename, db = os.fsync, os.rename, reg._db

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        fsync(fd)

    def recording_rename(src, dst) -> None:
        events.append(("rename", str(src), str(dst)))
        rename(src, dst)

    @contextlib.contextmanager
    def recording_db():
        events.append(("db", "", ""))
        with db() as connection:
            yield connection

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(registry_module.os, "rename", recording_rename)
    monkeypatch.setattr(reg, "_db", recording_db)
    try:
        up = reg.open_upload("shapes", "tar")
        up.write(tar_of(synth(data_root / "shapes"), prefix="shapes/"))
        dataset = up.commit()
    finally:
        reg.close()
    at = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2].endswith(dataset.sha256))
    work, final = Path(events[at][1]), Path(events[at][2])
    synced_before = {Path(p) for kind, p, _ in events[:at] if kind == "fsync"}
    stored = [p for p in final.rglob("*")]
    missing = [p.relative_to(final) for p in stored if work / p.relative_to(final) not in synced_before]
    assert stored and not missing, f"not synced before the rename: {missing[:5]}"
    row = next(i for i, e in enumerate(events) if i > at and e[0] == "db")
    assert ("fsync", str(final.parent), "") in events[at + 1: row], "the rename was not synced before the row"
