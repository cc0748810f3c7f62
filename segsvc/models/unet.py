"""U-Net.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI 2015. A contracting path of double 3x3
convolutions and 2x2 max pooling, an expanding path of stride-2
``ConvTranspose2d`` upsampling, and skip connections that concatenate each
encoder level with the decoder level of the same size. Unlike the paper we use
same-padding convolutions (output size equals input size, no cropping of the
skips) and BatchNorm; dropout at the bottleneck follows the paper's
"drop-out layers at the end of the contracting path".
"""

from __future__ import annotations

import torch
from torch import nn

from segsvc.errors import ModelConfigError
from segsvc.models.base import SegmentationModel, conv_bn_relu


def double_conv(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(in_ch, out_ch, 3, batch_norm), *conv_bn_relu(out_ch, out_ch, 3, batch_norm))


class UpBlock(nn.Module):
    """Transpose-convolution 2x upsampling, concatenation with the skip, double convolution."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, batch_norm: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = double_conv(out_ch + skip_ch, out_ch, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(SegmentationModel):
    """U-Net with a configurable depth and width.

    Args:
        num_classes: number of classes K.
        in_channels: image channels C (1 for EM slices, 3 for RGB).
        depth: number of 2x poolings (4 in the paper); the output stride is ``2**depth``.
        base_channels: width of the first level (64 in the paper), doubled at every level.
        batch_norm: BatchNorm after every convolution.
        dropout: dropout probability at the bottleneck (0 disables it).

    Example:
        >>> m = UNet(num_classes=2, in_channels=1, depth=3, base_channels=8)
        >>> m(torch.zeros(1, 1, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 4,
        base_channels: int = 64,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if not 1 <= depth <= 6:
            raise ModelConfigError(f"U-Net depth must be between 1 and 6, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ModelConfigError(f"U-Net dropout must be in [0, 1), got {dropout}")
        self.output_stride = 2**depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        ch = in_channels
        for width in widths[:-1]:
            self.down.append(double_conv(ch, width, batch_norm))
            ch = width
        self.pool = nn.MaxPool2d(2, 2)
        self.bottleneck = nn.Sequential(
            double_conv(widths[-2], widths[-1], batch_norm),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )
        self.up = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], batch_norm) for i in reversed(range(depth))
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    head_prefixes = ("classifier",)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        return self.classifier(x)
