"""Review: a hostile, damaged or absurd version is refused with an ``ArtifactError`` (or, for a spec, a
``ModelConfigError``) before it costs memory, time or a file outside the root; never a bare exception."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import ArtifactError, ModelConfigError
from segsvc.inference.repository import ModelRepository
from segsvc.models import artifact
from segsvc.models.artifact import MANIFEST_FILE, WEIGHTS_FILE, load_artifact, read_manifest, save_artifact
from segsvc.models.registry import build_model
from tests.models.test_artifact import _edit_manifest, _rewrite_weights  # json.dumps writes inf/nan as Infinity/NaN

SPEC = ModelSpec("unet", 3, 1, {"base_channels": 4, "depth": 2})


@pytest.fixture
def version(tmp_path):
    torch.manual_seed(0)
    return save_artifact(build_model(SPEC), tmp_path, "membrane", spec=SPEC, input_spec=InputSpec(1, (0.5,), (0.2,)))


# -- the manifest ----------------------------------------------------------------------------------------------
def test_a_deeply_nested_manifest_is_an_artifact_error(version) -> None:
    """400 kB of brackets, under the size limit: json raised RecursionError, which nothing turned into a reason."""
    (version / MANIFEST_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="cannot read"):
        read_manifest(version)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(version=1e999), "version"),  # valid JSON: 1e999 reads as inf; int(inf) is an OverflowError
    (lambda m: m.update(ignore_index=float("inf")), "ignore_index"),
    (lambda m: m["input"].update(channels=float("inf")), "channels"),
    (lambda m: m["input"].update(mean=[float("nan")]), "mean"),  # every input would become NaN
    (lambda m: m["input"].update(std=[float("nan")]), "std"),
    (lambda m: m["input"].update(std=[float("inf")]), "std"),  # every input would become 0
    (lambda m: m["input"].update(mean="5"), "mean"),  # a string is not a list of numbers
])
def test_non_finite_or_mistyped_manifest_numbers_are_artifact_errors(version, edit, field) -> None:
    _edit_manifest(version, edit)
    with pytest.raises(ArtifactError, match=field):
        read_manifest(version)
    with pytest.raises(ArtifactError) as info:  # the server's path: relative, never the absolute root
        ModelRepository(version.parent.parent).read_manifest("membrane", 1)
    assert str(version.parent.parent) not in str(info.value)


# -- the cost of the model a manifest asks for ---------------------------------------------------------------
def test_a_manifest_asking_for_a_huge_model_is_refused_before_it_is_built(version, monkeypatch) -> None:
    """base_channels 10**6 asked the allocator for 36 TB (a smaller absurd width is allocated, and fills RAM)."""
    devices: list[str] = []
    real = artifact.build_model

    def spy(spec):  # type: ignore[no-untyped-def]
        devices.append(torch.get_default_device().type)
        return real(spec)

    monkeypatch.setattr(artifact, "build_model", spy)
    _edit_manifest(version, lambda m: m["model"]["params"].update(base_channels=10**6))
    with pytest.raises(ArtifactError, match=r"parameters, over the limit of"):
        load_artifact(version)
    assert "cpu" not in devices  # only ever built on the meta device, which allocates nothing


def test_a_model_over_the_parameter_limit_is_never_materialised(version, monkeypatch) -> None:
    monkeypatch.setattr(artifact, "MAX_MODEL_PARAMETERS", 1000)
    with pytest.raises(ArtifactError, match=r"membrane/1: the model its manifest describes has [\d,]+ parameters, "
                                            r"over the limit of 1,000"):
        ModelRepository(version.parent.parent).load("membrane", 1)


# -- the weights file -------------------------------------------------------------------------------------------
def test_a_header_of_many_tensors_is_refused_before_any_is_loaded(version, monkeypatch) -> None:
    """400k empty tensors (22 MB of header, under safetensors' own 100 MB limit) were all created, then refused."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(400_000)}
    raw = json.dumps(header).encode()
    (version / WEIGHTS_FILE).write_bytes(len(raw).to_bytes(8, "little") + raw)
    _edit_manifest(version, lambda m: m.update(weights_sha256=""))
    loads: list[str] = []
    monkeypatch.setattr(artifact, "load_file", lambda *a, **k: loads.append("load") or {})
    with pytest.raises(ArtifactError, match="header"):
        load_artifact(version)
    assert loads == []


def test_tensors_of_another_dtype_are_refused(version) -> None:
    """A float64 (or int8, bool) tensor was silently cast into the float32 parameter."""
    key = next(k for k, v in load_file(version / WEIGHTS_FILE).items() if v.dim() == 4)
    _rewrite_weights(version, lambda s: s.update({key: s[key].double()}))
    with pytest.raises(ArtifactError, match=rf"wrong dtype, e.g. \['{key}: file F64 vs model F32'\]"):
        load_artifact(version)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(version, value) -> None:
    """A NaN weight made every logit NaN: arg-max then labels every pixel 0, silently."""
    key = next(k for k, v in load_file(version / WEIGHTS_FILE).items() if v.dim() == 4)

    def poison(s) -> None:  # type: ignore[no-untyped-def]
        s[key].view(-1)[0] = value

    _rewrite_weights(version, poison)
    with pytest.raises(ArtifactError, match=rf"NaN or infinite values in 1 tensors, e.g. \['{key}'\]"):
        load_artifact(version)


def test_a_sound_version_still_loads_and_matches(version) -> None:
    model, manifest = load_artifact(version)
    assert manifest.version == 1 and not model.training
    assert {k: v.dtype for k, v in model.state_dict().items()} == {
        k: v.dtype for k, v in build_model(SPEC).state_dict().items()}


# -- smp encoders ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    attempts: list[object] = []

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_a_timm_encoder_from_the_hub_is_refused_without_touching_the_network(no_network) -> None:
    with pytest.raises(ModelConfigError, match="timm registry"):
        build_model(ModelSpec("smp/Unet", 2, params={"encoder_name": "tu-hf-hub:timm/resnet18.a1_in1k"}))
    assert no_network == []


def test_a_timm_encoder_from_a_local_folder_is_refused(tmp_path, no_network) -> None:
    """``tu-local-dir:/path`` made timm read the config.json of a folder the manifest names, anywhere."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    with pytest.raises(ModelConfigError, match="timm registry"):
        build_model(ModelSpec("smp/Unet", 2, params={"encoder_name": f"tu-local-dir:{folder}", "encoder_depth": 3,
                                                     "decoder_channels": [8, 8, 8]}))


def test_a_registry_timm_encoder_still_builds(no_network) -> None:
    model = build_model(ModelSpec("smp/Unet", 2, params={"encoder_name": "tu-resnet18", "encoder_depth": 3,
                                                         "decoder_channels": [8, 8, 8]}))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)
