"""The one model contract: ``[N, C, H, W]`` images in, ``[N, K, H, W]`` logits out.

Every network has an ``output_stride``: H and W must be divisible by it. A
wrong size raises an error that says how to pad; ``inference.predictor`` pads
and crops for callers, so users never see that error. Every network also names
its classifier head (``head_prefixes``): the layers whose shapes depend on the
number of classes, which fine-tuning on another class list starts afresh.
"""

from __future__ import annotations

import torch
from torch import nn

from segsvc.errors import InvalidArgument, ModelConfigError


class InputShapeError(InvalidArgument):
    """An input tensor does not fit the model (channels or divisibility)."""


def check_input_shape(x: torch.Tensor, in_channels: int, output_stride: int) -> None:
    """Raise ``InputShapeError`` naming the fix when ``x`` does not fit the model."""
    if x.ndim != 4:
        raise InputShapeError(f"expected a 4-D [N,C,H,W] tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise InputShapeError(f"model expects {in_channels} input channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    if h % output_stride or w % output_stride:
        ph = -(-h // output_stride) * output_stride
        pw = -(-w // output_stride) * output_stride
        raise InputShapeError(
            f"input height {h} and width {w} must be divisible by {output_stride}; pad to "
            f"({ph}, {pw}) or use segsvc.inference.predictor.pad_to_multiple"
        )


def check_bool(value: object, name: str, model: str) -> bool:
    """``value`` when it is a real bool; a YAML/JSON string such as ``"false"`` is truthy and must not pass."""
    if not isinstance(value, bool):
        raise ModelConfigError(f"{model} {name} must be a bool (true or false), got {value!r}")
    return value


def check_positive_int(value: object, name: str, model: str) -> int:
    """``value`` when it is an integer >= 1 (not a bool), else a ``ModelConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{model} {name} must be a positive integer (1 or more), got {value!r}")
    return value


def check_dropout(value: object, model: str) -> float:
    """``value`` when it is a probability in [0, 1) (not a bool), else a ``ModelConfigError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelConfigError(f"{model} dropout must be in [0, 1), got {value!r}")
    return float(value)


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 3, batch_norm: bool = True) -> list[nn.Module]:
    """A same-padding convolution, optional BatchNorm, ReLU (bias only without BatchNorm)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def in_head(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the parameter or buffer ``name`` belongs to a module named by one of ``prefixes``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class SegmentationModel(nn.Module):
    """Base class of the seed networks: stores the contract's numbers and checks inputs."""

    output_stride: int = 1
    min_input_size: int = 1

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Names of the modules that map features to the K class scores (their shapes depend on K)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its classifier head")

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.in_channels, self.output_stride)
        return self.forward_features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
