"""U-Net.

Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI 2015. A contracting path of double 3x3
convolutions and 2x2 max pooling, an expanding path of stride-2
``ConvTranspose2d`` upsampling, and skip connections that concatenate each
encoder level with the decoder level of the same size. Unlike the paper we use
same-padding convolutions (output size equals input size, no cropping of the
skips) and BatchNorm; dropout at the bottleneck follows the paper's
"drop-out layers at the end of the contracting path". ``upsample`` swaps the
transpose convolution for another member of the classic upsampling family
(``segsvc.models.upsample``); ``max_unpool`` makes the encoder's pooling
return its indices and hands them to the decoder level of the same size.
"""

from __future__ import annotations

import torch
from torch import nn

from segsvc.errors import ModelConfigError
from segsvc.models.base import SegmentationModel, check_bool, check_dropout, check_positive_int, conv_bn_relu
from segsvc.models.pooling import MaxPool2x2
from segsvc.models.upsample import check_upsample, up_layer


def double_conv(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    return nn.Sequential(*conv_bn_relu(in_ch, out_ch, 3, batch_norm), *conv_bn_relu(out_ch, out_ch, 3, batch_norm))


class UpBlock(nn.Module):
    """2x upsampling to ``out_ch`` channels, concatenation with the skip, double convolution.

    ``upsample="transpose"`` keeps the original layer (``up`` is a ``ConvTranspose2d``,
    state-dict keys ``up.weight``/``up.bias``), so artifacts saved before the option load unchanged.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, batch_norm: bool, upsample: str = "transpose") -> None:
        super().__init__()
        self.up = up_layer(upsample, in_ch, out_ch)
        self.conv = double_conv(out_ch + skip_ch, out_ch, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x, indices)], dim=1))


class UNet(SegmentationModel):
    """U-Net with a configurable depth and width.

    Args:
        num_classes: number of classes K.
        in_channels: image channels C (1 for EM slices, 3 for RGB).
        depth: number of 2x poolings (4 in the paper); the output stride is ``2**depth``.
        base_channels: width of the first level (64 in the paper), doubled at every level.
        batch_norm: BatchNorm after every convolution.
        dropout: dropout probability at the bottleneck (0 disables it).
        upsample: the decoder's 2x upsampling: ``transpose`` (the paper's learned
            up-convolution, default), or ``nearest``, ``bilinear``, ``bed_of_nails``,
            ``max_unpool`` (by the encoder's pooling indices), each with a 3x3
            convolution that reduces the channels as the transpose convolution does.

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
        upsample: str = "transpose",
    ) -> None:
        super().__init__(in_channels, num_classes)
        check_upsample(upsample, model="U-Net")
        # an int check first: True passed the range check as 1, and 2.0 reached torch as a float width
        if not check_positive_int(depth, "depth", "U-Net") <= 6:
            raise ModelConfigError(f"U-Net depth must be between 1 and 6, got {depth}")
        check_bool(batch_norm, "batch_norm", "U-Net")
        check_positive_int(base_channels, "base_channels", "U-Net")
        check_dropout(dropout, "U-Net")
        self.output_stride = 2**depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        ch = in_channels
        for width in widths[:-1]:
            self.down.append(double_conv(ch, width, batch_norm))
            ch = width
        self.upsample = upsample
        self.pool = MaxPool2x2(return_indices=upsample == "max_unpool")
        self.bottleneck = nn.Sequential(
            double_conv(widths[-2], widths[-1], batch_norm),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )
        self.up = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], batch_norm, upsample) for i in reversed(range(depth))
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    head_prefixes = ("classifier",)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips, indices = [], []
        for block in self.down:
            x = block(x)
            skips.append(x)
            pooled = self.pool(x)
            x, level_indices = pooled if self.pool.return_indices else (pooled, None)
            indices.append(level_indices)  # None unless the decoder max-unpools
        x = self.bottleneck(x)
        for block, skip, level_indices in zip(self.up, reversed(skips), reversed(indices)):
            x = block(x, skip, level_indices)
        return self.classifier(x)
