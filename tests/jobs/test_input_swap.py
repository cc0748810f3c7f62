"""A job reads each input once, from inside its root, even when the tree changes between the check and the read.

The runner confines an item's path (symlinks resolved) just before reading it; a
folder swapped for a symlink to the outside after that check must make the item
FAIL, never make it read the outside file. Deterministic: the swap is done by a
hook right after the check instead of by a racing process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from segsvc.errors import InvalidImage
from segsvc.inference.engine import Output
from segsvc.inference.service import ImageFile, Segmentation
from segsvc.jobs import batch
from segsvc.jobs.batch import JobRequest, JobRunner, JobsConfig
from segsvc.jobs.store import Job, JobStore
from tests.jobs.conftest import MANIFEST, FakeManager, run_to_end
from tests.server.conftest import encode

INSIDE, OUTSIDE = 0, 255  # the grey level of the images inside the data root and of those outside it


class _Service:
    """What ``JobRunner`` uses of ``InferenceService``, in its order: the header (``peek``) then the decode."""

    manager = FakeManager()

    def __init__(self, between: Callable[[ImageFile], None] | None = None) -> None:
        self.between = between  # called after the header was read, before the decode

    def resolve(self, model, version):  # type: ignore[no-untyped-def]
        return "m", 1, MANIFEST

    async def run_io(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, *args)

    async def segment(self, source: ImageFile, **_: object) -> Segmentation:
        size = await asyncio.to_thread(source.peek)
        if self.between is not None:
            self.between(source)
        image = await asyncio.to_thread(source.load, 1 << 24)
        if size != image.shape[:2]:  # as InferenceService._prepare: the budget was taken for the header's size
            raise InvalidImage(f"the image decodes to {image.shape[:2]}, not the {size} it declared before decoding")
        labels = np.zeros(image.shape[:2], np.uint8)
        counts = np.bincount(labels.ravel(), minlength=2).astype(np.int64)
        return Segmentation(image, Output(labels, class_counts=counts), MANIFEST, "m", 1, 0.0, 0.0, 1)  # type: ignore[arg-type]


def _grey(level: int, size: int = 8) -> bytes:
    return encode(np.full((size, size, 3), level, np.uint8))


def _run(tmp_path: Path, service: _Service) -> tuple[Job, Path]:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data",
                        window=1)

    async def main() -> Job:
        runner = JobRunner(store, service, config)  # type: ignore[arg-type]
        job = await runner.submit(JobRequest(model="m", paths=("race/scans",), overlay=True, overlay_alpha=0.2))
        return await run_to_end(runner, job.id)

    try:
        job = asyncio.run(main())
    finally:
        store.close()
    return job, tmp_path / "out" / job.id


def test_a_folder_swapped_for_a_symlink_after_the_check_fails_the_item_and_reads_nothing_outside(
        tmp_path: Path, monkeypatch) -> None:
    scans = tmp_path / "data" / "race" / "scans"
    secret = tmp_path / "secret"
    scans.mkdir(parents=True)
    secret.mkdir()
    for name in ("x0.png", "x1.png", "x2.png"):
        (scans / name).write_bytes(_grey(INSIDE))
        (secret / name).write_bytes(_grey(OUTSIDE))
    real_confined = batch._confined

    def check_then_swap(root, rel, *args, **kwargs):  # type: ignore[no-untyped-def]
        if scans.is_symlink():  # the next item finds the real folder again
            os.unlink(scans)
            os.rename(scans.with_name("scans.real"), scans)
        checked = real_confined(root, rel, *args, **kwargs)  # the check passes: the folder is real
        if rel == "race/scans/x1.png":  # ... and then the folder becomes a link to the outside
            os.rename(scans, scans.with_name("scans.real"))
            os.symlink(secret, scans)
        return checked

    monkeypatch.setattr(batch, "_confined", check_then_swap)
    job, out = _run(tmp_path, _Service())

    assert job.state == "SUCCEEDED", job.error
    assert (job.done, job.failed) == (2, 1)
    [failure] = job.result["failures"]
    assert failure["input"] == "race/scans/x1.png"
    assert "changed while it was read" in failure["reason"] and "symlink" in failure["reason"], failure["reason"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert not [p for p in written if "x1.png" in p], f"outputs were written for the swapped input: {written}"
    assert [p for p in written if p.startswith("overlay/")] == ["overlay/race/scans/x0.png.png",
                                                                 "overlay/race/scans/x2.png.png"]
    for rel in ("overlay/race/scans/x0.png.png", "overlay/race/scans/x2.png.png"):
        assert cv2.imread(str(out / rel)).mean() < 128, f"{rel} was made from a file outside the data root"


def test_a_symlink_inside_the_root_is_still_followed(tmp_path: Path) -> None:
    """The walker follows links that stay inside the root; reading them must keep working."""
    scans = tmp_path / "data" / "race" / "scans"
    elsewhere = tmp_path / "data" / "elsewhere"
    elsewhere.mkdir(parents=True)
    scans.parent.mkdir(parents=True)
    (elsewhere / "x0.png").write_bytes(_grey(INSIDE))
    os.symlink(elsewhere, scans)

    job, out = _run(tmp_path, _Service())

    assert (job.state, job.done, job.failed) == ("SUCCEEDED", 1, 0), job.result
    assert (out / "labels" / "race" / "scans" / "x0.png.png").is_file()


def test_the_header_and_the_decode_come_from_one_read(tmp_path: Path) -> None:
    """A file replaced between the header check and the decode is decoded as it was when its header was read."""
    scans = tmp_path / "data" / "race" / "scans"
    scans.mkdir(parents=True)
    (scans / "x0.png").write_bytes(_grey(INSIDE, size=8))

    def replace(source: ImageFile) -> None:  # a bigger image than the budget was taken for
        (scans / "x0.png.new").write_bytes(_grey(OUTSIDE, size=64))
        os.replace(scans / "x0.png.new", scans / "x0.png")

    job, out = _run(tmp_path, _Service(between=replace))

    assert (job.state, job.done, job.failed) == ("SUCCEEDED", 1, 0), job.result
    overlay = cv2.imread(str(out / "overlay" / "race" / "scans" / "x0.png.png"))
    assert overlay.shape[:2] == (8, 8) and overlay.mean() < 128


def test_a_link_that_vanishes_while_it_is_resolved_fails_only_that_item(tmp_path: Path, monkeypatch) -> None:
    """``os.path.realpath`` raises when a link it met is gone before it reads it (a folder being swapped):
    that item fails with the reason, the job goes on."""
    scans = tmp_path / "data" / "race" / "scans"
    scans.mkdir(parents=True)
    for name in ("x0.png", "x1.png", "x2.png"):
        (scans / name).write_bytes(_grey(INSIDE))
    real_confined, real_realpath = batch._confined, os.path.realpath

    def vanishing(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith("x1.png"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_realpath(path, *args, **kwargs)

    def check_while_swapping(root, rel, *args, **kwargs):  # type: ignore[no-untyped-def]
        with monkeypatch.context() as m:
            m.setattr(os.path, "realpath", vanishing)
            return real_confined(root, rel, *args, **kwargs)

    monkeypatch.setattr(batch, "_confined", check_while_swapping)
    job, out = _run(tmp_path, _Service())

    assert (job.state, job.done, job.failed) == ("SUCCEEDED", 2, 1), job.error
    [failure] = job.result["failures"]
    assert failure["input"] == "race/scans/x1.png" and "changed while it was resolved" in failure["reason"]
