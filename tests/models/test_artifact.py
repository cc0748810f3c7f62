"""The model artifact: round trip, atomic versions, clear errors for every kind of damage."""

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import segsvc

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import AlreadyExists, ArtifactError, InvalidArgument, PathOutsideRoot, UnknownModel, UnknownVersion
from segsvc.inference.repository import ModelRepository, parse_model_ref
from segsvc.models import build_model
from segsvc.models import artifact
from segsvc.models.artifact import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    check_name,
    load_artifact,
    next_version,
    read_manifest,
    save_artifact,
)

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


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o077, 0o700, 0o600)])
def test_a_published_version_is_as_readable_as_the_umask_allows(tmp_path, umask, folder, file) -> None:
    """A version folder came out 0700 with 0600 weights (mkdtemp, safetensors' temporary file) whatever the
    umask: a server or a copy running as another user (a container's uid 10001) could not read the model."""
    old = os.umask(umask)
    try:
        path = save_artifact(build_model(SPEC), tmp_path, "membrane", spec=SPEC)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [path, *path.iterdir()]}
    assert modes == {"1": folder, MANIFEST_FILE: file, WEIGHTS_FILE: file}


def test_a_published_version_keeps_the_setgid_bit_of_a_group_shared_repository(tmp_path) -> None:
    """A plain mkdir in a setgid folder is setgid too, so files added later (an export) keep the group."""
    import stat

    (tmp_path / "membrane").mkdir()
    os.chmod(tmp_path / "membrane", 0o2775)
    path = save_artifact(build_model(SPEC), tmp_path, "membrane", spec=SPEC)
    assert path.stat().st_mode & stat.S_ISGID


def test_versions_increase_and_are_never_overwritten(saved, tmp_path) -> None:
    model, _ = saved
    second = save_artifact(model, tmp_path, "membrane", spec=SPEC)
    assert second.name == "2"
    with pytest.raises(AlreadyExists, match=r"model membrane version 1 already exists at .*; versions are never overwritten"):
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


