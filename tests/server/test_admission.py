"""The probe's cost findings, reproduced against a real server: each is refused before work starts."""

from __future__ import annotations

import math

import numpy as np
import pytest

import segsvc.client
from segsvc import errors
from segsvc.inference.admission import MIB
from segsvc.inference.engine import InferenceOptions
from segsvc.server.config import LimitsConfig
from tests.server.conftest import encode, make_image, publish


def test_a_one_pixel_stride_tiling_request_is_refused_before_the_model_runs(start_server, tmp_path, gated,
                                                                            monkeypatch):
    monkeypatch.setattr(segsvc.client, "check_request_tiling", lambda *options: None)  # the server's check
    publish(tmp_path, "m", seed=1)
    server = start_server(tmp_path)
    gated.gate.set()  # record every batch, hold none
    image = encode(make_image(96, 96))
    with server.client() as c:
        with pytest.raises(errors.InvalidArgument, match=r"tile_overlap must be a fraction in \[0, 0.75\]"):
            c.segment(image, model="m", tile_size=16, tile_overlap=0.9999)
        assert gated.ran == []
        assert c.segment(image, model="m", tile_size=16, tile_overlap=0.75).mask.shape == (96, 96)
    assert gated.ran


def test_tile_count_over_the_cap_is_refused(start_server, tmp_path):
    publish(tmp_path, "m", seed=1)
    server = start_server(tmp_path, limits=LimitsConfig(max_tiles=64))
    with server.client() as c, pytest.raises(errors.ImageTooLarge, match="tiles, over the limit of 64"):
        c.segment(make_image(256, 256), model="m", tile_size=16, tile_overlap=0.5)


def test_padding_counts_a_1x262144_strip_is_refused_where_512x512_passes(start_server, tmp_path, gated):
    publish(tmp_path, "m", seed=1)
    probe = start_server(tmp_path / ".", limits=LimitsConfig())
    engine = probe.manager.resolve("m", None).engine
    square = engine.cost(512, 512, InferenceOptions()).peak_bytes
    strip = engine.cost(1, 262144, InferenceOptions()).peak_bytes
    assert strip > 2 * square  # same pixel count; the strip is padded to the stride (4 for this model)
    budget_mb = math.ceil(1.5 * square / MIB)
    server = start_server(tmp_path, limits=LimitsConfig(max_inflight_mb=budget_mb))
    gated.gate.set()  # record every batch, hold none
    with server.client() as c:
        assert c.segment(np.zeros((512, 512, 3), np.uint8), model="m").mask.shape == (512, 512)
        assert gated.ran == [[(512, 512)]]
        with pytest.raises(errors.ImageTooLarge, match=f"over the server's budget of {budget_mb} MiB"):
            c.segment(np.zeros((1, 262144, 3), np.uint8), model="m")
    assert gated.ran == [[(512, 512)]]  # the strip never reached the model
