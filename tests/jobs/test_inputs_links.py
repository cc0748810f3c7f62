"""Job inputs named more than once through symlinks: the real file keeps its own name.

A QA report: a folder with ``0.png``, ``1.png`` and ``0link.png -> 1.png`` gave labels for ``0.png`` and
``0link.png`` only (``total 2, skipped 0``), because the first name in name order won and the link sorts first.
The server (``resolve_inputs``) and ``segsvc batch`` (``batch_inputs``) share the rule, so both are checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from segsvc.jobs.inputs import InputFile, resolve_inputs
from segsvc.jobs.offline import batch_inputs, run_batch
from tests.server.conftest import encode, make_image, publish


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _named(files: list[InputFile]) -> dict[str, str]:
    """Each kept name and the content of the file it reads."""
    return {f.rel: f.path.read_bytes().decode() for f in files}


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """``0.png``, ``1.png`` and ``0link.png -> 1.png`` (a relative link, as users make them)."""
    folder = tmp_path / "scans"
    _touch(folder / "0.png", b"zero")
    _touch(folder / "1.png", b"one")
    os.symlink("1.png", folder / "0link.png")
    return folder


def test_a_link_beside_the_file_does_not_take_its_name(scans: Path) -> None:
    assert _named(resolve_inputs(scans, ["."])) == {"0.png": "zero", "1.png": "one"}
    assert _named(resolve_inputs(scans.parent, ["scans"])) == {"scans/0.png": "zero", "scans/1.png": "one"}
    assert _named(resolve_inputs(scans.parent, ["scans/*.png"])) == {"scans/0.png": "zero", "scans/1.png": "one"}


def test_the_own_name_wins_whichever_spec_names_it_first(scans: Path) -> None:
    for specs in (["0link.png", "1.png"], ["1.png", "0link.png"], ["0link.png", "."], ["*link.png", "1.png"]):
        files = resolve_inputs(scans, specs)
        assert "1.png" in _named(files) and "0link.png" not in _named(files), specs
    assert [f.path for f in resolve_inputs(scans, ["0link.png", "1.png"])] == [(scans / "1.png").resolve()]


def test_a_file_named_only_through_links_keeps_the_first_link(scans: Path) -> None:
    os.symlink("1.png", scans / "1link.png")
    assert _named(resolve_inputs(scans, ["0link.png"])) == {"0link.png": "one"}
    assert _named(resolve_inputs(scans, ["*link.png"])) == {"0link.png": "one"}
    assert _named(resolve_inputs(scans, ["1link.png", "0link.png"])) == {"1link.png": "one"}


def test_a_linked_folder_does_not_take_the_names_of_the_real_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch(root / "scans" / "a.png", b"a")
    _touch(root / "scans" / "deep" / "b.png", b"b")
    os.symlink("scans", root / "0scans")  # sorts before scans: it used to be walked first, and scans never
    os.symlink("../scans/deep", root / "scans" / "0deep")
    expected = {"scans/a.png": "a", "scans/deep/b.png": "b"}
    assert _named(resolve_inputs(root, ["."])) == expected
    assert _named(resolve_inputs(root, ["**/*.png"])) == expected
    assert _named(resolve_inputs(root, ["0scans", "scans"])) == expected
    # reached only through the link, the files keep the link's names
    assert _named(resolve_inputs(root, ["0scans"])) == {"0scans/a.png": "a", "0scans/deep/b.png": "b"}


def test_offline_batch_inputs_share_the_rule(scans: Path, tmp_path: Path) -> None:
    root, files = batch_inputs([str(scans)])
    assert root == scans and _named(files) == {"0.png": "zero", "1.png": "one"}
    _, files = batch_inputs([str(scans / "0link.png"), str(scans / "1.png")])
    assert _named(files) == {"1.png": "one"}
    # an input whose folder's name reads as a pattern is resolved on its own (offline._resolve_alone): the
    # listings are merged by the same rule
    odd = tmp_path / "d[1]"
    _touch(odd / "2.png", b"two")
    os.symlink("2.png", odd / "0link.png")
    _, files = batch_inputs([str(odd / "0link.png"), str(odd / "2.png")])
    assert _named(files) == {"2.png": "two"}
    _, files = batch_inputs([str(odd), str(scans)])
    assert _named(files) == {"d[1]/2.png": "two", "scans/0.png": "zero", "scans/1.png": "one"}


def test_segsvc_batch_writes_a_label_for_the_real_file(tmp_path: Path) -> None:
    """End to end: labels for 0.png and 1.png, none named after the link."""
    publish(tmp_path / "repo", "tiny", seed=1)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(encode(make_image(24, 32, seed=i)))
    os.symlink("1.png", folder / "0link.png")
    out = tmp_path / "out"
    summary = run_batch([str(folder)], model_repo=tmp_path / "repo", model="tiny", out=out, device="cpu",
                        progress=False)
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["0.png.png", "1.png.png"]
    assert summary["counts"] == {"total": 2, "done": 2, "failed": 0, "skipped": 0}
    assert [json.loads(line)["input"] for line in (out / "results.jsonl").read_text().splitlines()] == [
        "0.png", "1.png"]
