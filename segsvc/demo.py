"""`make demo` (foundation stage): build every reference model and segment a sample image.

The models are untrained, so the label maps are meaningless; the point is that
every architecture builds, accepts an arbitrary image size through the
predictor and returns a label map of the same size, and how long that takes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from segsvc.config import InputSpec
from segsvc.inference.predictor import Predictor
from segsvc.models import build_model
from segsvc.models.artifact import Manifest, default_palette
from segsvc.models.zoo import paper_specs

DATASETS = Path(os.environ.get("SEGSVC_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def sample_image() -> tuple[np.ndarray, str]:
    camvid = sorted((DATASETS / "camvid" / "val").glob("*.png"))
    if camvid:
        bgr = cv2.imread(str(camvid[0]), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), str(camvid[0])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (360, 480, 3), dtype=np.uint8), "random 360x480 image (datasets absent)"


def main() -> None:
    torch.manual_seed(0)
    image, source = sample_image()
    print(f"sample: {source} {image.shape}")
    for label, spec in paper_specs().items():
        model = build_model(spec)
        manifest = Manifest(
            name="demo", version=1, spec=spec, input=InputSpec.default_for(3),
            class_names=tuple(f"class_{i}" for i in range(spec.num_classes)),
            palette=tuple(default_palette(spec.num_classes)),
        )
        predictor = Predictor(model, manifest)
        t0 = time.perf_counter()
        labels = predictor.predict(image)
        dt = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{label:20} {params:7.2f} M params  {image.shape[:2]} -> {labels.shape} labels  {dt:6.2f} s")


if __name__ == "__main__":
    main()
