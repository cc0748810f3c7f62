"""A re-export under a reader that read the manifest before it, and the validation's coverage at few checks."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from segsvc.export.compare import check_sizes, sample_size, validate
from segsvc.export.onnx import export_onnx, published_onnx
from segsvc.inference.backends import OnnxRuntimeBackend
from segsvc.inference.backends.ort import read_onnx_export
from segsvc.models.artifact import read_manifest, write_manifest
from tests.export.conftest import TINY, publish


def _square_only_graph(conv: torch.nn.Conv2d) -> bytes:
    """``conv`` as ONNX, but its output reshaped to ``[N, K, H, H]``: right on square inputs, wrong on any other.

    What an export that took one spatial size for the other would do (the graph runs; only a non-square
    input shows it).
    """
    k = conv.out_channels
    weight = numpy_helper.from_array(conv.weight.detach().numpy(), "w")
    bias = numpy_helper.from_array(conv.bias.detach().numpy(), "b")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("i0", [0]), ("i2", [2]), ("k", [k]))]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["y"]),
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["shape", "i2"], ["h"], axis=0),
        helper.make_node("Concat", ["n", "k", "h", "h"], ["target"], axis=0),
        helper.make_node("Reshape", ["y", "target"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "square_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", conv.in_channels, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k, "height", "height"])],
        [weight, bias, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_one_check_covers_a_non_square_input_of_another_batch_than_the_sample() -> None:
    for stride, min_size in ((32, 1), (16, 128), (8, 20)):
        [(n, h, w)] = check_sizes(stride, min_size, 1)
        sample_n, sample_h, sample_w = sample_size(stride, min_size)
        assert h != w and n != sample_n and (h, w) != (sample_h, sample_w)
        assert any(a == b for _, a, b in check_sizes(stride, min_size, 2))  # a square one from two checks on


def test_an_export_wrong_on_non_square_inputs_fails_even_one_check() -> None:
    """With --checks 1 the only input was square: a graph that is right on square inputs only passed."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 1).eval()
    data = _square_only_graph(conv)
    square = validate(conv, data, 3, stride=16, min_size=1, checks=1, seed=0)
    assert not square.passed, f"the square-only graph passed the check on {square.sizes}"
    assert "at input size 1x3x" in square.error
    # the same check passes a graph that is right at every size: it is the coverage that refuses, not noise
    right = torch.onnx.export(conv, (torch.randn(2, 3, 48, 32),), None, dynamo=True, opset_version=18,
                              input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: "batch", 2: "height", 3: "width"},)).model_proto
    assert validate(conv, right.SerializeToString(), 3, stride=16, min_size=1, checks=1, seed=0).passed


def _onnx_files(version_dir: Path) -> list[str]:
    return sorted(p.name for p in version_dir.glob("*.onnx"))


def test_a_loader_that_read_the_manifest_before_a_re_export_still_loads_what_it_read(repo: Path) -> None:
    """A server reads the manifest (the old file's name and SHA-256), a re-export publishes, then the server opens
    the file: the re-export had removed it right after switching the manifest, so that load failed."""
    version_dir = publish(repo, "m", TINY["unet"])
    first = export_onnx(version_dir, checks=1)
    read_before = read_manifest(version_dir)  # what a loader holds between reading the manifest and the file
    second = export_onnx(version_dir, checks=1, opset=17)
    assert second.sha256 != first.sha256 and second.path != first.path

    name, data = read_onnx_export(version_dir, read_before)
    assert name == first.path.name and hashlib.sha256(data).hexdigest() == first.sha256
    backend = OnnxRuntimeBackend.for_manifest(version_dir, read_before, torch.device("cpu"))
    assert backend.forward(torch.zeros(1, 3, 32, 48)).shape == (1, 3, 32, 48)
    # the manifest names the new file and records the one it superseded, which is all that is kept
    entry = read_manifest(version_dir).exports["onnx"]
    assert entry["file"] == second.path.name and entry["previous"] == {"file": first.path.name,
                                                                       "sha256": first.sha256}
    assert published_onnx(version_dir) == second.path
    assert _onnx_files(version_dir) == sorted([first.path.name, second.path.name])


def test_each_re_export_removes_the_file_two_exports_back_and_never_one_still_named(repo: Path) -> None:
    version_dir = publish(repo, "m", TINY["unet"])
    first = export_onnx(version_dir, checks=1)
    second = export_onnx(version_dir, checks=1, opset=17)
    read_second = read_manifest(version_dir)
    third = export_onnx(version_dir, checks=1, opset=16)
    assert len({first.path, second.path, third.path}) == 3
    assert _onnx_files(version_dir) == sorted([second.path.name, third.path.name])  # the first is named by none
    assert read_onnx_export(version_dir, read_second)[0] == second.path.name
    assert read_manifest(version_dir).exports["onnx"]["previous"]["file"] == second.path.name
    # the same bytes again supersede nothing: the previous file stays recorded and on disk
    again = export_onnx(version_dir, checks=1, opset=16)
    assert again.path == third.path
    assert read_manifest(version_dir).exports["onnx"]["previous"]["file"] == second.path.name
    assert _onnx_files(version_dir) == sorted([second.path.name, third.path.name])
    # back to the second's bytes: written under the name the previous record already gives them, and kept
    back = export_onnx(version_dir, checks=1, opset=17)
    assert back.path == second.path and back.sha256 == second.sha256
    entry = read_manifest(version_dir).exports["onnx"]
    assert entry["file"] == second.path.name and entry["previous"]["file"] == third.path.name
    assert _onnx_files(version_dir) == sorted([second.path.name, third.path.name])
    assert published_onnx(version_dir) == second.path


def test_a_previous_record_outside_the_version_folder_is_never_removed(repo: Path, tmp_path: Path) -> None:
    """The name to remove comes from the manifest: only a plain .onnx name in the version folder is removed."""
    version_dir = publish(repo, "m", TINY["unet"])
    export_onnx(version_dir, checks=1)
    outside = tmp_path / "keep.onnx"
    outside.write_bytes(b"not segsvc's")
    manifest = read_manifest(version_dir)
    entry = {**manifest.exports["onnx"], "previous": {"file": f"../../../{outside.name}", "sha256": "0" * 64}}
    write_manifest(version_dir, replace(manifest, exports={"onnx": entry}))
    export_onnx(version_dir, checks=1, opset=17)
    assert outside.read_bytes() == b"not segsvc's"