def test_a_manifest_that_is_a_fifo_or_a_folder_is_refused_without_waiting(saved) -> None:
    """Reading a FIFO blocks until a writer comes (its stat size is 0, under the size limit): forever."""
    _, path = saved
    manifest = path / MANIFEST_FILE
    manifest.unlink()
    os.mkfifo(manifest)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: _record_error(outcome, lambda: read_manifest(path)), daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # unblock the stuck reader, then fail
        os.close(os.open(manifest, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_manifest waited on a FIFO")
    assert isinstance(outcome[0], ArtifactError) and "not a regular file" in str(outcome[0])
    manifest.unlink()
    manifest.mkdir()
    with pytest.raises(ArtifactError, match="not a regular file|Is a directory"):
        read_manifest(path)


def _record_error(out: list[BaseException], call) -> None:  # type: ignore[no-untyped-def]
    try:
        call()
    except BaseException as exc:  # noqa: BLE001  (the test inspects it)
        out.append(exc)


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


# -- manifest contents -----------------------------------------------------------------
def _edit_manifest(path, edit) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_manifest_file_holds_every_field(saved) -> None:
    _, path = saved
    text = (path / MANIFEST_FILE).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2) + "\n"  # human-readable, one field a line
    created_at = data.pop("created_at")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", created_at)  # UTC, whole seconds
    assert data == {
        "format_version": 2,
        "name": "membrane",
        "version": 1,
        "model": {"arch": "unet", "num_classes": 3, "in_channels": 1, "params": {"base_channels": 4, "depth": 2}},
        "input": {"channels": 1, "mean": [0.5], "std": [0.2]},
        "inference": {"scale": 1.0, "interpolation": "auto", "stride": 4, "min_input_size": 1,
                      "tile_size": 0, "tile_overlap": 0.25, "flip_tta": False, "backend": "torch"},  # own stride
        "class_names": ["membrane", "cell", "other"],
        "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]],  # the default (Pascal VOC) colours
        "ignore_index": 255,
        "training": {},
        "metrics": {"miou": 0.5},
        "lineage": {},
        "exports": {},
        "segsvc_version": segsvc.__version__,
        "weights_sha256": hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest(),
    }
    manifest = read_manifest(path)
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.created_at == created_at and manifest.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert manifest.segsvc_version == segsvc.__version__ and manifest.weights_sha256 == data["weights_sha256"]


def test_weights_file_is_plain_safetensors(saved) -> None:
    model, path = saved
    with safe_open(path / WEIGHTS_FILE, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())


def test_palette_class_names_and_training_round_trip(tmp_path) -> None:
    model = build_model(SPEC)
    palette = [(10, 20, 30), [40, 50, 60], (255, 0, 255)]  # any sequence of three 0..255 integers
    path = save_artifact(model, tmp_path, "m", spec=SPEC, palette=palette, training={"epochs": 3})
    loaded, manifest = load_artifact(path)
    assert manifest.palette == ((10, 20, 30), (40, 50, 60), (255, 0, 255))
    assert json.loads((path / MANIFEST_FILE).read_text())["palette"] == [[10, 20, 30], [40, 50, 60], [255, 0, 255]]
    assert manifest.class_names == ("class_0", "class_1", "class_2")  # defaults
    assert manifest.training == {"epochs": 3} and manifest.metrics == {} and manifest.ignore_index is None
    assert manifest.input == InputSpec(1, (0.5,), (0.25,))  # the default for one channel
    assert loaded.training is False  # returned in eval mode


def test_manifest_with_only_the_required_fields_gets_defaults(saved) -> None:
    _, path = saved
    _edit_manifest(path, lambda m: [m.pop(k) for k in
                                    ("ignore_index", "training", "metrics", "created_at", "segsvc_version",
                                     "weights_sha256")])
    manifest = read_manifest(path)
    assert manifest.ignore_index is None and manifest.training == {} and manifest.metrics == {}
    assert (manifest.created_at, manifest.segsvc_version, manifest.weights_sha256) == ("", "", "")
    assert manifest.class_names == ("membrane", "cell", "other") and manifest.version == 1
    load_artifact(path)  # no checksum to compare: the weights still load


def test_manifest_input_channels_must_match_the_model() -> None:
    with pytest.raises(ArtifactError, match="manifest input has 3 channels but the model takes 1"):
        Manifest("m", 1, SPEC, InputSpec(3), ("a", "b", "c"), ((0, 0, 0),) * 3)
    with pytest.raises(ArtifactError, match="manifest lists 2 palette colours for 3 classes"):
        Manifest("m", 1, SPEC, InputSpec(1, (0.5,), (0.2,)), ("a", "b", "c"), ((0, 0, 0),) * 2)


def test_saving_a_model_with_mismatched_input_channels_is_refused(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="manifest input has 3 channels but the model takes 1"):
        save_artifact(build_model(SPEC), tmp_path, "m", spec=SPEC, input_spec=InputSpec(3))
    assert list((tmp_path / "m").iterdir()) == []  # nothing half-written is left behind


@pytest.mark.parametrize("field", ["name", "version", "model", "input", "class_names", "palette"])
def test_each_required_manifest_field_is_named_when_missing(saved, field) -> None:
    _, path = saved
    _edit_manifest(path, lambda m: m.pop(field))
    with pytest.raises(ArtifactError, match=re.escape(f"manifest lacks required fields ['{field}']")):
        read_manifest(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("format_version"), "manifest format_version None is not supported (expected one of [1, 2])"),
        (lambda m: m["input"].update(channels=3, mean=[0.5] * 3, std=[0.2] * 3),
         "manifest input has 3 channels but the model takes 1"),
        (lambda m: m["input"].pop("std"), "manifest is invalid: input spec must have channels, mean and std"),
        (lambda m: m.update(version="first"), "manifest is invalid: invalid literal for int()"),
        (lambda m: m.update(ignore_index="void"), "manifest is invalid: invalid literal for int()"),
        (lambda m: m.update(palette=[[0, 0, 0], [1, 2], [3, 4, 5]]), "palette colours must be [r, g, b]"),
        (lambda m: m.update(palette=[[0, 0, 0], [1, 2, 3.5], [3, 4, 5]]), "with 0..255 integers, got [1, 2, 3.5]"),
        (lambda m: m.update(palette=[[0, 0, 0], [-1, 2, 3], [3, 4, 5]]), "got [-1, 2, 3]"),
        (lambda m: m.update(palette=[[0, 0, 0], [1, 2, 256], [3, 4, 5]]), "got [1, 2, 256]"),
        (lambda m: m.update(palette=[[0, 0, 0], 7, [3, 4, 5]]), "got 7"),
        (lambda m: m.update(palette=[[0, 0, 0], [0, 0, 0]]), "manifest lists 2 palette colours for 3 classes"),
    ],
)
def test_invalid_manifest_fields_are_reported(saved, edit, message) -> None:
    _, path = saved
    _edit_manifest(path, edit)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        read_manifest(path)


