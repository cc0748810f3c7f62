"""Each smp architecture keeps smp's own default encoder when the spec names none (DPT's is a timm ViT)."""

from typing import Any

import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models import smp as smp_module
from segsvc.models.registry import architecture_spec


class _Built(Exception):
    """Stops the build once the smp class has been called: the keywords are what the test checks."""


def _spy_kwargs(monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> dict[str, Any]:
    captured: dict[str, Any] = {}

    def fake_smp_class(**kwargs: Any) -> torch.nn.Module:
        captured.update(kwargs)
        raise _Built

    monkeypatch.setattr(smp_module, "smp_class", lambda architecture: fake_smp_class)
    with pytest.raises(_Built):
        build_model(spec)
    return captured


@pytest.mark.parametrize("arch", ["smp/DPT", "smp/Unet", "smp/Segformer"])
def test_no_encoder_name_leaves_smps_default(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    kwargs = _spy_kwargs(monkeypatch, ModelSpec(arch, 3))
    assert "encoder_name" not in kwargs and kwargs["encoder_weights"] is None


def test_a_named_encoder_is_passed_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec("smp/DPT", 3, params={"encoder_name": "tu-vit_tiny_patch16_224"})
    assert _spy_kwargs(monkeypatch, spec)["encoder_name"] == "tu-vit_tiny_patch16_224"
    assert architecture_spec(spec) == spec


def test_smp_dpt_builds_with_default_params() -> None:
    """Before, segsvc forced resnet34 on every smp class and DPT (a ViT decoder) refused it."""
    model = build_model(ModelSpec("smp/DPT", 3))
    assert model.output_stride == 32
