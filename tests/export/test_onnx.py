"""``export_onnx``: a validated model.onnx beside the weights, recorded in the manifest; refusals write nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from segsvc.errors import ArtifactError, ExportError, FailedPrecondition
from segsvc.export import MIN_AGREEMENT, ONNX_FILE
from segsvc.export.compare import check_sizes, sample_size
from segsvc.export.onnx import UNEXPORTABLE, export_onnx, published_onnx, to_onnx
from segsvc.models.artifact import load_artifact, read_manifest
from tests.export.conftest import TINY, calibrated, publish


def TINY_UNET() -> torch.nn.Module:  # noqa: N802 - reads like the class it builds
    return calibrated(TINY["unet"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["fcn8s", "unet", "segnet", "smp-unet"])
def test_export_is_validated_recorded_and_runs_at_any_padded_size(repo: Path, kind: str) -> None:
    version_dir = publish(repo, "m", TINY[kind])
    weights_before = (version_dir / "weights.safetensors").read_bytes()
    result = export_onnx(version_dir, checks=4)

    path = version_dir / ONNX_FILE
    assert result.path == path and path.is_file()
    assert not [p.name for p in version_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"
    entry = read_manifest(version_dir).exports["onnx"]
    assert entry["file"] == ONNX_FILE
    assert entry["sha256"] == _sha(path) == result.sha256
    assert entry["opset"] == 18 == result.opset
    assert entry["torch"] == torch.__version__
    v = entry["validation"]
    assert v["checks"] == 4 and v["agreement"] >= MIN_AGREEMENT and v["max_abs_diff"] < 1e-3
    sizes = [tuple(s) for s in v["sizes"]]
    assert any(n > 1 for n, _, _ in sizes) and any(h != w for _, h, w in sizes)
    # the export leaves the weights and the rest of the manifest alone, and the version still loads
    assert (version_dir / "weights.safetensors").read_bytes() == weights_before
    model, manifest = load_artifact(version_dir)
    assert manifest.metrics == {"miou": 0.5} and manifest.exports["onnx"]["sha256"] == result.sha256

    graph = onnx.load(path)
    dims = [[d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim] for t in (*graph.graph.input,
                                                                                         *graph.graph.output)]
    assert [t.name for t in graph.graph.input] == ["input"] and [t.name for t in graph.graph.output] == ["logits"]
    assert dims[0] == ["batch", 3, "height", "width"]
    assert isinstance(dims[1][0], str) and dims[1][1] == 3
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # a size the validation did not use: ONNX Runtime still matches eager PyTorch, and labels vary
    s = manifest.inference.stride or model.output_stride
    n, h, w = 2, 7 * s, 3 * s
    assert (n, h, w) not in sizes and (n, h, w) != sample_size(s, 1)
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    assert got.shape == (n, 3, h, w)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert len(np.unique(expected.argmax(1))) > 1, "a constant label map would make agreement meaningless"


def test_check_sizes_are_padded_batched_non_square_and_never_the_traced_size() -> None:
    for stride, min_size in ((32, 1), (16, 128), (8, 20)):
        sizes = check_sizes(stride, min_size, 9)
        assert len(sizes) == 9 and len(set(sizes)) == 9
        assert all(h % stride == 0 and w % stride == 0 and min(h, w) >= min_size for _, h, w in sizes)
        assert any(n > 1 for n, _, _ in sizes) and any(h != w for _, h, w in sizes)
        _, sh, sw = sample_size(stride, min_size)
        assert all((h, w) != (sh, sw) for _, h, w in sizes)


def _disagreeing_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime returns the negated logits: every label flips."""
    real_run = ort.InferenceSession.run

    def run(self, output_names, feed, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [-o for o in real_run(self, output_names, feed, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", run)


def test_a_disagreeing_export_is_refused_and_writes_nothing(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
    _disagreeing_run(monkeypatch)
    with pytest.raises(ExportError, match=r"does not reproduce.*labels agree on") as info:
        export_onnx(version_dir)
    assert isinstance(info.value, FailedPrecondition)
    assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before  # no model.onnx, same manifest


def test_a_refused_re_export_keeps_the_published_one(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version_dir = publish(repo, "m", TINY["segnet"])
    export_onnx(version_dir, checks=1)
    before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
    _disagreeing_run(monkeypatch)
    with pytest.raises(ExportError):
        export_onnx(version_dir, checks=1)
    assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before
    assert published_onnx(version_dir) == version_dir / ONNX_FILE


def test_the_check_runs_eager_pytorch_as_a_cpu_server_does(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU server runs a CNN channels-last: the export is checked against that path, not another layout."""
    from segsvc.inference.backends import TorchBackend

    layouts: list[bool] = []
    run = TorchBackend.run

    def spy(self: TorchBackend, padded: torch.Tensor) -> torch.Tensor:
        out = run(self, padded)
        layouts.append(self.channels_last)
        return out

    monkeypatch.setattr(TorchBackend, "run", spy)
    export_onnx(publish(repo, "m", TINY["unet"]), checks=2)
    assert layouts and all(layouts)


def test_logits_beyond_the_tolerance_are_refused(repo: Path) -> None:
    """fp32 ONNX Runtime differs from PyTorch by ~1e-7: a tolerance below that must refuse."""
    version_dir = publish(repo, "m", TINY["segnet"])
    with pytest.raises(ExportError, match=r"max \|logit difference\|"):
        export_onnx(version_dir, checks=1, tolerance=1e-12)
    assert not (version_dir / ONNX_FILE).exists() and "onnx" not in read_manifest(version_dir).exports


@pytest.mark.parametrize("arch", sorted(UNEXPORTABLE))
def test_unexportable_architectures_fail_with_the_reason(repo: Path, arch: str) -> None:
    from segsvc.config import ModelSpec

    version_dir = publish(repo, "m", ModelSpec(arch, 3, 3, {"encoder_name": "resnet18"}))
    with pytest.raises(ExportError, match=r"cannot be exported to ONNX: .*AdaptiveAvgPool2d"):
        export_onnx(version_dir)
    assert not (version_dir / ONNX_FILE).exists()


def test_a_size_the_exporter_fixes_is_refused() -> None:
    """A model that only accepts one height: the exporter specialises it, and ``to_onnx`` says so."""

    _, height, _ = sample_size(16, 1)

    class OneHeight(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] == height:  # a branch on the size: the exporter keeps the traced one
                return x[:, :2] * 2
            return x[:, :2] * 3

    with pytest.raises(ExportError, match=f"static shape of {height} for dimension inputs.0..shape.2.") as info:
        to_onnx(OneHeight(), in_channels=3, stride=16, min_size=1)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600  # one readable line, not a traceback


def test_a_graph_with_a_fixed_axis_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the exporter pin an axis silently (it "refines" shapes it cannot keep), ``to_onnx`` refuses."""
    real_export = torch.onnx.export

    def pinning_export(*args, **kwargs):  # type: ignore[no-untyped-def]
        proto = real_export(*args, **kwargs).model_proto
        proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 48
        return SimpleNamespace(model_proto=proto)

    monkeypatch.setattr(torch.onnx, "export", pinning_export)
    with pytest.raises(ExportError, match=r"fixed the size of input to \['batch', 3, 'height', 48\]"):
        to_onnx(TINY_UNET(), in_channels=3, stride=4, min_size=1)


def test_an_opset_the_exporter_cannot_reach_is_refused(repo: Path) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    with pytest.raises(ExportError, match="opset 11"):
        export_onnx(version_dir, opset=11)
    assert not (version_dir / ONNX_FILE).exists()


def test_published_onnx_checks_the_recorded_sha256(repo: Path) -> None:
    version_dir = publish(repo, "m", TINY["segnet"])
    assert published_onnx(version_dir) is None
    export_onnx(version_dir, checks=1)
    path = version_dir / ONNX_FILE
    assert published_onnx(version_dir) == path
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        published_onnx(version_dir)
    path.unlink()
    with pytest.raises(ArtifactError, match="not a file"):
        published_onnx(version_dir)


def test_the_manifest_rewrite_is_atomic_and_keeps_its_mode(repo: Path) -> None:
    version_dir = publish(repo, "m", TINY["segnet"])
    manifest_path = version_dir / "manifest.json"
    manifest_path.chmod(0o640)
    before = json.loads(manifest_path.read_text())
    export_onnx(version_dir, checks=1)
    after = json.loads(manifest_path.read_text())
    assert manifest_path.stat().st_mode & 0o777 == 0o640
    assert {k: v for k, v in after.items() if k != "exports"} == {k: v for k, v in before.items() if k != "exports"}
    assert set(after["exports"]) == {"onnx"}


def _loads_and_matches(version_dir: Path) -> Path:
    """The recorded export: it matches the manifest's SHA-256 and the onnxruntime backend serves it."""
    from segsvc.inference.backends import OnnxRuntimeBackend

    path = published_onnx(version_dir)
    assert path is not None and _sha(path) == read_manifest(version_dir).exports["onnx"]["sha256"]
    backend = OnnxRuntimeBackend.for_manifest(version_dir, read_manifest(version_dir), torch.device("cpu"))
    assert backend.forward(torch.zeros(1, 3, 32, 48)).shape == (1, 3, 32, 48)
    return path


def test_a_re_export_whose_manifest_write_fails_keeps_the_earlier_export(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC on the manifest (or kill -9 just before it): the recorded file was never replaced."""
    import segsvc.export.onnx as exporter

    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
    seen: list[Path] = []

    def no_space(*args: object, **kwargs: object) -> None:
        seen.append(_loads_and_matches(version_dir))  # the state a kill -9 here would leave
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "write_manifest", no_space)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(version_dir, checks=1, opset=17)
    assert seen == [version_dir / ONNX_FILE]
    assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before  # the new file is gone too
    assert _loads_and_matches(version_dir) == version_dir / ONNX_FILE


def test_a_re_export_switches_to_a_new_file_and_keeps_the_old_one_as_previous(repo: Path) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    first = export_onnx(version_dir, checks=1)
    second = export_onnx(version_dir, checks=1, opset=17)
    assert first.path == version_dir / ONNX_FILE and first.sha256 != second.sha256
    assert second.path == version_dir / f"model-{second.sha256[:12]}.onnx"
    assert read_manifest(version_dir).exports["onnx"]["file"] == second.path.name
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(["manifest.json", "weights.safetensors",
                                                                     ONNX_FILE, second.path.name])
    assert read_manifest(version_dir).exports["onnx"]["previous"] == {"file": ONNX_FILE, "sha256": first.sha256}
    assert _loads_and_matches(version_dir) == second.path
    # the same bytes again: the recorded name, still one file, still matching
    third = export_onnx(version_dir, checks=1, opset=17)
    assert third.path == second.path and third.sha256 == second.sha256
    assert sorted(p.name for p in version_dir.glob("*.onnx")) == sorted([ONNX_FILE, second.path.name])
    assert _loads_and_matches(version_dir) == second.path


def test_the_file_declares_the_lowest_ir_version_its_opsets_need(repo: Path) -> None:
    """The exporter writes IR version 10, which ONNX Runtime <= 1.16 (Triton 23.x) refuses; opset 18 needs only 8."""
    version_dir = publish(repo, "m", TINY["unet"])
    result = export_onnx(version_dir, checks=1)
    graph = onnx.load(result.path)
    needed = onnx.helper.find_min_ir_version_for(list(graph.opset_import), ignore_unknown=True)
    assert graph.ir_version == needed == 8
    # nothing in it that only IR 10 has (annotations of nodes, graphs and tensors), and it still checks
    values = [*graph.graph.input, *graph.graph.output, *graph.graph.value_info]
    assert not any(n.metadata_props for n in graph.graph.node) and not graph.graph.metadata_props
    assert not any(v.metadata_props for v in values) and not any(t.metadata_props for t in graph.graph.initializer)
    assert {p.key for p in graph.metadata_props} >= {"segsvc.model", "segsvc.version"}
    onnx.checker.check_model(graph, full_check=True)


def test_two_first_exports_at_once_leave_a_manifest_that_matches_its_file(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A is held between writing its file and writing the manifest while B exports (another opset): whichever
    publishes last, the manifest must name a file whose SHA-256 it records."""
    import fcntl
    import threading

    import segsvc.export.onnx as exporter

    version_dir = publish(repo, "m", TINY["unet"])
    a_wrote_file, b_reached = threading.Event(), threading.Event()
    real_write_manifest, real_flock = exporter.write_manifest, fcntl.flock

    def held_write_manifest(*args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "A" and not a_wrote_file.is_set():
            a_wrote_file.set()
            assert b_reached.wait(300), "B neither finished nor waited for a lock"
        return real_write_manifest(*args, **kwargs)

    def flock(fd: int, operation: int) -> None:
        if threading.current_thread().name == "B" and operation & fcntl.LOCK_EX:
            b_reached.set()  # B is about to wait for A's lock
        real_flock(fd, operation)

    monkeypatch.setattr(exporter, "write_manifest", held_write_manifest)
    monkeypatch.setattr(fcntl, "flock", flock)
    results: dict[str, object] = {}

    def run(name: str, opset: int) -> None:
        try:
            results[name] = export_onnx(version_dir, checks=1, opset=opset)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[name] = exc
        finally:
            if name == "B":
                b_reached.set()

    a = threading.Thread(target=run, args=("A", 18), name="A")
    a.start()
    assert a_wrote_file.wait(300) or not a.is_alive(), "A never reached its manifest write"
    b = threading.Thread(target=run, args=("B", 17), name="B")
    b.start()
    a.join(300)  # against a hang only: each spans a whole export
    b.join(300)
    assert not a.is_alive() and not b.is_alive()
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    entry = read_manifest(version_dir).exports["onnx"]
    path = published_onnx(version_dir)  # raises when the file does not match the recorded SHA-256
    assert path is not None and _sha(path) == entry["sha256"]
    assert entry["opset"] == 17  # B published last: it waited for A
    # A's file, superseded, is kept for a loader that read A's manifest (tests/export/test_reexport.py)
    assert sorted(p.name for p in version_dir.glob("*.onnx")) == sorted([ONNX_FILE, path.name])
    assert entry["previous"]["file"] == ONNX_FILE
    assert not [p.name for p in version_dir.iterdir() if p.name.startswith(".")]  # no lock or temporary left
    assert _loads_and_matches(version_dir) == path
