"""Sliding-window logits, flip and multi-scale TTA on top of a logits(batch) callable."""

from __future__ import annotations

import pytest
import torch

from segsvc.errors import Cancelled, InvalidArgument
from segsvc.inference.tiling import (
    blend_window,
    hflip_tta_logits,
    make_logits_fn,
    multiscale_tta_logits,
    rescale,
    sliding_window_logits,
    tile_starts,
)


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'model' (1x1 conv): tiling must not change its output at all."""
    weight = torch.arange(6, dtype=torch.float32).view(2, 3, 1, 1) / 6 - 0.4
    return torch.nn.functional.conv2d(x, weight)


@pytest.mark.parametrize("size, tile, overlap", [(10, 4, 0.0), (100, 32, 0.25), (33, 32, 0.5), (8, 16, 0.3)])
def test_tiles_cover_the_range_and_stay_inside(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    covered = set()
    for s in starts:
        assert 0 <= s <= size - t
        covered |= set(range(s, s + t))
    assert covered == set(range(size))
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g <= t * (1 - overlap) + 1 for g in gaps)  # at least the requested overlap


def test_blend_window_is_smooth_positive_and_peaks_in_the_middle():
    w = blend_window(16, 20)
    assert w.shape == (16, 20) and (w > 0).all()
    assert w.max() == w[7:9, 9:11].max() and w[0, 0] < 0.05


@pytest.mark.parametrize("tile, overlap", [((16, 16), 0.0), ((24, 20), 0.5), ((64, 64), 0.25)])
def test_sliding_window_equals_full_image_for_a_pointwise_model(tile, overlap):
    x = torch.randn(2, 3, 40, 52)
    out = sliding_window_logits(pointwise, x, tile, overlap, tile_batch=3)
    assert out.shape == (2, 2, 40, 52)
    torch.testing.assert_close(out, pointwise(x), rtol=1e-5, atol=1e-5)


def test_sliding_window_blends_overlaps_smoothly():
    # a 'model' that returns a constant per tile position: the blend is a weighted mean, so it stays in range
    calls = []

    def tile_id(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return torch.arange(x.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])

    out = sliding_window_logits(tile_id, torch.zeros(1, 3, 30, 30), (20, 20), 0.5, tile_batch=8)
    assert all(s[-2:] == (20, 20) for s in calls)
    assert out.min() >= 0 and out.max() <= 3 + 1e-5
    assert len(torch.unique(out)) > 4  # blended, not a hard seam between tiles


def test_hflip_tta_is_the_mean_of_plain_and_mirrored_predictions():
    x = torch.randn(1, 3, 8, 10)

    def left_biased(batch: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, batch.shape[-1]).view(1, 1, 1, -1)
        return batch[:, :2] + ramp

    expected = (left_biased(x) + torch.flip(left_biased(torch.flip(x, [-1])), [-1])) / 2
    torch.testing.assert_close(hflip_tta_logits(left_biased, x), expected)
    torch.testing.assert_close(hflip_tta_logits(pointwise, x), pointwise(x), rtol=1e-5, atol=1e-5)


def test_multiscale_tta_is_the_mean_of_the_passes_resized_back():
    def width_of_input(batch: torch.Tensor) -> torch.Tensor:  # a 'model' that answers the width it was given
        return torch.full((batch.shape[0], 2, *batch.shape[-2:]), float(batch.shape[-1]))

    out = multiscale_tta_logits(width_of_input, torch.zeros(2, 3, 8, 12), (0.5, 1.0, 1.5))
    assert out.shape == (2, 2, 8, 12)
    torch.testing.assert_close(out, torch.full_like(out, (6 + 12 + 18) / 3))
    x = torch.randn(1, 3, 16, 20)
    torch.testing.assert_close(multiscale_tta_logits(pointwise, x, (1.0,)), pointwise(x))


@pytest.mark.parametrize("shape", [(64, 1), (1, 64)])
def test_multiscale_tta_keeps_the_edge_of_an_image_one_pixel_thin(shape):
    """torch's antialiased shrink averages a 64x1 column into one value; TTA must not turn the step into one class."""
    step = torch.zeros(1, 1, 64).index_fill_(-1, torch.arange(20, 64), 1.0).view(1, 1, *shape) * 2 - 1

    def bright_is_class_0(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch, -batch], 1)

    labels = multiscale_tta_logits(bright_is_class_0, step, (0.5, 1.0, 1.5)).argmax(1).flatten()
    assert labels.tolist() == [1] * 20 + [0] * 44


