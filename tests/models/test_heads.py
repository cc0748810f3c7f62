"""Every registered architecture names its classifier head exactly (fine-tuning re-initialises it)."""

from __future__ import annotations

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.models import available_models, build_model
from segsvc.models.base import in_head

SMALL = {
    "fcn32s": {"base_channels": 4, "fc_channels": 16},
    "fcn16s": {"base_channels": 4, "fc_channels": 16},
    "fcn8s": {"base_channels": 4, "fc_channels": 16},
    "unet": {"base_channels": 4, "depth": 2},
    "segnet": {"variant": "basic", "base_channels": 8},
    "smp/DPT": {"encoder_name": "tu-vit_tiny_patch16_224"},
}
SMP_DEFAULT = {"encoder_name": "resnet18"}


def shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    model = build_model(ModelSpec(arch, num_classes, 3, SMALL.get(arch, SMP_DEFAULT)))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("arch", available_models())
def test_head_prefixes_name_exactly_the_class_dependent_tensors(arch: str) -> None:
    model = build_model(ModelSpec(arch, 7, 3, SMALL.get(arch, SMP_DEFAULT)))
    state = model.state_dict()
    head = {name for name in state if in_head(name, model.head_prefixes)}
    leading_k = {name for name, t in state.items() if t.ndim and t.shape[0] == 7}
    other = shapes(arch, 3)
    depends_on_k = {name for name, shape in shapes(arch, 7).items() if other[name] != shape}
    assert head and head == leading_k == depends_on_k, sorted(head ^ leading_k | head ^ depends_on_k)
    for prefix in model.head_prefixes:  # every prefix names a real module
        assert isinstance(model.get_submodule(prefix), torch.nn.Module)


def test_in_head_matches_whole_module_names_only() -> None:
    assert in_head("classifier.weight", ("classifier",))
    assert in_head("net.segmentation_head.0.bias", ("net.segmentation_head.0",))
    assert not in_head("classifier2.weight", ("classifier",))
    assert not in_head("net.segmentation_head.00.bias", ("net.segmentation_head.0",))
