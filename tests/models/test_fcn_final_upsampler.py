"""FCN's final upsampler: learned by default (what the measured recipes trained), or fixed bilinear interpolation
with ``learn_final_upsampler: false``, as in Long et al. 2015, section 4.2 (it was trained whatever was asked)."""

import pytest
import torch
import torch.nn.functional as F

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models import build_model
from segsvc.models.artifact import load_artifact, save_artifact
from segsvc.models.fcn import bilinear_kernel
from segsvc.models.registry import architecture_spec
from training.config import OptimConfig
from training.schedule import build_optimizer

SMALL_FCN = {"base_channels": 4, "fc_channels": 8}
FINAL_FACTOR = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8}


def _train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A few SGD steps through the repository's own optimiser builder (weight decay on, as in training)."""
    torch.manual_seed(0)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5, weight_decay=0.1), model)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("arch", sorted(FINAL_FACTOR))
def test_the_papers_fixed_final_upsampler_stays_bilinear(arch: str) -> None:
    model = build_model(ModelSpec(arch, 3, 3, {**SMALL_FCN, "learn_final_upsampler": False})).train()
    assert not model.up_final.weight.requires_grad
    _train_steps(model)
    assert torch.equal(model.up_final.weight, bilinear_kernel(3, 2 * FINAL_FACTOR[arch]))
    if arch != "fcn32s":  # the intermediate 2x upsamplers are still learned (paper: initialised, then learned)
        assert model.up2_fr.weight.requires_grad
        assert not torch.equal(model.up2_fr.weight, bilinear_kernel(3, 4))


@pytest.mark.parametrize("arch", sorted(FINAL_FACTOR))
def test_the_final_upsampler_is_learned_by_default(arch: str) -> None:
    model = build_model(ModelSpec(arch, 3, 3, SMALL_FCN)).train()
    assert model.up_final.weight.requires_grad
    _train_steps(model)
    assert not torch.equal(model.up_final.weight, bilinear_kernel(3, 2 * FINAL_FACTOR[arch]))


@pytest.mark.parametrize("value", ["false", 1, None])
def test_learn_final_upsampler_must_be_a_bool(value: object) -> None:
    with pytest.raises(ModelConfigError, match="learn_final_upsampler must be a bool"):
        build_model(ModelSpec("fcn8s", 3, 3, {**SMALL_FCN, "learn_final_upsampler": value}))


def test_the_param_is_recorded_and_old_specs_without_it_load(tmp_path) -> None:
    learned = ModelSpec("fcn8s", 3, 3, {**SMALL_FCN, "learn_final_upsampler": True})  # the old behaviour
    assert architecture_spec(learned).params["learn_final_upsampler"] is True
    # an artifact saved before the param existed: its manifest lacks it; the state-dict keys are the same
    old_spec = ModelSpec("fcn8s", 3, 3, SMALL_FCN)
    model = build_model(learned).eval()
    path = save_artifact(model, tmp_path, "old-fcn", spec=old_spec, input_spec=InputSpec(3, (0.5,) * 3, (0.2,) * 3),
                         class_names=["a", "b", "c"], ignore_index=255, metrics={})
    loaded, manifest = load_artifact(path)
    assert "learn_final_upsampler" not in manifest.spec.params
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), loaded(x))
