"""Parameters that would break ``[N, C, H, W] -> [N, K, H, W]`` are refused when the model is built."""

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models import build_model

SMALL_FCN = {"base_channels": 4, "fc_channels": 8}
RESNET = {"encoder_name": "resnet18"}


@pytest.mark.parametrize("arch, params, message", [
    # an even fc6 kernel grew pool5 by one cell: fcn32s gave logits 32 pixels larger, fcn8s a raw RuntimeError
    ("fcn32s", {**SMALL_FCN, "fc_kernel_size": 2}, r"fc_kernel_size must be an odd positive integer.*got 2"),
    ("fcn8s", {**SMALL_FCN, "fc_kernel_size": 4}, r"fc_kernel_size must be an odd positive integer.*got 4"),
    ("fcn16s", {**SMALL_FCN, "fc_kernel_size": 0}, r"fc_kernel_size must be a positive integer"),
    # zero widths built, then failed at the first forward with a raw RuntimeError
    ("fcn8s", {"base_channels": 0, "fc_channels": 8}, r"base_channels must be a positive integer .*got 0"),
    ("fcn32s", {"base_channels": 4, "fc_channels": 0}, r"fc_channels must be a positive integer .*got 0"),
    ("fcn8s", {**SMALL_FCN, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ("segnet", {"variant": "basic", "base_channels": 0}, r"SegNet base_channels must be a positive integer .*got 0"),
    ("segnet", {"variant": "vgg16", "base_channels": "8"}, r"SegNet base_channels must be a positive integer"),
    ("segnet", {"variant": "basic", "base_channels": True}, r"SegNet base_channels must be a positive integer"),
    # smp keeps FPN's final 4x upsampling whatever the depth: logits 4x (depth 3) or 2x (depth 4) the input
    ("smp/FPN", {**RESNET, "encoder_depth": 3}, r"FPN with encoder_depth=3 and upsampling=4.*valid: "
                                                r"encoder_depth=3 with upsampling=1"),
    ("smp/FPN", {**RESNET, "encoder_depth": 4}, r"encoder_depth=4 with upsampling=2"),
    ("smp/PSPNet", {**RESNET, "encoder_depth": 5}, r"PSPNet with encoder_depth=5 and upsampling=8"),
    ("smp/UnetPlusPlus", {**RESNET, "encoder_depth": 1, "decoder_channels": [8]},
     r"encoder_depth between 2 and 5, got 1"),
])
def test_params_that_break_the_contract_are_refused(arch: str, params: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        build_model(ModelSpec(arch, 3, 3, params))


@pytest.mark.parametrize("arch, params", [
    ("fcn32s", {**SMALL_FCN, "fc_kernel_size": 1}),
    ("fcn8s", {**SMALL_FCN, "fc_kernel_size": 3}),
    ("segnet", {"variant": "basic", "base_channels": 1}),
    ("smp/FPN", {**RESNET, "encoder_depth": 3, "upsampling": 1}),
    ("smp/FPN", {**RESNET, "encoder_depth": 4, "upsampling": 2}),
    ("smp/FPN", RESNET),
    ("smp/PSPNet", {**RESNET, "encoder_depth": 5, "upsampling": 32}),
    ("smp/PSPNet", RESNET),
    ("smp/UnetPlusPlus", {**RESNET, "encoder_depth": 2, "decoder_channels": [8, 8]}),
])
def test_the_valid_neighbours_keep_the_input_size(arch: str, params: dict) -> None:
    model = build_model(ModelSpec(arch, 3, 3, params)).eval()
    s = max(model.output_stride, model.min_input_size)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 2 * s, 3 * s))
    assert tuple(out.shape) == (1, 3, 2 * s, 3 * s)
