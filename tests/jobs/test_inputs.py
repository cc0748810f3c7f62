"""Job inputs: specs resolved under the data root, and uploads staged for a job.

Confinement is the point of both: every test that builds a symlink or an
unsafe name checks that the request is refused, and that no message names the
root's absolute location.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

import pytest

from segsvc.errors import InvalidArgument, NotFound, PathOutsideRoot, UploadError
from segsvc.jobs.inputs import InputFile, resolve_inputs
from segsvc.jobs.staging import StagedUpload, StagingArea, UploadLimits, UploadSummary


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A data root with nested images and non-images, and a sibling folder outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for rel in ["scans/a/001.png", "scans/a/002.JPG", "scans/a/notes.txt", "scans/b/deep/003.tif",
                "scans/c.webp", "other/x.png", "other/y.bmp", "README"]:
        _touch(root / rel, rel.encode())
    _touch(outside / "secret.png", b"secret")
    return root, outside


def _rels(files: list[InputFile]) -> list[str]:
    return [f.rel for f in files]


# -- resolve_inputs: what specs name -------------------------------------------------------------
def test_folder_is_walked_recursively_keeping_image_suffixes_sorted(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    files = resolve_inputs(root, ["scans"])
    assert _rels(files) == ["scans/a/001.png", "scans/a/002.JPG", "scans/b/deep/003.tif", "scans/c.webp"]
    for f in files:
        assert f.path.is_absolute() and f.path == (root / f.rel).resolve()
        assert f.path.read_bytes() == f.rel.encode()


def test_root_itself_as_dot_and_absolute_spec_inside_root(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    everything = ["other/x.png", "other/y.bmp", "scans/a/001.png", "scans/a/002.JPG",
                  "scans/b/deep/003.tif", "scans/c.webp"]
    assert _rels(resolve_inputs(root, ["."])) == everything
    assert _rels(resolve_inputs(root, [str(root / "other")])) == ["other/x.png", "other/y.bmp"]


def test_glob_single_level_and_recursive(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert _rels(resolve_inputs(root, ["scans/a/*.png"])) == ["scans/a/001.png"]
    assert _rels(resolve_inputs(root, ["scans/*/*"])) == ["scans/a/001.png", "scans/a/002.JPG", "scans/a/notes.txt"]
    assert _rels(resolve_inputs(root, ["**/*.png"])) == ["other/x.png", "scans/a/001.png"]
    assert _rels(resolve_inputs(root, ["scans/**/00?.*"])) == [
        "scans/a/001.png", "scans/a/002.JPG", "scans/b/deep/003.tif"]
    assert _rels(resolve_inputs(root, ["other/[x].png"])) == ["other/x.png"]


def test_single_file_of_any_suffix(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (f,) = resolve_inputs(root, ["scans/a/notes.txt"])
    assert f.rel == "scans/a/notes.txt" and f.path == (root / "scans/a/notes.txt").resolve()
    assert _rels(resolve_inputs(root, ["./scans//a/../a/001.png"])) == ["scans/a/001.png"]


def test_duplicates_count_once_and_keep_the_file_s_own_name(tree: tuple[Path, Path]) -> None:
    """Its own name over a symlink's, even one named first (test_inputs_links.py: the other cases)."""
    root, _ = tree
    os.symlink(root / "other" / "x.png", root / "alias.png")
    files = resolve_inputs(root, ["alias.png", "other", "other/x.png", "**/x.png"])
    assert _rels(files) == ["other/x.png", "other/y.bmp"]
    assert files[0].path == (root / "other" / "x.png").resolve()
    assert _rels(resolve_inputs(root, ["alias.png", "scans/a/001.png", "./scans/a/001.png"])) == [
        "alias.png", "scans/a/001.png"]


