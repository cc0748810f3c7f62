"""The operations the classic papers rest on: max-unpooling, transpose convolution, bilinear init."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsvc.config import ModelSpec
from segsvc.models import build_model
from segsvc.models.fcn import bilinear_upsampler
from segsvc.models.segnet import SegNet


def test_max_unpooling_restores_values_at_argmax_positions() -> None:
    x = torch.tensor([[1, 2, 6, 3], [3, 5, 2, 1], [1, 2, 2, 1], [7, 3, 4, 8]], dtype=torch.float32)[None, None]
    pooled, indices = nn.MaxPool2d(2, 2, return_indices=True)(x)
    assert pooled[0, 0].tolist() == [[5, 6], [7, 8]]
    unpooled = nn.MaxUnpool2d(2, 2)(torch.tensor([[1.0, 2], [3, 4]])[None, None], indices)
    assert unpooled[0, 0].tolist() == [[0, 0, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0], [3, 0, 0, 4]]


def test_segnet_decoder_unpools_with_the_encoders_indices() -> None:
    model = SegNet(num_classes=3, variant="basic", base_channels=4).eval()
    captured: dict[str, torch.Tensor] = {}
    model.encoder[0].pool.register_forward_hook(lambda m, i, o: captured.__setitem__("indices", o[1]))
    model.decoder[-1].unpool.register_forward_hook(lambda m, i, o: captured.__setitem__("unpooled", o))
    model(torch.randn(1, 3, 32, 32))
    unpooled = captured["unpooled"]
    # exactly one non-zero per 2x2 block, at the position the first encoder pooling chose
    flat = unpooled.flatten(2)
    nonzero = flat != 0
    chosen = torch.zeros_like(nonzero)
    chosen.scatter_(2, captured["indices"].flatten(2), True)
    assert not (nonzero & ~chosen).any()
    assert nonzero.float().mean() <= 0.25 + 1e-6


@pytest.mark.parametrize(
    "size,kernel,stride,pad,out_pad", [(7, 4, 2, 1, 0), (5, 3, 2, 1, 1), (3, 64, 32, 16, 0), (10, 2, 2, 0, 0), (4, 5, 3, 0, 2)]
)
def test_transpose_convolution_output_size(size: int, kernel: int, stride: int, pad: int, out_pad: int) -> None:
    conv = nn.ConvTranspose2d(1, 1, kernel, stride=stride, padding=pad, output_padding=out_pad)
    out = conv(torch.zeros(1, 1, size, size))
    expected = (size - 1) * stride - 2 * pad + kernel + out_pad
    assert out.shape[-1] == out.shape[-2] == expected


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_fcn_bilinear_initialisation_reproduces_bilinear_upsampling(factor: int) -> None:
    up = bilinear_upsampler(3, factor)
    x = torch.randn(1, 3, 6, 5)
    ours = up(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert ours.shape == ref.shape
    # identical away from the border, where interpolate clamps and the transpose conv sees zeros
    m = factor
    assert torch.allclose(ours[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-5)


def test_fcn8s_skips_start_at_zero_so_it_matches_its_coarse_prediction() -> None:
    spec = {"base_channels": 4, "fc_channels": 8, "dropout": 0.0}
    fcn8 = build_model(ModelSpec("fcn8s", 3, params=spec)).eval()
    x = torch.randn(1, 3, 64, 64)
    pool3, pool4, pool5 = fcn8.encoder(x)
    coarse = fcn8.score_fr(fcn8.head(pool5))
    expected = fcn8.up_final(fcn8.up2_pool4(fcn8.up2_fr(coarse)))
    assert torch.allclose(fcn8(x), expected, atol=1e-6)


def test_fcn_upsamplers_are_transpose_convolutions() -> None:
    for arch in ("fcn32s", "fcn16s", "fcn8s"):
        model = build_model(ModelSpec(arch, 3, params={"base_channels": 4, "fc_channels": 8}))
        ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
        assert len(ups) == {"fcn32s": 1, "fcn16s": 2, "fcn8s": 3}[arch]


def test_unet_upsamples_with_stride2_transpose_convolutions_and_concatenates() -> None:
    model = build_model(ModelSpec("unet", 2, params={"base_channels": 4, "depth": 3}))
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 3 and all(u.stride == (2, 2) for u in ups)
    # the conv after each upsampling sees skip + upsampled channels
    first = model.up[0].conv[0]
    assert first.in_channels == 2 * ups[0].out_channels