@pytest.mark.parametrize("size, to", [((64, 1), (32, 1)), ((1, 64), (1, 21)), ((96, 2), (64, 1)), ((2, 96), (1, 64))])
def test_rescale_of_a_thin_image_only_spreads_a_pixel_to_its_neighbours(size, to):
    x = torch.zeros(2, 3, *size)
    x[..., 0, 0] = 1.0  # one bright pixel at the start of the long side
    out = rescale(x, to).flatten(-2)
    assert out.shape == (2, 3, max(to)) and out[..., 0].gt(0).all()
    assert out[..., 3:].eq(0).all()


def test_rescale_keeps_the_antialiased_path_for_ordinary_images():
    x = torch.rand(1, 3, 40, 30, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.interpolate(x, size=(20, 15), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(rescale(x, (20, 15)), expected)
    assert rescale(x, (40, 30)) is x


def test_multiscale_tta_stops_between_scales_once_every_caller_has_gone():
    calls = []

    def counted(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape[-2:]))
        return batch[:, :2]

    with pytest.raises(Cancelled):
        multiscale_tta_logits(counted, torch.zeros(1, 3, 8, 8), (0.5, 1.0, 2.0), should_stop=lambda: bool(calls))
    assert calls == [(4, 4)]


def test_scales_wrap_flips_which_wrap_tiles():
    calls = []

    def recorded(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape[:1]) + tuple(batch.shape[-2:]))
        return batch[:, :2]

    fn = make_logits_fn(recorded, tile=(16, 16), overlap=0.0, hflip=True, scales=(0.5, 1.0))
    assert fn(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    # scale 0.5: one 16x16 tile, plain and mirrored; scale 1: four tiles (one batch), plain and mirrored
    assert calls == [(1, 16, 16), (1, 16, 16), (4, 16, 16), (4, 16, 16)]


def test_composition_with_a_real_model_keeps_the_shape():
    from segsvc.config import ModelSpec
    from segsvc.models.registry import build_model

    model = build_model(ModelSpec("unet", 3, 3, {"depth": 2, "base_channels": 4})).eval()
    fn = make_logits_fn(model, tile=(16, 16), overlap=0.25, hflip=True)
    with torch.no_grad():
        assert fn(torch.randn(1, 3, 36, 44)).shape == (1, 3, 36, 44)


def test_bad_arguments_are_invalid_argument_errors():
    with pytest.raises(InvalidArgument, match="overlap"):
        sliding_window_logits(pointwise, torch.zeros(1, 3, 8, 8), (4, 4), overlap=1.0)
    with pytest.raises(InvalidArgument, match=r"\[N,C,H,W\]"):
        sliding_window_logits(pointwise, torch.zeros(3, 8, 8), (4, 4))


@pytest.mark.parametrize("size, tile, overlap", [(10, 4, 0.0), (100, 32, 0.25), (33, 32, 0.5), (8, 16, 0.3),
                                                 (1000, 16, 0.75), (997, 17, 0.6), (5, 5, 0.0)])
def test_tile_count_is_the_number_of_tiles_listed(size, tile, overlap):
    from segsvc.inference.tiling import tile_count
    assert tile_count(size, tile, overlap) == len(tile_starts(size, tile, overlap))
