"""``segsvc export --format triton --out``: never inside the segsvc model repository.

QA: ``--out R/MODEL`` wrote a Triton model folder into the segsvc model's own folder (the segsvc repository
then logged "skipping synthetic-quick/synthetic-quick: not a version number", and tritonserver given
``R/MODEL`` would read the version folder ``1/`` as a model).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from segsvc.cli import main
from segsvc.errors import InvalidArgument
from segsvc.export.triton import export_triton
from tests.export.conftest import TINY, publish


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("where", [".", "m", "m/1", "m/triton", "elsewhere/../m"])
def test_an_out_inside_the_repository_is_refused_and_nothing_is_written(
        repo: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    publish(repo, "m", TINY["unet"])
    before = _tree(repo)
    out = repo / where
    assert main(["export", "m", "--repo", str(repo), "--format", "triton", "--out", str(out), "--checks", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"segsvc: error: --out {out} is inside the segsvc model repository {repo}: write the Triton repository "
        f"outside it (default: {repo.resolve().parent / 'model_repository-triton'})"]
    assert _tree(repo) == before  # not even the folder, nor an ONNX export


def test_symlinks_are_resolved_both_ways(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    publish(repo, "m", TINY["unet"])
    (tmp_path / "into-model").symlink_to(repo / "m")  # --out through a link into the repository
    (tmp_path / "repo-link").symlink_to(repo)  # --repo through a link, --out its real path
    for argv in (["--repo", str(repo), "--out", str(tmp_path / "into-model" / "triton")],
                 ["--repo", str(tmp_path / "repo-link"), "--out", str(repo / "m")]):
        assert main(["export", "m", *argv, "--format", "triton", "--no-progress"]) == 2
        assert "is inside the segsvc model repository" in capsys.readouterr().err
    assert not (repo / "m" / "triton").exists()


def test_the_library_refuses_it_too_and_an_out_beside_the_repository_is_fine(repo: Path, tmp_path: Path) -> None:
    from segsvc.export.triton import check_out  # new with the fix

    version_dir = publish(repo, "m", TINY["unet"])
    with pytest.raises(InvalidArgument, match="is inside the segsvc model repository"):
        export_triton(version_dir, repo / "m", checks=1)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]
    check_out(tmp_path / "model_repository-triton", repo)  # beside it, sharing its name's prefix
    check_out(tmp_path, repo.parent / "other")
    result = export_triton(version_dir, tmp_path / "model_repository-triton", checks=1)
    assert (result.model_dir / "config.pbtxt").is_file()
