"""Overlap-tile inference with mirrored borders (``InferenceSpec.tile_padding: reflect``).

The references are written out by hand with ``np.pad(mode="reflect")``: each
tile the network sees is a crop of the mirrored image, and a model whose
receptive field fits in the context gives exactly the logits of the whole
mirrored image.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from segsvc.config import InferenceSpec, InputSpec
from segsvc.data.preprocess import preprocess
from segsvc.errors import ModelConfigError
from segsvc.inference.admission import estimate
from segsvc.inference.contract import Geometry, contract_logits
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions
from segsvc.inference.predictor import Predictor
from segsvc.inference.tiling import (
    blend_window,
    make_logits_fn,
    mirror_pad,
    overlap_tile_layout,
    overlap_tile_logits,
    sliding_window_logits,
    tile_starts,
)
from segsvc.models.artifact import MANIFEST_FILE, load_artifact, read_manifest, save_artifact
from tests.inference.test_contract import TINY, calibrated_model


def local_model(seed: int = 0) -> torch.nn.Module:
    """Two 3x3 convolutions: each output pixel sees 2 pixels around it, less than any context used here."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv2d(4, 2, 3, padding=1)).eval()


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def np_reflect(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """The reference mirror: numpy's reflect mode on the last two axes."""
    pad = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return torch.from_numpy(np.pad(x.numpy(), pad, mode="reflect"))


class Recorder:
    """A logits function that remembers every batch it was given."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.batches = model, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.clone())
        with torch.no_grad():
            return self.model(batch)


# -- mirroring and layout -------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (5, 6), (37, 45)])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 2, 3, 4), (9, 0, 0, 13), (40, 41, 50, 100)])
def test_mirror_pad_is_numpys_reflect_for_any_width(size, pads):
    x = torch.randn(2, 3, *size)
    assert torch.equal(mirror_pad(x, *pads), np_reflect(x, *pads))


def test_overlap_tile_layout_cuts_cores_that_cover_the_image_and_tiles_that_fit_the_stride():
    layout = overlap_tile_layout(100, 61, (32, 24), 0.5, stride=8, min_size=16)
    assert layout.context == (8, 6) and layout.core == (16, 12)
    assert layout.input_size == (32, 24) and layout.extra == (0, 0)
    assert layout.ys == tile_starts(100, 16, 0.0) and layout.xs == tile_starts(61, 12, 0.0)
    odd = overlap_tile_layout(50, 50, (20, 20), 0.25, stride=8)  # context 2, core 16: 20 -> 24 for the stride
    assert (odd.context, odd.core, odd.extra, odd.input_size) == ((2, 2), (16, 16), (4, 4), (24, 24))
    small = overlap_tile_layout(10, 7, (64, 64), 0.25, stride=4)  # an image smaller than a core
    assert small.core == (10, 7) and small.context == (8, 8) and small.tiles == 1
    assert small.input_size == (28, 24)  # 10 + 16 -> 28, 7 + 16 -> 24: mirrored several times over
    assert overlap_tile_layout(64, 64, (16, 16), 0.0).context == (0, 0)  # no overlap: no context


# -- the tiles are crops of the mirrored image -------------------------------------------------


@pytest.mark.parametrize("tile, overlap, stride", [((16, 16), 0.5, 8), ((24, 20), 0.25, 4), ((64, 64), 0.25, 8)])
def test_reflect_tiles_of_a_local_model_equal_its_pass_over_the_mirrored_image(tile, overlap, stride):
    x = torch.randn(2, 3, 37, 45)
    model = Recorder(local_model())
    out = overlap_tile_logits(model, x, tile, overlap, tile_batch=3, stride=stride)
    with torch.no_grad():
        reference = local_model()(np_reflect(x, 40, 40, 40, 40))[:, :, 40:77, 40:85]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    layout = overlap_tile_layout(37, 45, tile, overlap, stride)
    assert {tuple(b.shape[-2:]) for b in model.batches} == {layout.input_size}
    assert all(s % stride == 0 for s in layout.input_size)  # the backend's own padding is a no-op
    assert sum(len(b) for b in model.batches) == 2 * layout.tiles


def test_reflect_tiles_of_a_unet_equal_the_brute_force_overlap_tile_reference():
    """Every tile is the mirrored-padded image cropped; the result is its cores' forward passes, blended."""
    model = calibrated_model()
    x = torch.randn(1, 3, 45, 38)
    recorder = Recorder(model)
    out = overlap_tile_logits(recorder, x, (24, 24), 0.5, tile_batch=2, stride=4)
    c, k = 6, 12  # context round(24 * 0.5 / 2), core 24 - 2 * 6; 24 is a multiple of 4
    padded = np_reflect(x, c, c, c, c)
    total, weight = torch.zeros(1, 3, 45, 38), torch.zeros(1, 1, 45, 38)
    window = blend_window(k, k)
    crops = []
    for y in tile_starts(45, k, 0.0):
        for x0 in tile_starts(38, k, 0.0):
            crop = padded[:, :, y : y + k + 2 * c, x0 : x0 + k + 2 * c]
            crops.append(crop[0])
            with torch.no_grad():
                core = model(crop)[:, :, c : c + k, c : c + k]
            total[:, :, y : y + k, x0 : x0 + k] += core * window
            weight[:, :, y : y + k, x0 : x0 + k] += window
    seen = torch.cat(recorder.batches)
    assert len(seen) == len(crops) and all(torch.equal(a, b) for a, b in zip(seen, crops))
    torch.testing.assert_close(out, total / weight, rtol=1e-5, atol=1e-5)
    zero = sliding_window_logits(model, x, (24, 24), 0.5)
    assert not torch.allclose(out, zero, atol=1e-3)  # the borders now see mirrored context


def test_whole_images_in_reflect_mode_are_mirrored_to_the_stride_before_the_forward_pass():
    model = calibrated_model()
    x = torch.randn(3, 30, 41)
    recorder = Recorder(model)
    [out] = contract_logits(recorder, [x], [(30, 41)], InferenceSpec(tile_padding="reflect"), Geometry(8, 48))
    with torch.no_grad():
        reference = model(np_reflect(x[None], 0, 18, 0, 7))[:, :, :30, :41]  # 30 -> 48 (min size), 41 -> 48
    assert [tuple(b.shape[-2:]) for b in recorder.batches] == [(48, 48)]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    flipped = make_logits_fn(recorder, hflip=True, padding="reflect", stride=8, min_size=48)(x[None])
    assert flipped.shape == (1, 3, 30, 41) and tuple(recorder.batches[-1].shape[-2:]) == (48, 48)


def test_zero_mode_is_unchanged():
    model = calibrated_model()
    x = torch.randn(1, 3, 40, 52)
    torch.testing.assert_close(make_logits_fn(model, tile=(16, 16), overlap=0.25, padding="zero")(x),
                               sliding_window_logits(model, x, (16, 16), 0.25))
    assert make_logits_fn(model, padding="zero") is model  # no tiles: the backend pads, as before
    with pytest.raises(Exception, match="tile padding must be one of"):
        make_logits_fn(model, padding="edge")


# -- the contract in the manifest --------------------------------------------------------------


def test_tile_padding_is_validated_and_only_written_when_not_zero():
    assert InferenceSpec().tile_padding == "zero"
    assert "tile_padding" not in InferenceSpec().to_dict()  # manifests that do not use it stay as they were
    spec = InferenceSpec(tile_size=64, tile_padding="reflect")
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["tile_padding"] == "reflect" and InferenceSpec.from_dict(data) == spec
    assert InferenceSpec.from_dict({"scale": 0.5}).tile_padding == "zero"
    for bad in ("mirror", None, 1):
        with pytest.raises(ModelConfigError, match=r"inference tile_padding must be one of \('zero', 'reflect'\)"):
            InferenceSpec(tile_padding=bad)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap-tile")
    model = calibrated_model()
    versions = {
        "zero": InferenceSpec(stride=8, min_input_size=1),
        "reflect": InferenceSpec(stride=8, min_input_size=1, tile_padding="reflect"),
        "zero-tiles": InferenceSpec(stride=8, min_input_size=1, tile_size=32, tile_overlap=0.5),
        "reflect-tiles": InferenceSpec(stride=8, min_input_size=1, tile_size=32, tile_overlap=0.5,
                                       tile_padding="reflect"),
    }
    return {name: save_artifact(model, root, name, spec=TINY, inference=spec) for name, spec in versions.items()}


def engine_of(version_dir) -> Engine:
    model, manifest = load_artifact(version_dir)
    return Engine(Predictor(model, manifest), EngineConfig(device="cpu", warmup=False))


def serve(version_dir, image: np.ndarray) -> np.ndarray:
    engine = engine_of(version_dir)
    return engine.run([engine.prepare(image, InferenceOptions())])[0].labels


def test_a_reflect_manifest_loads_and_old_manifests_without_the_key_stay_zero(repo):
    assert read_manifest(repo["reflect"]).inference.tile_padding == "reflect"
    data = json.loads((repo["zero"] / MANIFEST_FILE).read_text())
    assert "tile_padding" not in data["inference"] and read_manifest(repo["zero"]).inference.tile_padding == "zero"


def test_reflect_changes_the_served_labels_near_the_padded_border_and_nowhere_far_from_it(repo):
    image = smooth_image(90, 110, seed=4)  # padded to 96 x 112: 6 rows and 2 columns of padding
    zero, reflect = serve(repo["zero"], image), serve(repo["reflect"], image)
    differ = zero != reflect
    assert differ.any()
    reach = 28  # more than the tiny U-Net's receptive radius (about 20 px)
    assert not differ[: 90 - reach, : 110 - reach].any()
    # the reference: mirror to the stride by hand, forward, crop
    x = preprocess(image, InputSpec())[None]
    with torch.no_grad():
        logits = load_artifact(repo["reflect"])[0](np_reflect(x, 0, 6, 0, 2))[:, :, :90, :110]
    assert np.array_equal(reflect, logits.argmax(1)[0].numpy())
    assert np.array_equal(engine_of(repo["reflect"]).predictor.predict(image), reflect)


def test_reflect_tiles_in_a_manifest_change_the_served_labels(repo):
    image = smooth_image(70, 90, seed=5)
    zero, reflect = serve(repo["zero-tiles"], image), serve(repo["reflect-tiles"], image)
    assert zero.shape == reflect.shape == (70, 90) and (zero != reflect).any()
    engine = engine_of(repo["reflect-tiles"])
    x = engine.predictor.input_tensor(image)[None]
    with torch.no_grad():
        logits = overlap_tile_logits(engine.backend.forward, x, (32, 32), 0.5, tile_batch=4, stride=8)
    assert np.array_equal(reflect, logits.argmax(1)[0].numpy())


def test_the_batching_key_includes_the_padding_and_a_shared_batch_mirrors_each_image(repo):
    images = [smooth_image(61, 83, seed=1), smooth_image(64, 88, seed=2)]  # both pad to 64 x 88
    zero, reflect = engine_of(repo["zero"]), engine_of(repo["reflect"])
    assert zero.prepare(images[0], InferenceOptions()).key == ("padded", 64, 88)
    prepared = [reflect.prepare(im, InferenceOptions()) for im in images]
    assert prepared[0].key == prepared[1].key == ("padded", 64, 88, "reflect")
    alone = [reflect.run([p])[0].labels for p in prepared]
    together = reflect.run(prepared)
    assert all(np.array_equal(a, b.labels) for a, b in zip(alone, together))
    tiled = engine_of(repo["reflect-tiles"]).prepare(images[0], InferenceOptions())
    assert tiled.key == ("exact", 61, 83, 32, 0.5, False, (), "reflect")
    zero = engine_of(repo["zero-tiles"]).prepare(images[0], InferenceOptions())
    assert zero.key == ("exact", 61, 83, 32, 0.5, False, ())


# -- admission -------------------------------------------------------------------------------


def cost(h: int, w: int, padding: str, tile: int = 32, overlap: float = 0.5, flip: bool = False):
    return estimate(h, w, tile_size=tile, tile_overlap=overlap, flip_tta=flip, stride=8, min_size=1,
                    num_classes=3, bytes_per_pixel=1000.0, tile_padding=padding)


@pytest.mark.parametrize("size", [(70, 90), (10, 7), (300, 40)])
@pytest.mark.parametrize("flip", [False, True])
def test_the_admission_cost_counts_the_mirrored_context_the_network_sees(size, flip):
    counted = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        counted.append(batch.shape[0] * batch.shape[-2] * batch.shape[-1])
        return batch[:, :3]

    fn = make_logits_fn(forward, tile=(32, 32), overlap=0.5, hflip=flip, padding="reflect", stride=8)
    fn(torch.zeros(1, 3, *size))
    c = cost(*size, "reflect", flip=flip)
    assert c.work_pixels == sum(counted)
    layout = overlap_tile_layout(*size, (32, 32), 0.5, 8)
    assert c.tiles == layout.tiles and c.pixels == layout.input_size[0] * layout.input_size[1]


def test_reflect_costs_more_than_zero_padding_and_the_engine_counts_it(repo):
    zero, reflect = cost(70, 90, "zero"), cost(70, 90, "reflect")
    assert reflect.work_pixels > zero.work_pixels and reflect.peak_bytes > zero.peak_bytes
    small_zero, small_reflect = cost(10, 7, "zero"), cost(10, 7, "reflect")
    assert small_zero.pixels == 16 * 8 and small_reflect.pixels == 32 * 24  # the context is counted
    engine = engine_of(repo["reflect-tiles"])
    engine.bytes_per_pixel = 1000.0
    assert engine.cost(70, 90, InferenceOptions()) == estimate(
        70, 90, tile_size=32, tile_overlap=0.5, flip_tta=False, stride=8, min_size=1, num_classes=3,
        bytes_per_pixel=1000.0, tile_padding="reflect")
    plain_zero, plain_reflect = cost(70, 90, "zero", tile=0), cost(70, 90, "reflect", tile=0)
    assert plain_zero.work_pixels == plain_reflect.work_pixels  # whole images: the same padded pass
