"""Reference configurations of each architecture at its paper's size (used by the demo and bench)."""

from __future__ import annotations

from segsvc.config import ModelSpec

CAMVID_CLASSES = 11


def paper_specs(num_classes: int = CAMVID_CLASSES, in_channels: int = 3) -> dict[str, ModelSpec]:
    """The seed models at the widths their papers use, plus smp's Unet/resnet34."""
    return {
        "FCN-32s": ModelSpec("fcn32s", num_classes, in_channels),
        "FCN-16s": ModelSpec("fcn16s", num_classes, in_channels),
        "FCN-8s": ModelSpec("fcn8s", num_classes, in_channels),
        "U-Net": ModelSpec("unet", num_classes, in_channels, {"depth": 4, "base_channels": 64, "dropout": 0.5}),
        "SegNet (VGG16)": ModelSpec("segnet", num_classes, in_channels, {"variant": "vgg16"}),
        "SegNet-Basic": ModelSpec("segnet", num_classes, in_channels, {"variant": "basic"}),
        "smp Unet/resnet34": ModelSpec("smp/Unet", num_classes, in_channels, {"encoder_name": "resnet34"}),
    }