def test_palette_bounds_0_and_255_are_valid(saved) -> None:
    _, path = saved
    _edit_manifest(path, lambda m: m.update(palette=[[0, 0, 0], [255, 255, 255], [0, 255, 0]]))
    assert read_manifest(path).palette == ((0, 0, 0), (255, 255, 255), (0, 255, 0))


def test_manifest_that_is_not_an_object_is_reported(saved) -> None:
    _, path = saved
    (path / MANIFEST_FILE).write_text("[1, 2, 3]")
    with pytest.raises(ArtifactError) as info:
        read_manifest(path)
    assert str(info.value) == "manifest must be a JSON object"


def test_unsupported_format_version_is_named(saved) -> None:
    _, path = saved
    _edit_manifest(path, lambda m: m.update(format_version=3))
    with pytest.raises(ArtifactError) as info:
        read_manifest(path)
    assert str(info.value) == "manifest format_version 3 is not supported (expected one of [1, 2])"


def test_unreadable_missing_and_oversized_manifests_are_reported(saved, tmp_path) -> None:
    _, path = saved
    with pytest.raises(ArtifactError, match="does not exist: not a model version directory"):
        read_manifest(tmp_path)
    good = (path / MANIFEST_FILE).read_text()
    (path / MANIFEST_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(ArtifactError, match="cannot read"):
        read_manifest(path)
    (path / MANIFEST_FILE).write_text(good + " " * ((1 << 20) - len(good)))  # exactly at the limit: read
    assert read_manifest(path).name == "membrane"
    (path / MANIFEST_FILE).write_text(good + " " * ((1 << 20) - len(good) + 1))
    with pytest.raises(ArtifactError, match="is larger than 1048576 bytes"):
        read_manifest(path)


# -- weights ---------------------------------------------------------------------------------
def test_missing_weights_file_is_reported(saved) -> None:
    _, path = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE} does not exist"):
        load_artifact(path)


def _rewrite_weights(path, edit) -> None:
    state = load_file(path / WEIGHTS_FILE)
    edit(state)
    save_file(state, path / WEIGHTS_FILE)
    _edit_manifest(path, lambda m: m.update(weights_sha256=""))


def test_missing_and_unexpected_tensors_are_counted_with_at_most_three_examples(saved) -> None:
    _, path = saved
    names = sorted(load_file(path / WEIGHTS_FILE))
    _rewrite_weights(path, lambda s: [s.pop(k) for k in names[:4]])
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    assert str(info.value) == (
        f"{path / WEIGHTS_FILE} does not hold the weights of a 'unet' model as the manifest describes it: "
        f"4 tensors missing (e.g. {names[:3]}), 0 unexpected (e.g. [])"
    )
    extra = {f"extra{i}": torch.zeros(1) for i in range(4)}
    _rewrite_weights(path, lambda s: s.update({k: torch.zeros(1) for k in names[:4]}, **extra))
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    assert str(info.value).endswith("0 tensors missing (e.g. []), 4 unexpected (e.g. ['extra0', 'extra1', 'extra2'])")


def test_wrong_shape_message_names_the_tensors_and_both_shapes(saved) -> None:
    model, path = saved
    convs = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if v.dim() == 4][:4]
    _rewrite_weights(path, lambda s: s.update({k: torch.zeros(1, 1, 1, 1) for k, _ in convs}))
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    examples = [f"{k}: file (1, 1, 1, 1) vs model {shape}" for k, shape in convs[:3]]
    assert str(info.value) == f"{path / WEIGHTS_FILE} has 4 tensors of the wrong shape, e.g. {examples}"


def test_the_model_is_loaded_onto_the_requested_device(saved) -> None:
    _, path = saved
    loaded, _ = load_artifact(path, device="meta")  # a device every machine has
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


def test_manifest_describing_an_unbuildable_model_is_reported(saved) -> None:
    _, path = saved
    _edit_manifest(path, lambda m: m["model"].update(arch="nope"))
    with pytest.raises(ArtifactError, match="cannot build the model its manifest describes: unknown model architecture"):
        load_artifact(path)


