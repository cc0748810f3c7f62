"""Review: the ONNX export a version is served from is bounded, read once and fully covered by its SHA-256."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import ArtifactError
from segsvc.inference.backends import EngineConfig, OnnxRuntimeBackend, open_version_dir
from segsvc.inference.backends import ort as ort_backend
from segsvc.models.artifact import MANIFEST_FILE, save_artifact
from segsvc.models.registry import build_model

CPU = torch.device("cpu")
ORT = EngineConfig(device="cpu", backend="onnxruntime", warmup=False)
SPEC = ModelSpec("unet", 3, 1, {"base_channels": 4, "depth": 2})


@pytest.fixture
def version(tmp_path):
    return save_artifact(build_model(SPEC), tmp_path, "membrane", spec=SPEC, input_spec=InputSpec(1, (0.5,), (0.2,)))


def _write_graph(version, external: bool) -> None:
    """A graph ``logits = input * w`` (w: [1, 3, 1, 1] of 2.0) as model.onnx, its SHA-256 in the manifest."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "h", "w"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = version / "model.onnx"
    if external:
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    onnx.save_model(model, path)  # with external data: writes w.bin beside it
    _record(version, hashlib.sha256(path.read_bytes()).hexdigest())


def _record(version, sha256: str) -> None:
    data = json.loads((version / MANIFEST_FILE).read_text())
    data["exports"] = {"onnx": {"file": "model.onnx", "sha256": sha256}}
    (version / MANIFEST_FILE).write_text(json.dumps(data))


def test_a_single_file_export_loads_and_runs(version) -> None:
    _write_graph(version, external=False)
    backend, _ = open_version_dir(version, CPU, ORT)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert torch.equal(backend.forward(torch.ones(1, 1, 8, 8)), torch.full((1, 3, 8, 8), 2.0))


def test_an_export_with_external_data_is_refused(version) -> None:
    """The SHA-256 covers model.onnx only: weights kept beside it in w.bin were loaded unchecked (here, changed
    after the export), from a location the graph names."""
    _write_graph(version, external=True)
    (version / "w.bin").write_bytes(np.full(3, 7.0, np.float32).tobytes())
    with pytest.raises(ArtifactError, match=r"external data files \(e.g. \['w'\]\)"):
        open_version_dir(version, CPU, ORT)


def test_an_export_over_the_size_limit_is_refused_before_it_is_hashed(version, monkeypatch) -> None:
    """A 2 GiB + 1 byte model.onnx (sparse here) was hashed in full, then handed to ONNX Runtime."""
    with open(version / "model.onnx", "wb") as f:
        f.truncate(ort_backend.MAX_ONNX_BYTES + 1 if hasattr(ort_backend, "MAX_ONNX_BYTES") else (2 << 30) + 1)
    _record(version, "0" * 64)
    hashed: list[int] = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    with pytest.raises(ArtifactError, match="larger than the limit"):
        open_version_dir(version, CPU, ORT)
    assert hashed == []


def test_onnx_runtime_gets_the_bytes_that_were_hashed(version, monkeypatch) -> None:
    """The file was hashed, then opened again by path: one swapped in between was served unchecked."""
    _write_graph(version, external=False)
    import onnxruntime

    sources: list[object] = []
    real = onnxruntime.InferenceSession

    def session(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        sources.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    open_version_dir(version, CPU, ORT)
    assert sources == [(version / "model.onnx").read_bytes()]


def test_the_loader_reads_a_hostile_manifest_as_unreadable_not_as_a_crash(version) -> None:
    """``1e999`` (valid JSON) as the version: ``OverflowError`` escaped ``VersionLoader.read_manifest``, which
    lets only segsvc's own errors and ``OSError`` through as "cannot be read"."""
    import asyncio

    from segsvc.inference.batcher import BatchingConfig
    from segsvc.inference.loader import VersionLoader
    from segsvc.inference.repository import ModelRepository

    (version.parent / "2").mkdir()
    for f in version.iterdir():
        (version.parent / "2" / f.name).write_bytes(f.read_bytes())
    text = (version.parent / "2" / MANIFEST_FILE).read_text()
    (version.parent / "2" / MANIFEST_FILE).write_text(text.replace('"version": 1', '"version": 1e999'))
    loader = VersionLoader(ModelRepository(version.parent.parent), ORT, BatchingConfig(), CPU)
    assert asyncio.run(loader.read_manifest("membrane", 2)) is None
    assert asyncio.run(loader.read_manifest("membrane", 1)).version == 1  # the others stay readable
