"""FCN-32s, FCN-16s and FCN-8s.

Long, Shelhamer, Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015. A VGG-style encoder whose fully connected layers
become convolutions (fc6 as a 7x7 conv, fc7 as 1x1), 1x1 score layers, and
learned ``ConvTranspose2d`` upsampling initialised to bilinear interpolation.
FCN-16s fuses a 2x-upsampled prediction with scores from pool4; FCN-8s also
fuses pool3. Score layers on the skips start at zero, as in the paper, so a
freshly built FCN-8s predicts exactly what its coarser core predicts.
``upsample="bilinear"`` or ``"nearest"`` replaces every learned upsampling by
fixed interpolation of the class scores (``segsvc.models.upsample``).
The final upsampling is learned too by default (what the measured recipes trained);
``learn_final_upsampler=False`` keeps it fixed at bilinear interpolation, as the paper does (section 4.2:
"final layer deconvolutional filters are fixed to bilinear interpolation").
"""

from __future__ import annotations

import torch
from torch import nn

from segsvc.errors import ModelConfigError
from segsvc.models.base import SegmentationModel, check_bool, check_dropout, check_positive_int, conv_bn_relu
from segsvc.models.pooling import MaxPool2x2
from segsvc.models.upsample import check_upsample, unpooling

VGG16_BLOCKS = (2, 2, 3, 3, 3)
# the score upsamplings that make sense without a following convolution (the scores are already K-channel)
FCN_UPSAMPLE_MODES = ("transpose", "bilinear", "nearest")


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Weights ``[C, C, k, k]`` that make a per-channel ConvTranspose2d do bilinear upsampling."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt_1d = 1 - (og - center).abs() / factor
    filt = filt_1d[:, None] * filt_1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


def bilinear_upsampler(channels: int, factor: int, learnable: bool = True) -> nn.ConvTranspose2d:
    """ConvTranspose2d(kernel 2f, stride f, padding f/2): output = input * f exactly, bilinear at init."""
    kernel_size = 2 * factor
    up = nn.ConvTranspose2d(
        channels, channels, kernel_size, stride=factor, padding=factor // 2, bias=False
    )
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, kernel_size))
    up.weight.requires_grad_(learnable)
    return up


class VGGEncoder(nn.Module):
    """VGG16-style convolution blocks; returns the pool3, pool4 and pool5 feature maps."""

    def __init__(self, in_channels: int, base_channels: int, batch_norm: bool) -> None:
        super().__init__()
        widths = [base_channels * m for m in (1, 2, 4, 8, 8)]
        blocks: list[nn.Sequential] = []
        ch = in_channels
        for n_convs, width in zip(VGG16_BLOCKS, widths):
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers += conv_bn_relu(ch, width, 3, batch_norm)
                ch = width
            layers.append(MaxPool2x2())
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.widths = widths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats[2:]  # pool3 (/8), pool4 (/16), pool5 (/32)


