"""The classic upsampling family (cs231n's segmentation lecture) and the decoders that use it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsvc.config import InputSpec, ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models import build_model
from segsvc.models.artifact import MANIFEST_FILE, load_artifact, save_artifact
from segsvc.models.upsample import UNPOOLING, UPSAMPLE_MODES, BedOfNails, MaxUnpool, NearestUnpool, unpooling, up_layer

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
# the lecture's max-pooling input: block maxima at (1,1), (0,2), (3,0) and (3,3)
POOL_INPUT = torch.tensor([[1, 2, 6, 3], [3, 5, 2, 1], [1, 2, 2, 1], [7, 3, 4, 8]], dtype=torch.float32)[None, None]
UNET_SMALL = {"base_channels": 4, "depth": 3}


def test_nearest_neighbour_unpooling_is_the_lectures_example() -> None:
    assert NearestUnpool()(X)[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_bed_of_nails_is_the_lectures_example() -> None:
    assert BedOfNails()(X)[0, 0].tolist() == [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]


def test_max_unpooling_is_the_lectures_example() -> None:
    pooled, indices = nn.MaxPool2d(2, 2, return_indices=True)(POOL_INPUT)
    assert pooled[0, 0].tolist() == [[5, 6], [7, 8]]
    assert MaxUnpool()(X, indices)[0, 0].tolist() == [[0, 0, 2, 0], [0, 1, 0, 0], [0, 0, 0, 0], [3, 0, 0, 4]]


def test_max_unpooling_without_indices_says_what_it_needs() -> None:
    with pytest.raises(ModelConfigError, match="pooling indices"):
        MaxUnpool()(X)


def test_bilinear_matches_interpolate_and_keeps_constants() -> None:
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(unpooling("bilinear")(x), F.interpolate(x, scale_factor=2, mode="bilinear"))
    assert torch.allclose(unpooling("bilinear", 4)(torch.ones(1, 1, 3, 3)), torch.ones(1, 1, 12, 12))


@pytest.mark.parametrize("factor", [2, 3, 8])
def test_bed_of_nails_any_factor_keeps_values_at_block_corners(factor: int) -> None:
    x = torch.randn(2, 3, 4, 5)
    out = BedOfNails(factor)(x)
    assert out.shape == (2, 3, 4 * factor, 5 * factor)
    assert torch.equal(out[..., ::factor, ::factor], x)
    assert (out != 0).sum() == (x != 0).sum()


def test_bed_of_nails_then_convolution_is_a_transpose_convolution() -> None:
    """The lecture's point: a stride-2 transpose convolution = bed of nails followed by a convolution."""
    x = torch.randn(1, 3, 5, 6)
    transpose = nn.ConvTranspose2d(3, 4, kernel_size=2, stride=2, bias=False)
    # a 2x2 convolution whose window starts at the nail: pad one pixel before, flip the kernel
    conv_weight = transpose.weight.flip(-1, -2).transpose(0, 1)
    ours = F.conv2d(F.pad(BedOfNails()(x), (1, 0, 1, 0)), conv_weight)[..., : 10, : 12]
    assert torch.allclose(ours, transpose(x), atol=1e-6)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ModelConfigError, match="valid: nearest, bilinear, bed_of_nails, max_unpool"):
        unpooling("pixel_shuffle")
    with pytest.raises(ModelConfigError, match="transpose, nearest"):
        up_layer("deconv", 4, 2)
    with pytest.raises(ModelConfigError, match="valid: transpose, nearest, bilinear, bed_of_nails, max_unpool"):
        build_model(ModelSpec("unet", 2, params={"upsample": "deconv"}))
    with pytest.raises(ModelConfigError, match="valid: transpose, bilinear, nearest"):
        build_model(ModelSpec("fcn8s", 2, params={"upsample": "max_unpool"}))


def test_every_mode_is_registered() -> None:
    assert UPSAMPLE_MODES == ("transpose", *UNPOOLING)
    assert set(UNPOOLING) == {"nearest", "bilinear", "bed_of_nails", "max_unpool"}


@pytest.mark.parametrize("mode", UPSAMPLE_MODES)
def test_up_layer_doubles_the_size_and_reduces_the_channels(mode: str) -> None:
    layer = up_layer(mode, 8, 4)
    x = torch.randn(2, 8, 3, 5)
    indices = nn.MaxPool2d(2, 2, return_indices=True)(torch.randn(2, 4, 6, 10))[1] if mode == "max_unpool" else None
    assert layer(x, indices).shape == (2, 4, 6, 10)


# -- U-Net ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", UPSAMPLE_MODES)
def test_every_unet_upsample_builds_runs_and_trains(mode: str) -> None:
    model = build_model(ModelSpec("unet", 3, 1, {**UNET_SMALL, "upsample": mode})).train()
    x = torch.randn(2, 1, 24, 40, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 3, 24, 40)
    logits.logsumexp(1).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if ".up." in name), mode


