"""One registry of architectures; ``build_model(spec)`` is the only way models are made.

A plain dict: go-to-definition works, and an unknown name raises an error that
lists the valid ones.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from segsvc.config import ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models.fcn import FCN8s, FCN16s, FCN32s
from segsvc.models.segnet import SegNet
from segsvc.models.smp import ARCHITECTURES as SMP_ARCHITECTURES
from segsvc.models.smp import SmpModel, smp_class
from segsvc.models.unet import UNet

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "fcn32s": FCN32s,
    "fcn16s": FCN16s,
    "fcn8s": FCN8s,
    "unet": UNet,
    "segnet": SegNet,
    **{f"smp/{name}": partial(SmpModel, name) for name in SMP_ARCHITECTURES},
}


# Parameters named ``*_path`` only initialise weights from a file (smp's ``encoder_weights_path``), which the
# artifact's own weights then replace: they are not part of the architecture, so an artifact never records them
# and rebuilding one never opens them (the file is on the training machine, not the server). The training-request
# check (``segsvc/jobs/trainspec.py``) treats the same suffix as "a file the trainer reads".
INIT_PARAM_SUFFIX = "_path"


def available_models() -> list[str]:
    return sorted(MODELS)


def is_init_param(name: str) -> bool:
    """Whether the model parameter ``name`` only initialises weights from a file (``*_path``)."""
    return name.endswith(INIT_PARAM_SUFFIX)


def architecture_spec(spec: ModelSpec) -> ModelSpec:
    """``spec`` without the parameters that only initialise weights: what an artifact records and rebuilds.

    Example:
        >>> architecture_spec(ModelSpec("smp/Unet", 2, params={"encoder_weights_path": "/data/enc.safetensors"}))
        ModelSpec(arch='smp/Unet', num_classes=2, in_channels=3, params={})
    """
    if not any(is_init_param(k) for k in spec.params):
        return spec
    return replace(spec, params={k: v for k, v in spec.params.items() if not is_init_param(k)})


def _check_params(arch: str, factory: ModelFactory, params: dict[str, Any]) -> None:
    """Reject unknown parameter names up front, naming the accepted ones."""
    target = factory.func if isinstance(factory, partial) else factory
    sig = inspect.signature(target)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return  # smp passes extra keywords through; smp itself reports bad ones
    accepted = set(sig.parameters) - {"self", "num_classes", "in_channels"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ModelConfigError(
            f"model {arch!r} got unknown parameters {unknown}; accepted: {sorted(accepted)}"
        )


def build_model(spec: ModelSpec) -> nn.Module:
    """Build an untrained model (weights from their initialisers) from its spec.

    Example:
        >>> build_model(ModelSpec("segnet", num_classes=11, params={"variant": "basic"})).output_stride
        16
    """
    try:
        factory = MODELS[spec.arch]
    except KeyError:
        raise ModelConfigError(
            f"unknown model architecture {spec.arch!r}; valid names: {', '.join(available_models())}"
        ) from None
    params = dict(spec.params)
    _check_params(spec.arch, factory, params)
    try:
        return factory(num_classes=spec.num_classes, in_channels=spec.in_channels, **params)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a negative width reaching torch's initialisers
        raise ModelConfigError(f"cannot build {spec.arch!r} with params {params}: {exc}") from None


def plan_model(spec: ModelSpec) -> nn.Module:
    """``spec``'s model on the meta device: every parameter's shape and dtype, with no memory allocated and no
    initialiser run, so what a manifest asks for can be measured before it is built.

    smp (with timm) is imported first, off the meta device: tensors its modules make at import must be real.

    Raises:
        ModelConfigError: as ``build_model``.
    """
    if spec.arch.startswith("smp/") and spec.arch in MODELS:
        smp_class(spec.arch.removeprefix("smp/"))
    with torch.device("meta"):
        return build_model(spec)
