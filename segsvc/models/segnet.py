"""SegNet.

Badrinarayanan, Kendall, Cipolla, "SegNet: A Deep Convolutional
Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017. The encoder
max-pools with ``return_indices=True``; the decoder upsamples with
``MaxUnpool2d`` using those indices (each value goes back to the position of
its block's maximum, the rest are zero) and densifies the sparse map with
trainable convolutions. Two sizes: SegNet-Basic (four 7x7 conv layers of
constant width, no ReLU in the decoder) and the VGG16 SegNet (13 encoder
convolutions mirrored in the decoder).
"""

from __future__ import annotations

import torch
from torch import nn

from segsvc.errors import ModelConfigError
from segsvc.models.base import SegmentationModel, check_positive_int, conv_bn_relu

VGG16_ENCODER = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))  # (convs, width multiplier) per block


class EncoderBlock(nn.Module):
    def __init__(self, convs: nn.Sequential) -> None:
        super().__init__()
        self.convs = convs
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        x = self.convs(x)
        size = x.shape
        x, indices = self.pool(x)
        return x, indices, size


class DecoderBlock(nn.Module):
    def __init__(self, convs: nn.Sequential) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.convs = convs

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.convs(self.unpool(x, indices, output_size=size))


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, relu: bool) -> list[nn.Module]:
    layers = conv_bn_relu(in_ch, out_ch, kernel_size, batch_norm=True)
    return layers if relu else layers[:-1]


class SegNet(SegmentationModel):
    """SegNet with max-unpooling by the encoder's pooling indices.

    Args:
        num_classes: number of classes K.
        in_channels: image channels C.
        variant: ``"vgg16"`` (13+13 conv layers, widths 64..512 times ``base_channels/64``) or
            ``"basic"`` (SegNet-Basic: 4 encoder and 4 decoder 7x7 layers of ``base_channels``).
        base_channels: width of the first block (64 in the paper).

    Example:
        >>> m = SegNet(num_classes=11, variant="basic", base_channels=16)
        >>> m(torch.zeros(1, 3, 48, 64)).shape
        torch.Size([1, 11, 48, 64])
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        variant: str = "vgg16",
        base_channels: int = 64,
    ) -> None:
        super().__init__(in_channels, num_classes)
        check_positive_int(base_channels, "base_channels", "SegNet")
        if variant == "vgg16":
            enc, dec, out_ch = self._vgg16(in_channels, base_channels)
        elif variant == "basic":
            enc, dec, out_ch = self._basic(in_channels, base_channels)
        else:
            raise ModelConfigError(f"SegNet variant must be 'vgg16' or 'basic', got {variant!r}")
        self.variant = variant
        self.encoder = nn.ModuleList(enc)
        self.decoder = nn.ModuleList(dec)
        self.classifier = nn.Conv2d(out_ch, num_classes, kernel_size=1)
        self.output_stride = 2 ** len(enc)

    head_prefixes = ("classifier",)

    @staticmethod
    def _vgg16(in_ch: int, base: int) -> tuple[list[EncoderBlock], list[DecoderBlock], int]:
        enc: list[EncoderBlock] = []
        widths = []
        ch = in_ch
        for n, mult in VGG16_ENCODER:
            width = base * mult
            layers: list[nn.Module] = []
            for _ in range(n):
                layers += conv_bn_relu(ch, width, 3)
                ch = width
            enc.append(EncoderBlock(nn.Sequential(*layers)))
            widths.append(width)
        dec: list[DecoderBlock] = []
        for i in reversed(range(len(VGG16_ENCODER))):
            n = VGG16_ENCODER[i][0]
            out_w = widths[i - 1] if i > 0 else widths[0]
            layers = []
            for j in range(n):
                layers += conv_bn_relu(ch, widths[i] if j < n - 1 else out_w, 3)
                ch = widths[i] if j < n - 1 else out_w
            dec.append(DecoderBlock(nn.Sequential(*layers)))
        return enc, dec, ch

    @staticmethod
    def _basic(in_ch: int, base: int) -> tuple[list[EncoderBlock], list[DecoderBlock], int]:
        # SegNet-Basic: 7x7 kernels, BatchNorm; ReLU in the encoder only.
        enc = [EncoderBlock(nn.Sequential(*_conv_bn(in_ch if i == 0 else base, base, 7, relu=True))) for i in range(4)]
        dec = [DecoderBlock(nn.Sequential(*_conv_bn(base, base, 7, relu=False))) for _ in range(4)]
        return enc, dec, base

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        stack = []
        for block in self.encoder:
            x, indices, size = block(x)
            stack.append((indices, size))
        for block, (indices, size) in zip(self.decoder, reversed(stack)):
            x = block(x, indices, size)
        return self.classifier(x)
