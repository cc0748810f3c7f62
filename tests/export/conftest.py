"""Tiny model versions to export: each model's BatchNorm is calibrated on noise so its label maps vary.

(A freshly initialised network predicts one class almost everywhere, and "the
labels agree" would then be true for the wrong reason.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.artifact import save_artifact

CLASSES = ("sky", "road", "car")
# Small widths, so each export and its validation take a few seconds on a laptop CPU.
TINY: dict[str, ModelSpec] = {
    "fcn8s": ModelSpec("fcn8s", 3, 3, {"base_channels": 4, "fc_channels": 8, "fc_kernel_size": 3,
                                       "batch_norm": True}),
    "unet": ModelSpec("unet", 3, 3, {"base_channels": 4, "depth": 2}),
    "segnet": ModelSpec("segnet", 3, 3, {"variant": "basic", "base_channels": 4}),  # MaxUnpool2d
    "smp-unet": ModelSpec("smp/Unet", 3, 3, {"encoder_name": "resnet18", "encoder_depth": 3,
                                             "decoder_channels": [16, 8, 4]}),
}


def calibrated(spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    """``spec``'s model with BatchNorm statistics from smooth random images (eval mode)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    size = max(getattr(model, "output_stride", 1), getattr(model, "min_input_size", 1)) * 2
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.randn(4, spec.in_channels, size // 4, size // 4, generator=g),
                                        size=(size, size), mode="bilinear")
    model.train()
    with torch.no_grad():
        model(x + 0.3 * torch.randn(x.shape, generator=g))
    return model.eval()


def publish(root: Path, name: str, spec: ModelSpec, seed: int = 0, version: int | None = None) -> Path:
    """Save a calibrated ``spec`` model as ``root/name/<version>``; returns the version directory."""
    return save_artifact(calibrated(spec, seed), root, name, spec=spec, version=version,
                         class_names=list(CLASSES[: spec.num_classes]), metrics={"miou": 0.5})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "model_repository"
