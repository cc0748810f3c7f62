"""What a request over the server's memory budget is told to change, by case.

QA: a tiled 7999x8001 image (tile_size 512, 768 or 2048) was told "downscale it or use tiling": it was
tiled, and what it holds at full size (the image, its outputs and the per-class logit sums and weights
that tiling accumulates) was over the budget alone, so no tiling could make it fit.
"""

from __future__ import annotations

import re

import pytest

from segsvc.errors import ImageTooLarge
from segsvc.inference.admission import MIB, AdmissionConfig, estimate

# only the memory budget binds: every other per-request limit is out of the way
LIMITS = dict(max_pixels=10**10, max_tiles=10**7, max_work_pixels=10**13)


def _cost(h: int, w: int, **kw):  # type: ignore[no-untyped-def]
    args = dict(tile_size=0, tile_overlap=0.25, flip_tta=False, stride=32, min_size=1, num_classes=3,
                bytes_per_pixel=1000.0)
    return estimate(h, w, **{**args, **kw})


def _refusal(h: int, w: int, budget_mb: int = 2048, **kw) -> str:  # type: ignore[no-untyped-def]
    cost = _cost(h, w, **kw)
    with pytest.raises(ImageTooLarge) as info:
        AdmissionConfig(max_inflight_mb=budget_mb, **LIMITS).check(cost, h, w)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"the {w}x{h} image needs about "), message
    assert f"MiB, over the server's budget of {budget_mb} MiB" in message
    return message


@pytest.mark.parametrize("tile_size", [512, 768, 2048])
@pytest.mark.parametrize("tile_padding", ["zero", "reflect"])
def test_tiled_and_too_large_at_full_size_says_tiling_cannot_help(tile_size, tile_padding):
    cost = _cost(8001, 7999, tile_size=tile_size, tile_padding=tile_padding)
    assert cost.tiled and cost.full_size_bytes > 2048 * MIB
    message = _refusal(8001, 7999, tile_size=tile_size, tile_padding=tile_padding)
    assert message.endswith(f"MiB, even tiled: its full-size accumulators (image, outputs, per-class logit sums and "
                            f"weights) alone need about {cost.full_size_bytes / MIB:.0f} MiB, whatever the tile size; "
                            "downscale it or raise the server's --max-inflight-mb"), message
    assert "use tiling" not in message


def test_the_full_size_part_counts_the_outputs_and_flips():
    plain = _cost(8001, 7999, tile_size=512)
    assert _cost(8001, 7999, tile_size=512, confidence=True).full_size_bytes > plain.full_size_bytes
    assert _cost(8001, 7999, tile_size=512, flip_tta=True).full_size_bytes > plain.full_size_bytes
    assert plain.full_size_bytes < plain.peak_bytes  # the tiles in flight come on top
    scaled = _cost(8001, 7999, tile_size=512, tta_scales=(0.5, 1.0))
    assert scaled.tiled and scaled.full_size_bytes < scaled.peak_bytes


def test_untiled_and_too_large_even_for_tiling_does_not_suggest_it():
    cost = _cost(8001, 7999)
    assert not cost.tiled and cost.full_size_bytes > 2048 * MIB
    message = _refusal(8001, 7999)
    assert message.endswith(f"MiB, and tiling would not help: its full-size accumulators (image, outputs, per-class "
                            f"logit sums and weights) alone need about {cost.full_size_bytes / MIB:.0f} MiB; "
                            "downscale it or raise the server's --max-inflight-mb"), message


def test_untiled_where_tiling_would_fit_suggests_tiling():
    cost = _cost(3000, 3000)
    assert not cost.tiled and cost.full_size_bytes < 2048 * MIB < cost.peak_bytes
    assert _refusal(3000, 3000).endswith(" MiB; downscale it or use tiling")
    AdmissionConfig(**LIMITS).check(_cost(3000, 3000, tile_size=256), 3000, 3000)  # and it does fit


def test_tiled_with_tiles_too_large_suggests_smaller_tiles():
    cost = _cost(3000, 3000, tile_size=2048)
    assert cost.tiled and cost.full_size_bytes < 2048 * MIB < cost.peak_bytes
    message = _refusal(3000, 3000, tile_size=2048)
    assert message.endswith(" MiB; use smaller tiles or downscale it"), message
    assert not re.search("tiling would|use tiling", message)
