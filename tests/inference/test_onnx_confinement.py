"""An exported ONNX graph is opened beneath the repository root, as the weights are: a symlink swapped in after the
repository checked the version is not followed, whether the server loads it or ``segsvc eval`` opens the folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segsvc.errors import PathOutsideRoot
from segsvc.export.onnx import export_onnx
from segsvc.inference.backends import open_backend, open_version_dir, ort
from segsvc.inference.repository import ModelRepository

from tests.inference.test_version_dir_confinement import CPU, ORT, names_no_server_path, publish


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    export_onnx(publish(root), checks=1)
    return root


@pytest.mark.parametrize("opener", ["server", "eval"])
def test_an_onnx_export_swapped_for_a_symlink_after_the_check_is_not_followed(exported: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              opener: str) -> None:
    """The same bytes outside the root (so the SHA-256 matches): before, they were read through the link."""
    version = exported / "m" / "1"
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(version / "model.onnx", outside)
    read = ort.read_onnx_export

    def swap_then_read(*args: object) -> tuple[str, bytes]:  # every check has run: the swap races the open
        (version / "model.onnx").unlink()
        (version / "model.onnx").symlink_to(outside)
        return read(*args)

    monkeypatch.setattr(ort, "read_onnx_export", swap_then_read)
    with pytest.raises(PathOutsideRoot, match="model.onnx") as info:
        if opener == "server":
            open_backend(ModelRepository(exported), "m", 1, CPU, ORT)
        else:
            open_version_dir(version, CPU, ORT)
    assert names_no_server_path(str(info.value), tmp_path)


def test_an_export_inside_the_root_still_loads(exported: Path) -> None:
    backend, manifest = open_backend(ModelRepository(exported), "m", 1, CPU, ORT)
    assert manifest.exports["onnx"]["file"] == "model.onnx" and backend.name == "onnxruntime"
