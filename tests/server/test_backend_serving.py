"""A server on the onnxruntime backend (``--backend``) answers ``Segment`` with eager PyTorch's label maps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from segsvc.export.onnx import export_onnx
from segsvc.inference.argmax import class_argmax
from segsvc.inference.engine import EngineConfig
from tests.server.conftest import assert_labels_match, make_image, publish, reference


def test_onnxruntime_serving_matches_eager_and_a_model_can_opt_out(start_server, tmp_path):
    repo = tmp_path / "repo"
    onnx_version = publish(repo, "m", seed=5)
    export_onnx(onnx_version, checks=1)
    eager_only = publish(repo, "e", seed=6)  # no export: served by torch through the per-model choice
    engine = EngineConfig(device="cpu", warmup=False, backend="onnxruntime", model_backends=(("e", "torch"),))
    server = start_server(repo, engine=engine)
    images = [make_image(45, 61, seed=s) for s in range(3)]
    with server.client(timeout_s=60) as c:
        for model, version_dir in (("m", onnx_version), ("e", eager_only)):
            ref = reference(version_dir)
            for image, result in zip(images, c.segment_many(images, model=model, progress=False)):
                assert_labels_match(result.mask, ref, image)
        tiled = c.segment(images[0], model="m", tile_size=32, flip_tta=True)  # tiling + TTA on ONNX Runtime
        assert np.array_equal(tiled.mask, ref_tiled(onnx_version, images[0]))
    assert server.server.manager.resolve("m", None).engine.backend.name == "onnxruntime"
    assert server.server.manager.resolve("e", None).engine.backend.name == "torch"


def ref_tiled(version_dir, image) -> np.ndarray:
    """Eager PyTorch's label map with 32-pixel tiles and flip TTA."""
    ref = reference(version_dir)
    spec = replace(ref.inference, tile_size=32, flip_tta=True)
    return class_argmax(ref.image_logits(image, spec))[0].numpy().astype(np.uint8)
