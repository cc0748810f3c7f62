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