# -- names, versions, failed writes -------------------------------------------------------------
@pytest.mark.parametrize("name", ["m", "unet-3_camvid.v2", "A9", "x" * 128, "a.", "模型" * 21])
def test_valid_model_names_are_returned_unchanged(name) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 129, ".hidden", "..", "a/b", "a b", "naïve/", "m:1", "a\\b",
                                  "模" * 43])  # 129 bytes in UTF-8: a file system's 255-byte name limit is in bytes
def test_invalid_model_names_are_refused(name, tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name .*: use 1-128 letters, digits"):
        check_name(name)
    with pytest.raises(InvalidArgument, match="invalid model name"):
        save_artifact(build_model(SPEC), tmp_path, name, spec=SPEC)
    assert list(tmp_path.iterdir()) == []


def test_versions_must_be_positive_and_skip_other_entries(tmp_path) -> None:
    model = build_model(SPEC)
    with pytest.raises(InvalidArgument, match="model versions are positive integers, got 0"):
        save_artifact(model, tmp_path, "m", spec=SPEC, version=0)
    assert next_version(tmp_path / "absent") == 1
    assert save_artifact(model, tmp_path, "m", spec=SPEC, version=1).name == "1"
    (tmp_path / "m" / "7").write_text("a file, not a version")
    (tmp_path / "m" / "latest").mkdir()
    (tmp_path / "m" / "4").mkdir()
    assert next_version(tmp_path / "m") == 5
    assert save_artifact(model, tmp_path, "m", spec=SPEC).name == "5"


def test_a_version_is_written_in_a_hidden_temporary_directory_beside_it(tmp_path, monkeypatch) -> None:
    written = []
    real_save_file = artifact.save_file

    def recording_save_file(state, filename, metadata=None):
        written.append(Path(filename))
        real_save_file(state, filename, metadata=metadata)

    monkeypatch.setattr(artifact, "save_file", recording_save_file)
    root = tmp_path / "new" / "repo"  # created on the first save
    path = save_artifact(build_model(SPEC), root, "m", spec=SPEC)
    assert path == root / "m" / "1" and (path / WEIGHTS_FILE).is_file()
    (weights,) = written
    assert weights.name == WEIGHTS_FILE and weights.parent.parent == root / "m"  # same filesystem: atomic rename
    assert weights.parent.name.startswith(".tmp-1-")  # hidden, and never a version number
    assert not weights.parent.exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact, "save_file", disk_full)
    with pytest.raises(ArtifactError, match=r"cannot write model m version 1: .*No space left on device"):
        save_artifact(build_model(SPEC), tmp_path, "m", spec=SPEC)
    assert list((tmp_path / "m").iterdir()) == []


def test_losing_the_race_for_a_version_is_already_exists(tmp_path, monkeypatch) -> None:
    real_save_file = artifact.save_file

    def save_while_another_writer_wins(state, filename, metadata=None):
        real_save_file(state, filename, metadata=metadata)
        (tmp_path / "m" / "1").mkdir()
        (tmp_path / "m" / "1" / MANIFEST_FILE).write_text("{}")  # the other writer's version: not empty

    monkeypatch.setattr(artifact, "save_file", save_while_another_writer_wins)
    with pytest.raises(AlreadyExists, match="model m version 1 already exists at"):
        save_artifact(build_model(SPEC), tmp_path, "m", spec=SPEC)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # our temporary directory is gone
    assert (tmp_path / "m" / "1" / MANIFEST_FILE).read_text() == "{}"  # theirs is untouched


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(build_model(SPEC), tmp_path, "m", spec=SPEC)
    assert list((tmp_path / "m").iterdir()) == []


def test_a_manifest_for_input_segsvc_cannot_decode_fails_to_load(saved) -> None:
    """A 4-channel model loaded before and advertised [N, H, W, 4] pixels, yet every image was refused (decoding
    gives grey or RGB, a fourth channel is dropped): such a version now fails to load, saying why."""
    _, path = saved
    _edit_manifest(path, lambda m: m["input"].update(channels=4, mean=[0.5] * 4, std=[0.2] * 4))
    with pytest.raises(ArtifactError, match=re.escape("input channels must be 1 (grey) or 3 (RGB), got 4")):
        read_manifest(path)
