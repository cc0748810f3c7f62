"""A version folder opened by path (``segsvc eval``, the benches) is confined to its model repository as the
server's own loads are: no symlink, of the folder or of a file in it, leads the read out of the root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.errors import ArtifactError, PathOutsideRoot
from segsvc.inference.backends import EngineConfig, open_version_dir
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, save_artifact
from segsvc.models.registry import build_model

CPU = torch.device("cpu")
EAGER = EngineConfig(device="cpu", warmup=False)
ORT = EngineConfig(device="cpu", backend="onnxruntime", warmup=False)
SPEC = ModelSpec("unet", 3, 1, {"base_channels": 4, "depth": 2})


def publish(root: Path, name: str = "m", version: int | None = None) -> Path:
    return save_artifact(build_model(SPEC), root, name, spec=SPEC, version=version)


def names_no_server_path(message: str, tmp_path: Path) -> bool:
    return str(tmp_path) not in message and str(tmp_path.resolve()) not in message


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    publish(root)
    return root


def test_a_version_folder_symlinked_out_of_the_root_is_refused(repo: Path, tmp_path: Path) -> None:
    outside = publish(tmp_path / "outside", version=2)
    (repo / "m" / "2").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathOutsideRoot, match="^m/2 is a symlink that leads outside the repository root") as info:
        open_version_dir(repo / "m" / "2", CPU, EAGER)
    assert names_no_server_path(str(info.value), tmp_path)


def test_a_model_folder_symlinked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    outside = publish(tmp_path / "outside")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(PathOutsideRoot, match="^m is a symlink that leads outside the repository root") as info:
        open_version_dir(tmp_path / "repo" / "m" / "1", CPU, EAGER)
    assert names_no_server_path(str(info.value), tmp_path)


@pytest.mark.parametrize("file", [WEIGHTS_FILE, MANIFEST_FILE])
def test_a_file_of_the_version_symlinked_out_of_the_root_is_refused(repo: Path, tmp_path: Path, file: str) -> None:
    version = repo / "m" / "1"
    shutil.move(version / file, tmp_path / file)
    (version / file).symlink_to(tmp_path / file)
    with pytest.raises(PathOutsideRoot, match=f"^m/1/{file} is a symlink that leads outside") as info:
        open_version_dir(version, CPU, EAGER)
    assert names_no_server_path(str(info.value), tmp_path)


def test_an_onnx_export_symlinked_out_of_the_root_is_refused_before_it_is_read(repo: Path, tmp_path: Path) -> None:
    version = repo / "m" / "1"
    data = json.loads((version / MANIFEST_FILE).read_text())
    data["exports"] = {"onnx": {"file": "model.onnx", "sha256": "0" * 64}}
    (version / MANIFEST_FILE).write_text(json.dumps(data))
    (tmp_path / "secret.onnx").write_bytes(b"not yours")
    (version / "model.onnx").symlink_to(tmp_path / "secret.onnx")
    with pytest.raises(PathOutsideRoot, match="^m/1/model.onnx is a symlink that leads outside"):
        open_version_dir(version, CPU, ORT)


def test_a_symlink_that_stays_inside_the_root_is_followed(repo: Path) -> None:
    store = publish(repo / ".store", version=2)  # a hidden folder inside the root
    (repo / "m" / "2").symlink_to(store, target_is_directory=True)
    backend, manifest = open_version_dir(repo / "m" / "2", CPU, EAGER)
    assert manifest.version == 2
    assert backend.forward(torch.zeros(1, 1, 16, 16)).shape == (1, 3, 16, 16)


def test_a_damaged_version_is_named_relative_to_the_root(repo: Path, tmp_path: Path) -> None:
    (repo / "m" / "1" / WEIGHTS_FILE).write_bytes(b"torn")
    with pytest.raises(ArtifactError, match="m/1/weights.safetensors") as info:
        open_version_dir(repo / "m" / "1", CPU, EAGER)
    assert names_no_server_path(str(info.value), tmp_path)


@pytest.mark.parametrize("opener", ["open_version_dir", "repository"])
@pytest.mark.parametrize("swapped", [MANIFEST_FILE, WEIGHTS_FILE, "the version folder"])
def test_a_symlink_swapped_in_after_the_check_is_not_followed(repo: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              opener: str, swapped: str) -> None:
    """The version was checked, then its files opened by path: one swapped for a symlink out of the root in
    between (here, a copy of the same bytes, so the load itself succeeds) was read."""
    version = repo / "m" / "1"
    outside = tmp_path / "outside"
    shutil.copytree(version, outside)
    check = ModelRepository.confine

    def confine_then_swap(self: ModelRepository, path: Path) -> Path:
        checked = check(self, path)
        if swapped == "the version folder":
            version.rename(version.with_name(".moved"))
            version.symlink_to(outside, target_is_directory=True)
        else:
            (version / swapped).unlink()
            (version / swapped).symlink_to(outside / swapped)
        return checked

    monkeypatch.setattr(ModelRepository, "confine", confine_then_swap)
    with pytest.raises(PathOutsideRoot, match="^m/1/") as info:
        if opener == "repository":
            ModelRepository(repo).load("m", 1)
        else:
            open_version_dir(version, CPU, EAGER)
    assert names_no_server_path(str(info.value), tmp_path)