@pytest.mark.timeout(60)  # a symlink loop that is followed would never end (a slow host may take seconds)
def test_symlinks_inside_root_are_followed(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    os.symlink(root / "scans" / "b", root / "linked_dir")
    os.symlink(root / "scans", root / "scans" / "a" / "loop")  # back to an ancestor: must not loop
    assert _rels(resolve_inputs(root, ["linked_dir"])) == ["linked_dir/deep/003.tif"]
    assert _rels(resolve_inputs(root, ["linked_dir/*/*.tif"])) == ["linked_dir/deep/003.tif"]
    files = resolve_inputs(root, ["scans"])
    assert _rels(files) == ["scans/a/001.png", "scans/a/002.JPG", "scans/b/deep/003.tif", "scans/c.webp"]


def test_empty_specs_and_specs_matching_nothing_are_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with pytest.raises(InvalidArgument, match="no inputs"):
        resolve_inputs(root, [])
    for spec in ["missing", "missing/*.png", "scans/*.gif", "scans/a/notes.txt/x"]:
        with pytest.raises(InvalidArgument, match=re.escape(f"input '{spec}' matches no image under the data root")):
            resolve_inputs(root, ["other", spec])
    _touch(root / "empty_dir" / "readme.md")
    with pytest.raises(InvalidArgument, match="'empty_dir' matches no image"):
        resolve_inputs(root, ["empty_dir"])
    with pytest.raises(InvalidArgument, match="empty"):
        resolve_inputs(root, [""])


def test_max_files_stops_as_soon_as_the_limit_is_passed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i in range(50):
        _touch(root / f"d{i // 10}" / f"{i:03}.png")
    assert len(resolve_inputs(root, ["."], max_files=50)) == 50
    with pytest.raises(InvalidArgument, match=r"more than 20 files \(counted 21"):
        resolve_inputs(root, ["."], max_files=20)
    with pytest.raises(InvalidArgument, match="more than 49 files"):
        resolve_inputs(root, ["d0", "**/*.png"], max_files=49)
    # dedup happens before counting: naming the same 10 files twice stays within 10
    assert len(resolve_inputs(root, ["d0", "d0/*.png"], max_files=10)) == 10


def test_max_files_does_not_list_the_whole_tree_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    for i in range(30):
        _touch(root / f"d{i:02}" / "img.png")
    opened = _count_scandir(monkeypatch)
    with pytest.raises(InvalidArgument, match="more than 3 files"):
        resolve_inputs(root, ["."], max_files=3)
    assert len(opened) <= 5  # the root and the first four folders, not all 31


def _count_scandir(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    return opened


def test_too_many_specs_are_refused_before_anything_is_walked(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    _touch(root / "a.png")
    opened = _count_scandir(monkeypatch)
    with pytest.raises(InvalidArgument, match=r"1001 input paths given, over the limit of 1000"):
        resolve_inputs(root, ["."] * 1001, max_specs=1000)
    assert opened == []
    assert _rels(resolve_inputs(root, ["."] * 1000, max_specs=1000)) == ["a.png"]
    with pytest.raises(InvalidArgument, match="max_specs"):
        resolve_inputs(root, ["."], max_specs=0)


def test_the_entries_listed_for_one_request_are_bounded(tmp_path: Path) -> None:
    """Distinct specs are distinct walks; what all of them list together is bounded by ``max_files``.

    Before, 1,000 distinct globs that match few files (``d0/**/*.png``, ``d1/**/*.png``, ...) each walked their
    folder in full: a request of a few kilobytes listed the whole data root a thousand times."""
    for d in range(4):
        for i in range(30):
            (tmp_path / f"d{d}").mkdir(exist_ok=True)
            (tmp_path / f"d{d}" / f"notes{i}.txt").write_text("x")
        (tmp_path / f"d{d}" / "a.png").write_bytes(b"")
    specs = [f"d{d}/**/*.png" for d in range(4)]
    assert len(resolve_inputs(tmp_path, specs, max_files=100)) == 4  # 124 entries listed: within 20 x 100
    with pytest.raises(InvalidArgument, match=re.escape("listing the inputs looked at more than 100 entries "
                                                        "under the data root (20 per allowed file)")):
        resolve_inputs(tmp_path, specs, max_files=5)


def test_specs_naming_the_same_path_are_walked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    for i in range(3):
        _touch(root / f"d{i}" / "img.png")
    opened = _count_scandir(monkeypatch)
    files = resolve_inputs(root, [".", "./", str(root), "d0/../."] * 50 + ["d1", "./d1/"] * 50)
    assert _rels(files) == ["d0/img.png", "d1/img.png", "d2/img.png"]
    assert len(opened) == 5  # the root and its three folders for ".", then d1 once more for "d1"


# -- resolve_inputs: confinement -------------------------------------------------------------------
def _refused(root: Path, spec: str) -> PathOutsideRoot:
    with pytest.raises(PathOutsideRoot) as info:
        resolve_inputs(root, [spec])
    message = str(info.value)
    assert str(root) not in message and str(root.resolve()) not in message
    if not os.path.isabs(spec):  # an absolute spec is echoed as given: it is the client's own text
        assert str(root.parent) not in message
    return info.value


@pytest.mark.parametrize("spec", ["..", "../outside/secret.png", "scans/../../outside", "../*/secret.png",
                                  "scans/../../outside/**"])
def test_dotdot_escaping_the_root_is_refused(tree: tuple[Path, Path], spec: str) -> None:
    root, _ = tree
    assert repr(spec) in str(_refused(root, spec))


def test_dotdot_that_stays_inside_is_fine_even_if_target_is_missing(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with pytest.raises(PathOutsideRoot):
        resolve_inputs(root, ["../no_such_file"])  # refused as an escape, not "matches nothing"
    assert _rels(resolve_inputs(root, ["scans/../other/x.png"])) == ["other/x.png"]


def test_absolute_path_outside_root_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    _refused(root, str(outside / "secret.png"))
    _refused(root, str(outside))
    _refused(root, "/etc/passwd")
    _touch(Path(str(root) + "_sibling") / "x.png")
    with pytest.raises(PathOutsideRoot):  # a shared prefix is not containment
        resolve_inputs(root, [str(root) + "_sibling/x.png"])


def test_symlinked_file_to_outside_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside / "secret.png", root / "scans" / "leak.png")
    _refused(root, "scans/leak.png")
    _refused(root, "scans")  # found while walking
    _refused(root, "scans/*.png")  # found by a glob
    _refused(root, "**/leak.png")
    # the rest of the tree is unaffected
    assert _rels(resolve_inputs(root, ["other"])) == ["other/x.png", "other/y.bmp"]


def test_symlinked_dir_to_outside_is_refused_as_spec_in_walk_and_in_glob(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside, root / "scans" / "b" / "escape")
    _refused(root, "scans/b/escape")
    _refused(root, "scans/b/escape/secret.png")
    message = str(_refused(root, "scans"))  # at depth, during the walk
    assert "scans/b/escape" in message and "secret" not in message
    _refused(root, "scans/**/*.png")
    _refused(root, "scans/b/*/secret.png")


def test_dangling_symlink_to_outside_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside / "nope.png", root / "other" / "dangling.png")
    _refused(root, "other/dangling.png")
    _refused(root, "other")


def test_symlink_out_that_the_spec_does_not_use_is_not_judged(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside, root / "other" / "escape")
    os.symlink(outside / "secret.png", root / "other" / "leak.txt")
    assert _rels(resolve_inputs(root, ["other/*.png"])) == ["other/x.png"]
    # a folder spec keeps images only, so leak.txt is never read, but the folder link would be walked
    os.unlink(root / "other" / "escape")
    assert _rels(resolve_inputs(root, ["other"])) == ["other/x.png", "other/y.bmp"]


def test_root_reached_through_a_symlink_still_confines(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, outside = tree
    alias = tmp_path / "alias"
    os.symlink(root, alias)
    assert _rels(resolve_inputs(alias, [str(alias / "other")])) == ["other/x.png", "other/y.bmp"]
    assert _rels(resolve_inputs(alias, [str(root / "other/x.png")])) == ["other/x.png"]
    with pytest.raises(PathOutsideRoot):
        resolve_inputs(alias, [str(outside)])


def test_no_message_contains_the_absolute_root(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    os.symlink(outside, root / "escape")
    bad_specs = [["missing"], [str(root / "missing.png")], [str(root / "missing/*.png")],
                 ["escape"], ["**"], ["../x"], [""], []]
    for specs in bad_specs:
        with pytest.raises(InvalidArgument) as info:
            resolve_inputs(root, specs, max_files=1)
        assert str(root) not in str(info.value), specs
    with pytest.raises(NotFound) as missing:
        resolve_inputs(root / "nope", ["x"])
    assert str(root) not in str(missing.value)


# -- staging ---------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _send(upload: StagedUpload, name: str, data: bytes, chunk: int = 7, *, sha: bool = True) -> None:
    offsets = list(range(0, len(data), chunk)) or [0]
    for i, off in enumerate(offsets):
        last = i == len(offsets) - 1
        upload.write(name, off, data[off:off + chunk], last=last, sha256=_sha(data) if last and sha else "")


def test_multi_chunk_upload_round_trip(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "staging")
    up = area.open()
    assert (tmp_path / "staging" / f"{up.upload_id}.partial").is_dir()
    blobs = {"scans/a/001.png": os.urandom(100), "top.jpg": b"", "scans/b/2.png": os.urandom(33)}
    for name, data in blobs.items():
        _send(up, name, data)
    summary = up.commit()
    assert isinstance(summary, UploadSummary) and summary.upload_id == up.upload_id
    assert [f.name for f in summary.files] == sorted(blobs)
    assert summary.total_bytes == 133
    for f in summary.files:
        assert f.size == len(blobs[f.name]) and f.sha256 == _sha(blobs[f.name])
    folder = area.path(up.upload_id)
    assert folder == (tmp_path / "staging" / up.upload_id).resolve()
    assert not (tmp_path / "staging" / f"{up.upload_id}.partial").exists()
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert on_disk == sorted(blobs)
    for name, data in blobs.items():
        assert (folder / name).read_bytes() == data
    # committed uploads feed resolve_inputs directly
    assert _rels(resolve_inputs(folder, ["."])) == ["scans/a/001.png", "scans/b/2.png", "top.jpg"]


def test_interleaved_files_and_hash_is_optional(tmp_path: Path) -> None:
    up = StagingArea(tmp_path).open()
    up.write("a.png", 0, b"aa", last=False)
    up.write("b.png", 0, b"bb", last=False)
    up.write("a.png", 2, b"AA", last=True)
    up.write("b.png", 2, b"BB", last=True, sha256=_sha(b"bbBB").upper())
    summary = up.commit()
    assert {f.name: f.sha256 for f in summary.files} == {"a.png": _sha(b"aaAA"), "b.png": _sha(b"bbBB")}


def test_nothing_half_written_has_a_final_name(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    up = area.open()
    partial = tmp_path / f"{up.upload_id}.partial"
    up.write("dir/x.png", 0, b"half", last=False)
    assert not (partial / "dir" / "x.png").exists()
    up.write("dir/x.png", 4, b"done", last=True)
    assert (partial / "dir" / "x.png").read_bytes() == b"halfdone"


def test_wrong_offset_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    up = StagingArea(tmp_path).open()
    with pytest.raises(UploadError, match="chunk for 'a.png' at offset 5, expected 0"):
        up.write("a.png", 5, b"x", last=False)
    up.write("a.png", 0, b"12345", last=False)
    for bad in (0, 3, 6):
        with pytest.raises(InvalidArgument, match=f"chunk for 'a.png' at offset {bad}, expected 5"):
            up.write("a.png", bad, b"zz", last=False)
    up.write("a.png", 5, b"678", last=True)
    summary = up.commit()
    assert summary.files[0].size == 8
    assert (tmp_path / up.upload_id / "a.png").read_bytes() == b"12345678"


def test_a_failed_write_leaves_no_stray_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    up = StagingArea(tmp_path).open()
    real_pwrite = os.pwrite

    def disk_full_after_8_bytes(fd: int, data: bytes, offset: int) -> int:
        real_pwrite(fd, bytes(data[:8]), offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full_after_8_bytes)
    with pytest.raises(OSError):
        up.write("a.png", 0, b"0123456789", last=False)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    up.write("a.png", 0, b"abc", last=True)  # the client retries with a different chunking
    summary = up.commit()
    assert summary.total_bytes == 3 and summary.files[0].sha256 == _sha(b"abc")
    assert (tmp_path / up.upload_id / "a.png").read_bytes() == b"abc"


def test_complete_file_and_used_name_cannot_be_written_again(tmp_path: Path) -> None:
    up = StagingArea(tmp_path).open()
    up.write("a.png", 0, b"abc", last=True)
    with pytest.raises(UploadError, match="already complete"):
        up.write("a.png", 3, b"more", last=True)
    with pytest.raises(UploadError, match="already complete"):
        up.write("a.png", 0, b"new", last=True)
    up.write("d/b.png", 0, b"x", last=True)
    with pytest.raises(UploadError, match="already a folder"):
        up.write("d", 0, b"x", last=True)
    with pytest.raises(UploadError, match="puts a folder where file 'a.png'"):
        up.write("a.png/c.png", 0, b"x", last=True)


def test_hash_mismatch_is_refused_before_writing(tmp_path: Path) -> None:
    up = StagingArea(tmp_path).open()
    up.write("a.png", 0, b"abc", last=False)
    with pytest.raises(UploadError, match="hash mismatch for 'a.png'"):
        up.write("a.png", 3, b"def", last=True, sha256=_sha(b"abcXYZ"))
    with pytest.raises(UploadError, match="not 64 hex digits"):
        up.write("a.png", 3, b"def", last=True, sha256="abc")
    with pytest.raises(UploadError, match="lack their last chunk"):
        up.commit()
    up.write("a.png", 3, b"def", last=True, sha256=_sha(b"abcdef"))  # the correct retry still works
    assert up.commit().files[0].sha256 == _sha(b"abcdef")


def test_per_file_limit(tmp_path: Path) -> None:
    up = StagingArea(tmp_path, UploadLimits(max_file_bytes=10)).open()
    up.write("a.png", 0, b"x" * 6, last=False)
    with pytest.raises(UploadError, match="per-file limit of 10 bytes"):
        up.write("a.png", 6, b"x" * 5, last=False)
    partial = tmp_path / f"{up.upload_id}.partial"
    assert sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) == 6  # nothing beyond
    up.write("a.png", 6, b"x" * 4, last=True)  # exactly at the limit is fine
    up.write("b.png", 0, b"y" * 10, last=True)


def test_total_limit(tmp_path: Path) -> None:
    up = StagingArea(tmp_path, UploadLimits(max_total_bytes=20)).open()
    up.write("a.png", 0, b"x" * 15, last=True)
    with pytest.raises(UploadError, match="total limit of 20 bytes"):
        up.write("b.png", 0, b"y" * 6, last=False)
    up.write("b.png", 0, b"y" * 5, last=True)
    assert up.commit().total_bytes == 20


def test_file_count_limit(tmp_path: Path) -> None:
    up = StagingArea(tmp_path, UploadLimits(max_files=2)).open()
    up.write("a.png", 0, b"a", last=True)
    up.write("b.png", 0, b"b", last=True)
    with pytest.raises(UploadError, match="limit of 2 files"):
        up.write("c.png", 0, b"c", last=True)
    assert [f.name for f in up.commit().files] == ["a.png", "b.png"]


def test_limits_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="max_files"):
        UploadLimits(max_files=0)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("/etc/passwd", "absolute"),
        ("../x.png", "'..'"),
        ("a/../../x.png", "'..'"),
        ("./x.png", "'.'"),
        ("a//b.png", "empty component"),
        ("a/", "empty component"),
        ("", "empty"),
        ("a\\b.png", "backslash"),
        ("..\\x.png", "backslash"),
        ("a\x00.png", "NUL"),
        ("x" * 252 + ".png", "longer than 255 bytes"),
        (".hidden.png", "may not start with '.'"),
        (".incoming/0", "may not start with '.'"),
        ("-rf.png", "may not start"),
        ("a/b:c.png", "may use only"),
        ("naïve.png", "may use only"),
        ("a\nb.png", "may use only"),
    ],
)
def test_unsafe_names_are_refused(tmp_path: Path, name: str, problem: str) -> None:
    area = StagingArea(tmp_path / "staging")
    up = area.open()
    with pytest.raises(UploadError) as info:
        up.write(name, 0, b"data", last=True)
    assert problem in str(info.value)
    assert str(tmp_path) not in str(info.value)
    up.abort()
    assert not any(tmp_path.rglob("*.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]


def test_safe_names_with_spaces_and_punctuation_are_accepted(tmp_path: Path) -> None:
    up = StagingArea(tmp_path).open()
    names = ["scan 001.png", "a/b_c-d+e@f=g,h.v2.TIFF", "x" * 251 + ".png"]
    for name in names:
        up.write(name, 0, name.encode(), last=True)
    folder = tmp_path / up.commit().upload_id
    assert all((folder / n).read_bytes() == n.encode() for n in names)


def test_commit_with_incomplete_file_is_refused(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    up = area.open()
    up.write("done.png", 0, b"ok", last=True)
    up.write("half.png", 0, b"no", last=False)
    with pytest.raises(UploadError, match="1 file\\(s\\) lack their last chunk: 'half.png'"):
        up.commit()
    with pytest.raises(NotFound):
        area.path(up.upload_id)
    with pytest.raises(UploadError, match="has no files"):
        area.open().commit()


def test_abort_removes_everything_and_is_idempotent(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    up = area.open()
    up.write("a/b.png", 0, b"complete", last=True)
    up.write("c.png", 0, b"partial", last=False)
    up.abort()
    up.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UploadError, match="aborted"):
        up.write("d.png", 0, b"x", last=True)
    with pytest.raises(UploadError, match="aborted"):
        up.commit()


def test_commit_then_abort_keeps_the_upload_and_closes_it(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    up = area.open()
    up.write("a.png", 0, b"a", last=True)
    up.commit()
    up.abort()
    assert (area.path(up.upload_id) / "a.png").read_bytes() == b"a"
    with pytest.raises(UploadError, match="committed"):
        up.write("b.png", 0, b"b", last=True)


def test_clean_partial_removes_only_leftovers(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    done = area.open()
    done.write("a.png", 0, b"a", last=True)
    done.commit()
    for _ in range(2):
        area.open().write("x.png", 0, b"half", last=False)  # a crash: never committed nor aborted
    assert StagingArea(tmp_path).clean_partial() == 2
    assert [p.name for p in tmp_path.iterdir()] == [done.upload_id]
    assert area.clean_partial() == 0


def test_path_and_delete(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    with pytest.raises(NotFound, match="does not exist"):
        area.path("0" * 32)
    for bad in ["../etc", "0" * 31, "A" * 32, "0" * 32 + ".partial", ""]:
        with pytest.raises(InvalidArgument, match="malformed"):
            area.path(bad)
    up = area.open()
    with pytest.raises(NotFound):
        area.path(up.upload_id)  # still partial
    up.write("a.png", 0, b"a", last=True)
    up.commit()
    assert area.path(up.upload_id).is_dir()
    area.delete(up.upload_id)
    with pytest.raises(NotFound):
        area.path(up.upload_id)
    with pytest.raises(NotFound):
        area.delete(up.upload_id)
    assert list(tmp_path.iterdir()) == []


def test_staging_area_is_usable_from_several_threads(tmp_path: Path) -> None:
    area = StagingArea(tmp_path)
    ids: list[str] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            up = area.open()
            _send(up, f"t{n}.png", bytes([n]) * 50, chunk=9)
            ids.append(up.commit().upload_id)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(ids)) == 8
    assert all(len(list(area.path(i).iterdir())) == 1 for i in ids)


def test_an_upload_takes_image_files_only_and_names_any_other(tmp_path: Path) -> None:
    """UploadImages took x.txt, which no job reads (a job takes an upload's files by suffix, as in a folder)."""
    area = StagingArea(tmp_path)
    up = area.open()
    up.write("scans/A.PNG", 0, b"x", last=True)  # suffixes as a job reads them: any case
    for name in ("notes.txt", "scans/labels.json", "png", "a.png.bak"):
        with pytest.raises(UploadError) as info:
            up.write(name, 0, b"x", last=True)
        assert str(info.value) == (f"upload file {name!r} is not an image file: a job reads only the .png, .jpg, "
                                   ".jpeg, .tif, .tiff, .bmp, .webp files of an upload (by name); upload images only")
    assert [f.name for f in up.commit().files] == ["scans/A.PNG"]
    assert area.no_images(up.upload_id) is None


def test_a_job_over_an_upload_without_images_names_the_upload_and_what_it_holds(tmp_path: Path) -> None:
    """Such an upload (committed before uploads were checked) was refused as "input '.' matches no image under
    the data root"."""
    area = StagingArea(tmp_path)
    for upload_id, names, held in (
            ("ab" * 16, ["x.txt"], "it holds 1 file: x.txt"),
            ("cd" * 16, [f"n{i}.txt" for i in range(7)],
             "it holds 7 files: n0.txt, n1.txt, n2.txt, n3.txt, n4.txt, ..."),
            ("ef" * 16, [], "it is empty")):
        (tmp_path / upload_id).mkdir()
        for name in names:
            (tmp_path / upload_id / name).write_text("notes")
        error = area.no_images(upload_id)
        assert isinstance(error, UploadError)
        assert str(error).startswith(f"upload {upload_id} holds no image files ({held}): a job reads the .png"), error


@pytest.mark.parametrize("spec, problem", [
    ("b" * 300, r"has a name of 300 bytes \('bbbb"),
    ("x/" * 2100, r"is 4199 bytes long: more than \d+, the longest path"),
])
def test_a_path_too_long_for_the_filesystem_is_refused_by_name(tmp_path: Path, spec: str, problem: str) -> None:
    """A 300-byte name or a 4 KB path reached the filesystem, whose 'File name too long' (OSError) became an
    internal error for the client; it is refused as the input it is, before the filesystem is asked."""
    with pytest.raises(InvalidArgument, match=rf"^input '{spec[:8]}.*' {problem}") as refused:
        resolve_inputs(tmp_path, [spec])
    assert str(tmp_path) not in str(refused.value)
