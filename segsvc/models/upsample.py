"""The classic upsampling family of encoder-decoders (Stanford cs231n, lecture on segmentation).

Fixed ("unpooling") upsamplers, by factor ``f``:

- ``nearest``: every value copied into its ``f x f`` block;
- ``bilinear``: bilinear interpolation (``align_corners=False``);
- ``bed_of_nails``: every value in the top-left corner of its block, zeros elsewhere;
- ``max_unpool``: every value at the position its block's maximum had in the
  matching max-pooling (``MaxPool2d(return_indices=True)``), zeros elsewhere.

and the learned one, ``transpose``: a stride-2 transpose convolution (bed of
nails followed by a convolution, in one layer). ``up_layer`` gives a decoder
the 2x, channel-reducing layer of any of them: the transpose convolution
itself, or a fixed upsampler plus a 3x3 convolution that reduces the channels
as the transpose convolution does, so the decoder's shapes do not depend on
the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segsvc.errors import ModelConfigError


class NearestUnpool(nn.Module):
    """Nearest-neighbour unpooling: ``[[1,2],[3,4]] -> [[1,1,2,2],[1,1,2,2],[3,3,4,4],[3,3,4,4]]``."""

    needs_indices = False

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="nearest")


class BilinearUpsample(nn.Module):
    """Bilinear interpolation by ``factor`` (pixel centres aligned: ``align_corners=False``)."""

    needs_indices = False

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)


class BedOfNails(nn.Module):
    """Bed-of-nails unpooling: ``[[1,2],[3,4]] -> [[1,0,2,0],[0,0,0,0],[3,0,4,0],[0,0,0,0]]``.

    Written as pad + reshape (no in-place strided writes), so it traces and exports like any other op.
    """

    needs_indices = False

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        f = self.factor
        nails = F.pad(x.reshape(n, c, h, 1, w, 1), (0, f - 1, 0, 0, 0, f - 1))  # [n, c, h, f, w, f]
        return nails.reshape(n, c, h * f, w * f)


class MaxUnpool(nn.Module):
    """Max-unpooling: each value goes back to where its block's maximum was; the rest are zero.

    ``indices`` come from the matching ``MaxPool2d(factor, factor, return_indices=True)``
    and must have the shape of ``x`` (same channels).
    """

    needs_indices = True

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.unpool = nn.MaxUnpool2d(factor, factor)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if indices is None:
            raise ModelConfigError("max_unpool needs the pooling indices of the matching MaxPool2d")
        return self.unpool(x, indices)  # output size factor * input size (kernel = stride)


UNPOOLING: dict[str, type[nn.Module]] = {
    "nearest": NearestUnpool,
    "bilinear": BilinearUpsample,
    "bed_of_nails": BedOfNails,
    "max_unpool": MaxUnpool,
}
UPSAMPLE_MODES: tuple[str, ...] = ("transpose", *UNPOOLING)


def check_upsample(mode: str, valid: tuple[str, ...] = UPSAMPLE_MODES, model: str = "model") -> str:
    """``mode`` when it is one of ``valid``; otherwise a ``ModelConfigError`` that lists them."""
    if mode not in valid:
        raise ModelConfigError(f"unknown {model} upsample {mode!r}; valid: {', '.join(valid)}")
    return mode


def unpooling(mode: str, factor: int = 2) -> nn.Module:
    """The fixed upsampler ``UNPOOLING[mode]`` by ``factor``.

    Example:
        >>> unpooling("bed_of_nails")(torch.tensor([[[[1.0, 2], [3, 4]]]])).shape
        torch.Size([1, 1, 4, 4])
    """
    return UNPOOLING[check_upsample(mode, tuple(UNPOOLING))](factor)


class TransposeUp(nn.ConvTranspose2d):
    """The learned 2x upsampling (kernel 2, stride 2); its state-dict keys are ``weight`` and ``bias``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)


class UnpoolConv(nn.Module):
    """A fixed 2x upsampler and a 3x3 convolution ``in_ch -> out_ch`` (bias, no activation, like ``TransposeUp``).

    Nearest, bilinear and bed of nails upsample first, so the convolution sees (and can fill in)
    the upsampled map. For ``max_unpool`` the convolution comes first: the
    pooling indices belong to the encoder level, which has ``out_ch`` channels
    (a U-Net decoder level arrives with ``2 * out_ch``), so the channels are
    reduced before the values go back to their maxima's positions.
    """

    def __init__(self, mode: str, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.unpool = unpooling(mode, 2)
        self.needs_indices = self.unpool.needs_indices
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.needs_indices:
            return self.unpool(self.conv(x), indices)
        return self.conv(self.unpool(x))


def up_layer(mode: str, in_ch: int, out_ch: int) -> nn.Module:
    """A decoder's 2x upsampling from ``in_ch`` to ``out_ch`` channels; called as ``layer(x, indices)``.

    Example:
        >>> up_layer("nearest", 16, 8)(torch.zeros(1, 16, 5, 7)).shape
        torch.Size([1, 8, 10, 14])
    """
    if check_upsample(mode) == "transpose":
        return TransposeUp(in_ch, out_ch)
    return UnpoolConv(mode, in_ch, out_ch)
