"""``export_triton``: the layout tritonserver reads, a config.pbtxt that parses as Triton's ``ModelConfig``."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from segsvc.errors import AlreadyExists, ArtifactError
from segsvc.export.onnx import export_onnx
from segsvc.export.triton import default_out, export_triton
from segsvc.models.artifact import read_manifest
from tests.export.conftest import CLASSES, TINY, publish

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_config_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Triton's ``ModelConfig`` message: tritonclient's copy, else compiled from protos/oip/model_config.proto."""
    try:
        return importlib.import_module("tritonclient.grpc.model_config_pb2")
    except ImportError:
        from grpc_tools import protoc

        out = tmp_path_factory.mktemp("model_config")
        assert protoc.main(["protoc", f"-I{ROOT / 'protos' / 'oip'}", f"--python_out={out}", "model_config.proto"]) == 0
        sys.path.insert(0, str(out))
        try:
            return importlib.import_module("model_config_pb2")
        finally:
            sys.path.remove(str(out))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_config_and_labels_are_what_tritonserver_reads(repo: Path, tmp_path: Path,
                                                             model_config_pb2: ModuleType) -> None:
    version_dir = publish(repo, "street", TINY["segnet"])
    out = tmp_path / "triton"
    result = export_triton(version_dir, out, max_batch_size=4, checks=2)

    assert result.exported  # the version had no export: it was made (and recorded) first
    entry = read_manifest(version_dir).exports["onnx"]
    model_dir = out / "street"
    assert sorted(p.name for p in out.iterdir()) == ["street"]  # no temporary directory left
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt", "segsvc.json"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx"]
    assert (result.config, result.onnx, result.labels) == (model_dir / "config.pbtxt", model_dir / "1" / "model.onnx",
                                                          model_dir / "labels.txt")
    assert _sha(result.onnx) == entry["sha256"] == _sha(version_dir / "model.onnx")

    # strict parse: an unknown field, a wrong enum name or a type error raises
    text = result.config.read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == model_dir.name == "street"  # tritonserver requires the name to match the directory
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    [inp], [out_] = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", fp32, [3, -1, -1])
    assert (out_.name, out_.data_type, list(out_.dims)) == ("logits", fp32, [3, -1, -1])
    assert (model_dir / out_.label_filename).read_text().splitlines() == list(CLASSES)
    # a round trip through the message keeps every field
    again = text_format.Parse(text_format.MessageToString(config), model_config_pb2.ModelConfig())
    assert again == config

    # the config describes the graph Triton's onnxruntime backend will load (batch axis implicit)
    graph = onnx.load(result.onnx)
    shapes = {t.name: [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
              for t in (*graph.graph.input, *graph.graph.output)}
    for tensor in (inp, out_):
        shape = shapes[tensor.name]
        assert isinstance(shape[0], str) and len(shape) == 1 + len(tensor.dims)
        assert [d if isinstance(d, int) else -1 for d in shape[1:]] == list(tensor.dims)
    session = ort.InferenceSession(str(result.onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 3, 48, 80), dtype=np.float32)
    assert session.run(["logits"], {"input": x})[0].shape == (4, 3, 48, 80)


def test_a_verified_export_is_reused_and_a_tampered_one_refused(repo: Path, tmp_path: Path) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    manifest_before = (version_dir / "manifest.json").read_bytes()
    result = export_triton(version_dir, tmp_path / "triton")
    assert not result.exported and (version_dir / "manifest.json").read_bytes() == manifest_before
    assert result.onnx.read_bytes() == (version_dir / "model.onnx").read_bytes()

    with open(version_dir / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        export_triton(version_dir, tmp_path / "other")
    assert not (tmp_path / "other" / "m").exists()


def test_a_second_export_replaces_the_model_directory_but_never_a_foreign_one(repo: Path, tmp_path: Path,
                                                                             model_config_pb2: ModuleType) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    out = tmp_path / "triton"
    export_triton(version_dir, out, checks=1)
    stale = out / "m" / "1" / "stale.txt"
    stale.write_text("left over")
    result = export_triton(version_dir, out, max_batch_size=2)
    config = text_format.Parse(result.config.read_text(), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 2 and not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["m"]

    (out / "m").rename(out / "mine")
    (out / "m").mkdir()
    (out / "m" / "notes.txt").write_text("someone else's")
    with pytest.raises(AlreadyExists, match="not a Triton model directory"):
        export_triton(version_dir, out)
    assert (out / "m" / "notes.txt").read_text() == "someone else's"
    assert sorted(p.name for p in out.iterdir()) == ["m", "mine"]


def test_default_out_is_beside_the_repository(tmp_path: Path) -> None:
    assert default_out(tmp_path / "model_repository") == tmp_path.resolve() / "model_repository-triton"
    assert default_out(str(tmp_path / "runs" / "repo") + "/") == tmp_path.resolve() / "runs" / "repo-triton"


@pytest.mark.parametrize("tile_padding, says, never", [
    ("zero", "zeros", "mirror"),
    ("reflect", "mirrored image", "zeros"),  # contract.pad_to_multiple mirrors the image then
])
def test_the_stated_padding_is_the_manifests(repo: Path, tmp_path: Path, model_config_pb2: ModuleType,
                                             tile_padding: str, says: str, never: str) -> None:
    import json

    from segsvc.config import InferenceSpec
    from segsvc.models.artifact import save_artifact
    from tests.export.conftest import calibrated

    spec = TINY["unet"]
    version_dir = save_artifact(calibrated(spec), repo, "m", spec=spec, class_names=list(CLASSES),
                                inference=InferenceSpec(tile_padding=tile_padding))
    result = export_triton(version_dir, tmp_path / "triton", checks=1)
    info = json.loads((result.model_dir / "segsvc.json").read_text())
    assert info["inference"].get("tile_padding", "zero") == tile_padding
    assert info["padding"]["where"].startswith("bottom/right, ")
    assert says in info["padding"]["where"] and never not in info["padding"]["where"]
    text = result.config.read_text()
    [line] = [line for line in text.splitlines() if "padded at the bottom/right" in line]
    assert line.startswith("# ") and says in line and never not in line
    text_format.Parse(text, model_config_pb2.ModelConfig())  # the header is still only a comment


def test_the_header_names_what_segsvc_does_around_the_network(repo: Path, tmp_path: Path,
                                                              model_config_pb2: ModuleType) -> None:
    """A CamVid FCN-8s served at scale 0.5 with flip averaging: a Triton client that did what config.pbtxt's
    header said (normalise, pad, crop) agreed with segsvc's labels on 95% of the pixels; the scale and the flip
    were only in segsvc.json. The header names every step of the contract the graph does not do, or says none."""
    from segsvc.config import InferenceSpec
    from segsvc.models.artifact import save_artifact
    from tests.export.conftest import calibrated

    spec = TINY["unet"]
    plain = save_artifact(calibrated(spec), repo, "plain", spec=spec, class_names=list(CLASSES))
    text = export_triton(plain, tmp_path / "triton", checks=1).config.read_text()
    assert "# segsvc serves it with nothing else around the network" in text
    served = save_artifact(calibrated(spec), repo, "served", spec=spec, class_names=list(CLASSES),
                           inference=InferenceSpec(scale=0.5, flip_tta=True, tile_size=64, shift=(-0.6, 0.2)))
    text = export_triton(served, tmp_path / "triton", checks=1).config.read_text()
    [line] = [line for line in text.splitlines() if line.startswith("# segsvc serves it with these steps")]
    for step in ("translate the image by (dy, dx) = (-0.60, +0.20) px", "resize the image by 0.5",
                 "64 px tiles overlapping by 0.25", "horizontally flipped"):
        assert step in line, step
    text_format.Parse(text, model_config_pb2.ModelConfig())  # still only a comment


def test_the_model_file_is_as_readable_as_its_config(repo: Path, tmp_path: Path) -> None:
    """A tritonserver running as another user must read model.onnx whenever it can read config.pbtxt."""
    import os

    version_dir = publish(repo, "m", TINY["unet"])
    (version_dir / "weights.safetensors").chmod(0o600)  # the version's own export is then 0600 too
    export_onnx(version_dir, checks=1)
    assert (version_dir / "model.onnx").stat().st_mode & 0o777 == 0o600
    umask = os.umask(0o022)
    os.umask(umask)
    result = export_triton(version_dir, tmp_path / "triton")
    config_mode = result.config.stat().st_mode & 0o777
    assert config_mode == 0o666 & ~umask  # a newly created file's mode
    assert result.onnx.stat().st_mode & 0o777 == config_mode
    assert result.labels.stat().st_mode & 0o777 == config_mode


def test_the_model_folders_follow_the_umask(repo: Path, tmp_path: Path) -> None:
    """The model folder was set to 0755 whatever the umask: under 027 it let everyone list what its files hid."""
    import os

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    umask = os.umask(0o027)
    try:
        result = export_triton(version_dir, tmp_path / "triton")
    finally:
        os.umask(umask)
    assert result.model_dir.stat().st_mode & 0o777 == 0o750
    assert result.onnx.parent.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (result.config, result.onnx, result.labels)} == {0o640}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_export_builds_its_temporaries_outside_the_triton_repository(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tritonserver takes every folder of its repository for a model, dot-folders included."""
    import segsvc.export.triton as triton

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    seen: list[tuple[list[str], Path, int]] = []
    real_copy = triton.shutil.copyfile

    def copy(src: object, dst: object, **kwargs: object) -> object:
        building = Path(str(dst)).parents[1]  # <building>/1/model.onnx
        seen.append((_entries(out), building, building.stat().st_dev))
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(triton.shutil, "copyfile", copy)
    export_triton(version_dir, out)  # first export: nothing to replace
    export_triton(version_dir, out)  # second: the model directory is swapped
    assert [names for names, _, _ in seen] == [[], ["m"]]  # nothing else in out while each was being built
    for _, building, device in seen:
        assert out not in building.parents and building.parent.parent == out.parent
        assert device == out.stat().st_dev  # the same filesystem: swapped in by rename
    assert _entries(out) == ["m"] and _entries(tmp_path) == ["model_repository", "triton"]  # nor beside out
    assert _entries(out / "m") == ["1", "config.pbtxt", "labels.txt", "segsvc.json"]


def test_when_nothing_beside_out_shares_its_filesystem_the_export_builds_inside_it(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """out a mount point: a rename from its parent would fail, so the temporaries go in out (and go away)."""
    import segsvc.export.triton as triton

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    export_triton(version_dir, out)
    real_device = triton._device
    monkeypatch.setattr(triton, "_device", lambda path: real_device(path) + (Path(path) != out.resolve()))
    seen: list[tuple[list[str], Path]] = []
    real_copy = triton.shutil.copyfile

    def copy(src: object, dst: object, **kwargs: object) -> object:
        seen.append((_entries(out), Path(str(dst))))
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(triton.shutil, "copyfile", copy)
    export_triton(version_dir, out)
    [(names, dst)] = seen
    building = dst.parents[1]
    assert building.parent == out and building.name.startswith(".tmp-m-") and names == sorted(["m", building.name])
    assert _entries(out) == ["m"] and _entries(tmp_path) == ["model_repository", "triton"]
    assert _entries(out / "m") == ["1", "config.pbtxt", "labels.txt", "segsvc.json"]


_KILLED_EXPORT = """
import os, shutil, sys, time
import segsvc.export.triton as triton
real = shutil.copyfile
def copy_then_hang(src, dst, **kwargs):
    real(src, dst, **kwargs)
    open(sys.argv[3], "w").close()  # the test kills us now
    while True:
        time.sleep(1)
triton.shutil.copyfile = copy_then_hang
triton.export_triton(sys.argv[1], sys.argv[2])
"""


def test_a_killed_export_leaves_nothing_in_the_repository_and_the_next_one_cleans_up(
        repo: Path, tmp_path: Path) -> None:
    """kill -9 mid-copy (OOM killer, CI timeout): Triton must not find a half-built folder in its repository."""
    import os
    import signal
    import subprocess
    import time

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    export_triton(version_dir, out)
    marker = tmp_path / "copied"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(version_dir), str(out), str(marker)],
                            cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120  # against a hang only (it imports torch first)
        while not marker.exists():
            assert proc.poll() is None, "the export ended before its copy"
            assert time.monotonic() < deadline, "the export never reached its copy"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert _entries(out) == ["m"]  # what tritonserver polls holds only the model
    assert [p for p in tmp_path.iterdir() if p.name not in ("model_repository", "triton", "copied")]  # the leftover

    export_triton(version_dir, out)
    assert _entries(out) == ["m"]
    assert _entries(tmp_path) == ["copied", "model_repository", "triton"]  # the killed export's folder is gone


def test_stale_temporaries_of_that_model_are_removed_and_nothing_else(repo: Path, tmp_path: Path) -> None:
    """Leftovers of exports killed before segsvc built outside out (``.tmp-<model>-XXXXXXXX`` and
    ``.old-<model>-XXXXXXXX`` inside out) go; other models', other names, symlinks and files stay."""
    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    export_triton(version_dir, out)
    stale = [out / ".tmp-m-ab_d1234" / "1", out / ".old-m-x9z8y7w6" / "m" / "1"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder.parent / "config.pbtxt").write_text('name: "m"\n')
        (folder / "model.onnx").write_bytes(b"onnx")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    kept = {
        ".tmp-other-ab_d1234": "dir",  # another model's
        ".tmp-mm-ab_d1234": "dir",  # another model's
        ".tmp-m-abc": "dir",  # not a name mkdtemp makes
        ".tmp-m-ab_d12345": "dir",
        ".tmp-m-ABCD1234": "dir",
        "tmp-m-ab_d1234": "dir",
        ".tmp-m-zzzzzzzz": "symlink",  # not a folder segsvc made: never followed, never removed
        ".old-m-yyyyyyyy": "file",
        "other": "dir",
    }
    for name, kind in kept.items():
        if kind == "dir":
            (out / name).mkdir()
            (out / name / "notes.txt").write_text(name)
        elif kind == "symlink":
            (out / name).symlink_to(outside, target_is_directory=True)
        else:
            (out / name).write_text(name)
    export_triton(version_dir, out)
    assert _entries(out) == sorted(["m", *kept])
    assert not (out / ".tmp-m-ab_d1234").exists() and not (out / ".old-m-x9z8y7w6").exists()
    for name, kind in kept.items():
        if kind == "dir":
            assert (out / name / "notes.txt").read_text() == name
        elif kind == "symlink":
            assert (out / name).is_symlink()
        else:
            assert (out / name).read_text() == name
    assert _entries(outside) == ["keep.txt"] and (outside / "keep.txt").read_text() == "keep"


def test_options_that_differ_from_the_recorded_export_make_a_new_one(repo: Path, tmp_path: Path) -> None:
    """--opset, --checks, --tolerance, --min-agreement are never silently ignored: the recorded export is reused
    only when they were not given or match it; otherwise it is replaced, as ``--format onnx`` with them would."""
    from segsvc.export import DEFAULT_CHECKS, DEFAULT_TOLERANCE, MIN_AGREEMENT

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"

    def recorded() -> dict:
        return dict(read_manifest(version_dir).exports["onnx"])

    def opset_of(path: Path) -> int:
        return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))

    before = (version_dir / "manifest.json").read_bytes()
    for options in ({}, {"opset": 18}, {"checks": 1}, {"opset": 18, "checks": 1, "tolerance": DEFAULT_TOLERANCE,
                                                         "min_agreement": MIN_AGREEMENT}):
        result = export_triton(version_dir, out, **options)
        assert not result.exported, options
        assert (version_dir / "manifest.json").read_bytes() == before
        assert opset_of(result.onnx) == 18

    result = export_triton(version_dir, out, opset=17, checks=1)
    entry = recorded()
    assert result.exported and entry["opset"] == 17 and entry["validation"]["checks"] == 1
    assert entry["file"] != "model.onnx" and entry["previous"]["file"] == "model.onnx"  # replaced, as a re-export
    assert opset_of(result.onnx) == 17 and _sha(result.onnx) == entry["sha256"] == _sha(version_dir / entry["file"])
    assert "opset 18" in result.reason and "17" in result.reason

    result = export_triton(version_dir, out, opset=17, checks=1)  # now it matches
    assert not result.exported and result.reason is None and recorded() == entry

    result = export_triton(version_dir, out, checks=2)  # the options not given: the recorded export's (opset 17)
    entry = recorded()
    assert result.exported and "checks" in result.reason
    assert entry["opset"] == 17 and entry["validation"]["checks"] == 2 and opset_of(result.onnx) == 17

    for option, value in (("tolerance", DEFAULT_TOLERANCE / 2), ("min_agreement", 0.99)):
        result = export_triton(version_dir, out, checks=2, **{option: value})
        entry = recorded()
        assert result.exported and option.replace("_", " ") in result.reason, option
        assert entry["validation"][option] == value and entry["validation"]["checks"] == 2
        assert entry["opset"] == 17 and _sha(result.onnx) == entry["sha256"]
    assert entry["validation"]["tolerance"] == DEFAULT_TOLERANCE / 2  # kept by the min_agreement re-export
    assert DEFAULT_CHECKS != 2


def test_a_second_export_into_out_waits_then_reads_the_manifest_the_first_left(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-exports (opset 17, replacing model.onnx) holding the out lock while B waits for it: B must read the
    manifest only once it has the lock, and use A's new file rather than the removed one."""
    import fcntl
    import threading

    import segsvc.export.triton as triton

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    a_in_lock, b_waits = threading.Event(), threading.Event()
    real_export, real_flock = triton.export_onnx, fcntl.flock

    def held_export(*args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "A":
            a_in_lock.set()  # A holds the out lock, about to re-export
            assert b_waits.wait(300), "B neither finished nor waited for the out lock"
        return real_export(*args, **kwargs)

    def flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == "B" and operation & fcntl.LOCK_EX:
            b_waits.set()  # B is about to wait for A's out lock
        real_flock(fd, operation)

    monkeypatch.setattr(triton, "export_onnx", held_export)
    monkeypatch.setattr(fcntl, "flock", flock)
    results: dict[str, object] = {}

    def run(name: str, **options: object) -> None:
        try:
            results[name] = export_triton(version_dir, out, **options)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[name] = exc
        finally:
            a_in_lock.set()
            b_waits.set()

    a = threading.Thread(target=run, args=("A",), kwargs={"opset": 17, "checks": 1}, name="A")
    a.start()
    assert a_in_lock.wait(300), "A never reached its export"
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    a.join(300)
    b.join(300)
    assert not a.is_alive() and not b.is_alive()
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    first, second = results["A"], results["B"]
    entry = read_manifest(version_dir).exports["onnx"]
    assert first.exported and entry["opset"] == 17 and entry["file"] != "model.onnx"
    assert not second.exported  # A's export matches what B asked for (nothing): used, not made again
    assert _sha(second.onnx) == entry["sha256"] == _sha(version_dir / entry["file"])
    assert _entries(out) == ["m"] and _entries(tmp_path) == ["model_repository", "triton"]


def test_a_recorded_export_above_the_ir_version_its_opsets_need_is_made_again(repo: Path, tmp_path: Path) -> None:
    """A version exported before segsvc lowered the IR version (IR 10, refused by ONNX Runtime <= 1.16) must not
    reach Triton as it is: it is exported anew, with the options it was made with."""
    from dataclasses import replace

    from segsvc.files import sha256_hex
    from segsvc.models.artifact import write_manifest

    version_dir = publish(repo, "m", TINY["unet"])
    made = export_onnx(version_dir, checks=1, opset=17)
    graph = onnx.load(made.path)
    graph.ir_version = 10
    onnx.save(graph, made.path)
    manifest = read_manifest(version_dir)
    entry = {**manifest.exports["onnx"], "sha256": sha256_hex(made.path)}
    write_manifest(version_dir, replace(manifest, exports={**manifest.exports, "onnx": entry}))

    result = export_triton(version_dir, tmp_path / "triton")
    assert result.exported and "IR version 10" in result.reason and result.replaced == "model.onnx"
    assert onnx.load(result.onnx).ir_version == 8
    entry = read_manifest(version_dir).exports["onnx"]
    assert entry["opset"] == 17 and entry["validation"]["checks"] == 1  # the recorded export's options
    assert _sha(result.onnx) == entry["sha256"]
    assert not export_triton(version_dir, tmp_path / "triton").exported  # and now it is reused


def _building_places(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Where each model directory is built (the folder holding ``<tmp>/1/model.onnx``), as export_triton runs."""
    import segsvc.export.triton as triton

    seen: list[Path] = []
    real_copy = triton.shutil.copyfile

    def copy(src: object, dst: object, **kwargs: object) -> object:
        seen.append(Path(str(dst)).parents[2])
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(triton.shutil, "copyfile", copy)
    return seen


def test_a_staging_folder_others_can_write_is_not_used(repo: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone else's (or a group- or world-writable) ``.<out>.segsvc-staging`` could be swapped under the export:
    the export builds inside out instead, and leaves that folder alone."""
    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    out.mkdir()
    staging = tmp_path / ".triton.segsvc-staging"
    staging.mkdir()
    staging.chmod(0o777)
    (staging / "tmp-m-abcd1234").mkdir()  # looks like a killed export's, but in a folder that is not ours
    places = _building_places(monkeypatch)
    export_triton(version_dir, out)
    export_triton(version_dir, out)
    assert places == [out, out]
    assert _entries(out) == ["m"] and _entries(staging) == ["tmp-m-abcd1234"]
    assert staging.stat().st_mode & 0o777 == 0o777


def test_a_staging_folder_that_cannot_be_written_is_not_used(repo: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A leftover staging folder the export cannot make its temporary in (another user's): it builds inside out."""
    import segsvc.export.triton as triton

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    real_mkdtemp = triton.tempfile.mkdtemp

    def mkdtemp(*args: object, dir: object = None, **kwargs: object) -> str:  # noqa: A002 - mkdtemp's name
        if dir is not None and Path(str(dir)).name.endswith(".segsvc-staging"):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(triton.tempfile, "mkdtemp", mkdtemp)
    places = _building_places(monkeypatch)
    export_triton(version_dir, out)
    assert places == [out]
    assert _entries(out) == ["m"] and _entries(tmp_path) == ["model_repository", "triton"]


def test_a_rename_across_mounts_from_the_staging_folder_falls_back_to_building_inside_out(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """out a bind mount of a folder on its parent's filesystem: same st_dev, yet rename() into it fails with EXDEV."""
    import errno
    import os

    import segsvc.export.triton as triton

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    out = tmp_path / "triton"
    staging = tmp_path / ".triton.segsvc-staging"
    export_triton(version_dir, out)  # a model directory to replace
    real_rename = os.rename
    refused: list[str] = []

    def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
        if staging in Path(str(src)).parents or staging in Path(str(dst)).parents:
            refused.append(str(src))
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(triton.os, "rename", rename)
    places = _building_places(monkeypatch)
    result = export_triton(version_dir, out, max_batch_size=2)
    assert refused and places == [staging, out]
    assert "max_batch_size: 2" in result.config.read_text()
    assert _entries(out) == ["m"] and _entries(tmp_path) == ["model_repository", "triton"]
    assert _entries(out / "m") == ["1", "config.pbtxt", "labels.txt", "segsvc.json"]


def test_a_failed_export_leaves_nothing_beside_out(repo: Path, tmp_path: Path) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    made = export_onnx(version_dir, checks=1)
    made.path.write_bytes(made.path.read_bytes() + b"x")
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        export_triton(version_dir, tmp_path / "triton")
    assert _entries(tmp_path) == ["model_repository", "triton"] and _entries(tmp_path / "triton") == []