class _FCN(SegmentationModel):
    """Shared FCN body; ``skips`` is 0 (32s), 1 (16s, pool4) or 2 (8s, pool4 + pool3)."""

    output_stride = 32
    skips = 0

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        base_channels: int = 64,
        fc_channels: int = 4096,
        fc_kernel_size: int = 7,
        dropout: float = 0.5,
        batch_norm: bool = False,
        upsample: str = "transpose",
        learn_final_upsampler: bool = True,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.upsample = check_upsample(upsample, FCN_UPSAMPLE_MODES, model="FCN")
        check_bool(batch_norm, "batch_norm", "FCN")
        check_bool(learn_final_upsampler, "learn_final_upsampler", "FCN")  # no effect on fixed interpolation
        check_positive_int(base_channels, "base_channels", "FCN")
        check_positive_int(fc_channels, "fc_channels", "FCN")
        # fc6 keeps pool5's size only with an odd kernel (padding k // 2); an even one grows it by one cell,
        # which the 32x upsampling turns into 32 extra pixels (or a size mismatch at the skips)
        if check_positive_int(fc_kernel_size, "fc_kernel_size", "FCN") % 2 == 0:
            raise ModelConfigError(f"FCN fc_kernel_size must be an odd positive integer (1, 3, 5, 7, ...), "
                                   f"got {fc_kernel_size}")
        check_dropout(dropout, "FCN")
        self.encoder = VGGEncoder(in_channels, base_channels, batch_norm)
        c3, c4, c5 = self.encoder.widths[2:]
        self.head = nn.Sequential(
            nn.Conv2d(c5, fc_channels, fc_kernel_size, padding=fc_kernel_size // 2),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(fc_channels, fc_channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        if self.skips >= 1:
            self.score_pool4 = self._zero_score(c4, num_classes)
            self.up2_fr = self._upsampler(num_classes, 2)
        if self.skips >= 2:
            self.score_pool3 = self._zero_score(c3, num_classes)
            self.up2_pool4 = self._upsampler(num_classes, 2)
        final_factor = {0: 32, 1: 16, 2: 8}[self.skips]
        # a frozen weight keeps its state-dict key, so artifacts trained either way load into either setting
        self.up_final = self._upsampler(num_classes, final_factor, learnable=learn_final_upsampler)

    def _upsampler(self, num_classes: int, factor: int, learnable: bool = True) -> nn.Module:
        """A bilinear-initialised transpose convolution (learned unless ``learnable`` is False), or interpolation."""
        if self.upsample == "transpose":
            return bilinear_upsampler(num_classes, factor, learnable)
        return unpooling(self.upsample, factor)

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """Every score layer and every class-wise upsampler: all of them are K-channel."""
        skip_layers = (("score_pool4", "up2_fr"), ("score_pool3", "up2_pool4"))[: self.skips]
        return ("score_fr", *[name for pair in skip_layers for name in pair], "up_final")

    @staticmethod
    def _zero_score(in_ch: int, num_classes: int) -> nn.Conv2d:
        conv = nn.Conv2d(in_ch, num_classes, 1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, pool5 = self.encoder(x)
        score = self.score_fr(self.head(pool5))
        if self.skips >= 1:
            score = self.up2_fr(score) + self.score_pool4(pool4)
        if self.skips >= 2:
            score = self.up2_pool4(score) + self.score_pool3(pool3)
        return self.up_final(score)


class FCN32s(_FCN):
    """FCN-32s: pool5 scores upsampled 32x in one step.

    Args:
        num_classes: number of classes K.
        in_channels: image channels C.
        base_channels: width of the first VGG block (64 in the paper); later blocks use 2x, 4x, 8x, 8x.
        fc_channels: width of fc6/fc7 as convolutions (4096 in the paper).
        fc_kernel_size: fc6 kernel, odd so pool5 keeps its size (7 in the paper).
        dropout: dropout after fc6 and fc7.
        batch_norm: add BatchNorm to the encoder (not in the paper; helps training from scratch).
        upsample: ``transpose`` (transpose convolutions initialised to bilinear: the paper, default),
            ``bilinear`` or ``nearest`` (fixed interpolation of the scores, no weights).
        learn_final_upsampler: with ``transpose``, learn the final upsampling too (default: what the measured
            recipes trained); False keeps it fixed at bilinear, as the paper does. The intermediate 2x
            upsamplings are always learned.

    Example:
        >>> m = FCN32s(num_classes=5, base_channels=8, fc_channels=32)
        >>> m(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 5, 64, 64])
    """

    skips = 0


class FCN16s(_FCN):
    """FCN-16s: FCN-32s plus a pool4 skip; 2x learned upsampling then 16x. Args as ``FCN32s``."""

    skips = 1


class FCN8s(_FCN):
    """FCN-8s: FCN-16s plus a pool3 skip; final 8x upsampling. Args as ``FCN32s``."""

    skips = 2
