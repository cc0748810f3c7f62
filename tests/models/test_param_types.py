"""Params of the wrong type are refused by name, not coerced: ``True`` is not a depth, ``"false"`` is truthy."""

import pytest

from segsvc.config import ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models import build_model

SMALL_FCN = {"base_channels": 2, "fc_channels": 4}


@pytest.mark.parametrize("arch, params, message", [
    ("unet", {"depth": True, "base_channels": 2}, r"U-Net depth must be a positive integer.*got True"),
    ("unet", {"depth": 2.0, "base_channels": 2}, r"U-Net depth must be a positive integer.*got 2.0"),
    ("unet", {"depth": 7, "base_channels": 2}, r"U-Net depth must be between 1 and 6, got 7"),
    ("unet", {"batch_norm": "false", "base_channels": 2}, r"U-Net batch_norm must be a bool.*got 'false'"),
    ("fcn8s", {**SMALL_FCN, "batch_norm": "false"}, r"FCN batch_norm must be a bool.*got 'false'"),
    ("fcn32s", {**SMALL_FCN, "batch_norm": 0}, r"FCN batch_norm must be a bool.*got 0"),
])
def test_mistyped_params_are_refused_by_name(arch: str, params: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        build_model(ModelSpec(arch, 2, 3, params))