@pytest.mark.parametrize("mode", UPSAMPLE_MODES)
def test_unet_decoder_shapes_do_not_depend_on_the_upsampling(mode: str) -> None:
    base = build_model(ModelSpec("unet", 3, params=UNET_SMALL))
    other = build_model(ModelSpec("unet", 3, params={**UNET_SMALL, "upsample": mode}))
    shapes = {}
    for name, model in (("base", base), ("other", other)):
        seen = []
        for block in model.up:
            block.conv.register_forward_hook(lambda m, i, o, seen=seen: seen.append(tuple(i[0].shape)))
        model.eval()(torch.randn(1, 3, 32, 32))
        shapes[name] = seen
    assert shapes["base"] == shapes["other"]


def test_unet_max_unpool_puts_values_where_the_encoder_found_its_maxima() -> None:
    model = build_model(ModelSpec("unet", 2, params={**UNET_SMALL, "upsample": "max_unpool"})).eval()
    assert model.pool.return_indices
    captured: dict[str, torch.Tensor] = {}

    def keep_first_indices(module: nn.Module, inputs: tuple, output: tuple) -> None:
        captured.setdefault("indices", output[1])  # the first (full-resolution) level

    model.pool.register_forward_hook(keep_first_indices)
    model.up[-1].up.unpool.register_forward_hook(lambda m, i, o: captured.__setitem__("unpooled", o))
    model(torch.randn(1, 3, 32, 32))
    unpooled, indices = captured["unpooled"], captured["indices"]
    assert unpooled.shape[1] == indices.shape[1] == 4
    chosen = torch.zeros_like(unpooled.flatten(2), dtype=torch.bool).scatter_(2, indices.flatten(2), True)
    assert not ((unpooled.flatten(2) != 0) & ~chosen).any()


def test_default_unet_is_the_original_network() -> None:
    """An artifact saved before the option (no ``upsample`` key) builds the same layers and keys."""
    old = build_model(ModelSpec("unet", 2, params=UNET_SMALL))
    explicit = build_model(ModelSpec("unet", 2, params={**UNET_SMALL, "upsample": "transpose"}))
    keys = {k: tuple(v.shape) for k, v in old.state_dict().items()}
    assert keys == {k: tuple(v.shape) for k, v in explicit.state_dict().items()}
    assert "up.0.up.weight" in keys and keys["up.0.up.weight"] == (32, 16, 2, 2)
    assert all(isinstance(b.up, nn.ConvTranspose2d) and not old.pool.return_indices for b in old.up)


def test_manifest_without_upsample_loads_and_a_new_option_round_trips(tmp_path) -> None:
    x = torch.randn(1, 1, 16, 16)
    for name, params in (("old", UNET_SMALL), ("nails", {**UNET_SMALL, "upsample": "bed_of_nails"})):
        spec = ModelSpec("unet", 2, 1, params)
        model = build_model(spec).eval()
        path = save_artifact(model, tmp_path, name, spec=spec, input_spec=InputSpec(1, (0.5,), (0.2,)),
                             class_names=["membrane", "cell"])
        stored = json.loads((path / MANIFEST_FILE).read_text())["model"]["params"]
        assert ("upsample" in stored) == (name == "nails")
        loaded, manifest = load_artifact(path)
        assert torch.equal(model(x), loaded(x))
        assert loaded.up[0].up.__class__ is model.up[0].up.__class__


# -- FCN --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_fcn_fixed_score_upsampling_has_no_upsampling_weights(arch: str, mode: str) -> None:
    params = {"base_channels": 4, "fc_channels": 8, "dropout": 0.0}
    default = build_model(ModelSpec(arch, 3, params=params))
    fixed = build_model(ModelSpec(arch, 3, params={**params, "upsample": mode})).eval()
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in fixed.modules())
    ups = {k for k in default.state_dict() if k.startswith(("up2_", "up_final"))}
    assert ups and set(default.state_dict()) - set(fixed.state_dict()) == ups
    x = torch.randn(1, 3, 64, 64)
    pool3, pool4, pool5 = fixed.encoder(x)
    score = fixed.score_fr(fixed.head(pool5))
    skips = {"fcn32s": 0, "fcn16s": 1, "fcn8s": 2}[arch]
    for _ in range(skips):  # the skip scores start at zero: the output is the coarse score, interpolated
        score = F.interpolate(score, scale_factor=2, mode=mode)
    factor = 32 // 2**skips
    assert torch.allclose(fixed(x), F.interpolate(score, scale_factor=factor, mode=mode), atol=1e-5)
