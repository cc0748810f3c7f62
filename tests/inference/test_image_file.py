"""Reading an image file below its root: no symlink followed below the root, the file read once.

``segsvc.files.open_beneath`` opens a resolved path one component at a time
without following symlinks; ``ImageFile`` reads through it and decodes the bytes
its header was read from.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from segsvc.errors import ImageTooLarge, InvalidImage, PathOutsideRoot
from segsvc.files import PathChanged, open_beneath
from segsvc.inference.service import ImageFile
from tests.server.conftest import encode


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """``root/a/b/x.png`` inside, ``outside/b/x.png`` (other bytes) beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for base, level in ((root / "a" / "b", 0), (outside / "b", 255)):
        base.mkdir(parents=True)
        (base / "x.png").write_bytes(encode(np.full((4, 6, 3), level, np.uint8)))
    return root, outside


# -- open_beneath ----------------------------------------------------------------------------------------
def test_a_plain_path_opens_and_reads_its_bytes(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    with open_beneath(root, "a/b/x.png") as f:
        assert f.read() == (root / "a" / "b" / "x.png").read_bytes()


@pytest.mark.parametrize("swapped", ["a", "a/b", "a/b/x.png"])
def test_a_symlinked_component_is_refused(tmp_path: Path, swapped: str) -> None:
    root, outside = _tree(tmp_path)
    target = {"a": outside, "a/b": outside / "b", "a/b/x.png": outside / "b" / "x.png"}[swapped]
    os.rename(root / swapped, root / f"{swapped}.real")
    os.symlink(target, root / swapped)
    with pytest.raises(PathChanged, match="a symlink appeared"):
        open_beneath(root, "a/b/x.png")


def test_a_symlink_to_inside_the_root_is_refused_too(tmp_path: Path) -> None:
    """The caller opens the resolved path: a symlink met there was not there when it resolved it."""
    root, _ = _tree(tmp_path)
    os.rename(root / "a" / "b", root / "a" / "c")
    os.symlink("c", root / "a" / "b")
    with pytest.raises(PathChanged):
        open_beneath(root, "a/b/x.png")


def test_a_folder_replaced_by_a_file_is_refused(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    os.rename(root / "a" / "b", root / "a" / "b.real")
    (root / "a" / "b").write_bytes(b"not a folder")
    with pytest.raises(PathChanged, match="a folder on its path was replaced"):
        open_beneath(root, "a/b/x.png")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside/b/x.png", "a/../a/b/x.png", "a//b/x.png", "./a/b/x.png",
                                 ""])
def test_a_path_that_is_not_plain_and_relative_is_refused(tmp_path: Path, rel: str) -> None:
    root, _ = _tree(tmp_path)
    with pytest.raises(ValueError):
        open_beneath(root, rel)


def test_a_fifo_or_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    os.mkfifo(root / "a" / "pipe.png")
    outcome: list[BaseException] = []
    opener = threading.Thread(target=lambda: _record(outcome, root, "a/pipe.png"), daemon=True)
    opener.start()
    opener.join(60)  # a refusal takes microseconds; only a FIFO open that blocks (for good) outlasts this
    assert not opener.is_alive(), "opening a FIFO blocked"
    assert [str(e) for e in outcome] == ["[Errno 22] not a regular file"]
    with pytest.raises(OSError, match="not a regular file"):
        open_beneath(root, "a/b")


def _record(outcome: list[BaseException], root: Path, rel: str) -> None:
    try:
        open_beneath(root, rel).close()
    except OSError as exc:
        outcome.append(exc)


# -- ImageFile ---------------------------------------------------------------------------------------------
def test_image_file_refuses_a_swapped_in_symlink_naming_the_input(tmp_path: Path) -> None:
    root, outside = _tree(tmp_path)
    source = ImageFile(root, "a/b/x.png", "scans/x.png", 1 << 20)
    os.rename(root / "a", root / "a.real")
    os.symlink(outside, root / "a")  # ... after the caller resolved and confined the path
    with pytest.raises(PathOutsideRoot, match=r"input 'scans/x.png' changed while it was read \(a symlink "
                                              r"appeared on its path\): refused"):
        source.peek()


def test_image_file_decodes_the_bytes_its_header_came_from(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    source = ImageFile(root, "a/b/x.png", "x.png", 1 << 20)
    assert source.peek() == (4, 6)
    (root / "a" / "b" / "new.png").write_bytes(encode(np.full((40, 60, 3), 255, np.uint8)))
    os.replace(root / "a" / "b" / "new.png", root / "a" / "b" / "x.png")  # replaced after the header was read
    image = source.load(1 << 20)
    assert image.shape[:2] == (4, 6) and image.max() == 0


def test_image_file_refuses_a_file_over_its_byte_limit_before_reading_it(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    size = (root / "a" / "b" / "x.png").stat().st_size
    with pytest.raises(ImageTooLarge, match=f"x.png is {size} bytes, over the limit of {size - 1} bytes"):
        ImageFile(root, "a/b/x.png", "x.png", size - 1).peek()
    assert ImageFile(root, "a/b/x.png", "x.png", size).peek() == (4, 6)


def test_image_file_names_a_missing_file(tmp_path: Path) -> None:
    root, _ = _tree(tmp_path)
    with pytest.raises(InvalidImage, match="gone.png cannot be read: No such file or directory"):
        ImageFile(root, "a/b/gone.png", "gone.png", 1 << 20).load(1 << 20)
