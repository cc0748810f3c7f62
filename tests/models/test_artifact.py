"""The model artifact: round trip, atomic versions, clear errors for every kind of damage."""

import json

import pytest
import torch

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import AlreadyExists, ArtifactError, InvalidArgument, PathOutsideRoot, UnknownModel, UnknownVersion
from segsvc.inference.repository import ModelRepository, parse_model_ref
from segsvc.models import build_model
from segsvc.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, load_artifact, read_manifest, save_artifact

SPEC = ModelSpec("unet", 3, 1, {"base_channels": 4, "depth": 2})


@pytest.fixture
def saved(tmp_path):
    model = build_model(SPEC).eval()
    with torch.no_grad():  # make BatchNorm statistics non-trivial so they must round-trip too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = save_artifact(
        model, tmp_path, "membrane", spec=SPEC, input_spec=InputSpec(1, (0.5,), (0.2,)),
        class_names=["membrane", "cell", "other"], ignore_index=255, metrics={"miou": 0.5},
    )
    return model, path


def test_round_trip_gives_identical_logits(saved) -> None:
    model, path = saved
    loaded, manifest = load_artifact(path)
    x = torch.randn(2, 1, 36, 44)
    assert torch.equal(model(x), loaded(x))
    assert manifest.class_names == ("membrane", "cell", "other")
    assert manifest.metrics["miou"] == 0.5 and manifest.ignore_index == 255
    assert manifest.input.mean == (0.5,) and manifest.version == 1


def test_versions_increase_and_are_never_overwritten(saved, tmp_path) -> None:
    model, _ = saved
    second = save_artifact(model, tmp_path, "membrane", spec=SPEC)
    assert second.name == "2"
    with pytest.raises(AlreadyExists):
        save_artifact(model, tmp_path, "membrane", spec=SPEC, version=1)
    assert not [p for p in (tmp_path / "membrane").iterdir() if p.name.startswith(".tmp")]
    repo = ModelRepository(tmp_path)
    assert repo.list_models() == {"membrane": [1, 2]}
    assert repo.resolve_version("membrane") == 2


def test_truncated_weights_file_is_reported(saved) -> None:
    _, path = saved
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(path)


def test_truncated_weights_without_checksum_is_reported(saved) -> None:
    _, path = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = ""
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_artifact(path)


def test_manifest_naming_another_architecture_is_reported(saved) -> None:
    _, path = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["model"] = {"arch": "segnet", "num_classes": 3, "in_channels": 1, "params": {"variant": "basic", "base_channels": 4}}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not hold the weights of a 'segnet' model"):
        load_artifact(path)


def test_wrong_tensor_shapes_are_reported(saved) -> None:
    _, path = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["model"]["params"]["base_channels"] = 8
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="wrong shape"):
        load_artifact(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("model"), "lacks required fields"),
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(class_names=["a"]), "class names"),
        (lambda m: m.update(palette=[[0, 0, 999]] * 3), "palette"),
        (lambda m: m["model"].update(arch="nope"), "unknown model architecture"),
    ],
)
def test_invalid_manifests_are_reported(saved, edit, message) -> None:
    _, path = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


def test_unparseable_manifest_is_reported(saved) -> None:
    _, path = saved
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read"):
        read_manifest(path)


def test_repository_errors(saved, tmp_path) -> None:
    repo = ModelRepository(tmp_path)
    with pytest.raises(UnknownModel, match="membrane"):
        repo.versions("camvid")
    with pytest.raises(UnknownVersion, match=r"\[1\]"):
        repo.resolve_version("membrane", 7)
    with pytest.raises((InvalidArgument, PathOutsideRoot)):
        repo.version_dir("../etc")
    assert parse_model_ref("membrane:3") == ("membrane", 3)
    with pytest.raises(InvalidArgument):
        parse_model_ref("membrane:x")
