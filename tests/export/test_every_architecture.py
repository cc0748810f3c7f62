"""Every registered architecture, exported at a small size: which ones work, and that ``UNEXPORTABLE`` is true.

``export_onnx`` refuses the architectures in ``segsvc.export.onnx.UNEXPORTABLE``
up front with the reason; here the exporter and the validation run on them
anyway, so the table must name exactly the ones that fail (a newer torch that
exports them makes this test fail, and the entry is then removed).
"""

from __future__ import annotations

from typing import Any

import pytest

from segsvc.config import ModelSpec
from segsvc.errors import ExportError
from segsvc.export.compare import validate
from segsvc.export.onnx import UNEXPORTABLE, to_onnx
from segsvc.models import available_models
from tests.export.conftest import TINY, calibrated

pytestmark = pytest.mark.slow

SEED_PARAMS: dict[str, dict[str, Any]] = {
    "fcn32s": dict(TINY["fcn8s"].params), "fcn16s": dict(TINY["fcn8s"].params), "fcn8s": dict(TINY["fcn8s"].params),
    "unet": dict(TINY["unet"].params), "segnet": dict(TINY["segnet"].params),
}
SMP_PARAMS: dict[str, dict[str, Any]] = {"smp/DPT": {"encoder_name": "tu-vit_tiny_patch16_224"}}
VARIANTS = {  # options that change the graph's operators
    "segnet-vgg16": ModelSpec("segnet", 3, 3, {"variant": "vgg16", "base_channels": 4}),
    "fcn8s-bilinear": ModelSpec("fcn8s", 3, 3, {**SEED_PARAMS["fcn8s"], "upsample": "bilinear"}),
}


def _spec(arch: str) -> ModelSpec:
    params = SEED_PARAMS.get(arch) or SMP_PARAMS.get(arch) or {"encoder_name": "resnet18"}
    return ModelSpec(arch, 3, 3, params)


def _try_export(spec: ModelSpec) -> str:
    """Empty when the export validates; else why not."""
    model = calibrated(spec)
    stride, min_size = model.output_stride, getattr(model, "min_input_size", 1)
    try:
        proto = to_onnx(model, spec.in_channels, stride, min_size)
    except ExportError as exc:
        return str(exc)
    result = validate(model, proto.SerializeToString(), spec.in_channels, stride, min_size)
    return "" if result.passed else result.describe()


CASES = [pytest.param(_spec(arch), id=arch) for arch in available_models()]
CASES += [pytest.param(spec, id=name) for name, spec in VARIANTS.items()]


@pytest.mark.parametrize("spec", CASES)
def test_architecture_exports_unless_listed_as_unexportable(spec: ModelSpec) -> None:
    failure = _try_export(spec)
    if spec.arch in UNEXPORTABLE:
        assert failure, f"{spec.arch} now exports and validates: remove it from UNEXPORTABLE"
    else:
        assert not failure, f"{spec.arch} does not export: {failure}"


def test_the_table_names_registered_architectures() -> None:
    assert set(UNEXPORTABLE) <= set(available_models())
