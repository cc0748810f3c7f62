"""The inference contract: ``InferenceSpec`` in the manifest, and the one place that applies it."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsvc.config import InferenceSpec, InputSpec, ModelSpec
from segsvc.data.preprocess import preprocess
from segsvc.errors import ArtifactError, InvalidArgument, ModelConfigError
from segsvc.inference.admission import estimate
from segsvc.inference.contract import scaled_size
from segsvc.inference.engine import Engine, EngineConfig, InferenceOptions
from segsvc.inference.predictor import Predictor
from segsvc.models.artifact import MANIFEST_FILE, Manifest, load_artifact, read_manifest, save_artifact
from segsvc.models.registry import build_model

TINY = ModelSpec("unet", num_classes=3, in_channels=3, params={"base_channels": 4, "depth": 2})


def calibrated_model(seed: int = 0) -> torch.nn.Module:
    """A tiny U-Net whose BatchNorm statistics come from noise, so its label maps vary across the image."""
    torch.manual_seed(seed)
    model = build_model(TINY)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    model = calibrated_model()
    full = save_artifact(model, root, "full", spec=TINY)
    half = save_artifact(model, root, "half", spec=TINY, inference=InferenceSpec(scale=0.5, stride=4, min_input_size=1),
                         lineage={"parent": "full:1", "dataset_sha256": "ab" * 32})
    return root, full, half


def engine_of(version_dir) -> Engine:
    model, manifest = load_artifact(version_dir)
    return Engine(Predictor(model, manifest), EngineConfig(device="cpu", warmup=False))


# -- InferenceSpec -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"scale": 0.0}, "inference scale must be in (0, 8.0], got 0.0"),
        ({"scale": -0.5}, "inference scale must be in (0, 8.0], got -0.5"),
        ({"scale": math.nan}, "inference scale must be in (0, 8.0], got nan"),
        ({"scale": 9}, "inference scale must be in (0, 8.0], got 9"),
        ({"scale": "half"}, "inference scale and tile_overlap must be numbers"),
        ({"interpolation": "cubic"}, "inference interpolation must be one of ('auto', 'area', 'linear')"),
        ({"stride": 0}, "inference stride must be a positive integer or null, got 0"),
        ({"stride": True}, "inference stride must be a positive integer or null, got True"),
        ({"min_input_size": 2.5}, "inference min_input_size must be a positive integer or null, got 2.5"),
        ({"tile_size": 8}, "inference tile_size must be 0 (no tiling) or an integer of at least 16, got 8"),
        ({"tile_size": 32.0}, "inference tile_size must be 0 (no tiling) or an integer of at least 16, got 32.0"),
        ({"stride": 100_000}, "inference stride must be at most 1024, got 100000"),
        ({"min_input_size": 100_000}, "inference min_input_size must be at most 4096, got 100000"),
        ({"tile_size": 10**9}, "inference tile_size must be at most 16384, got 1000000000"),
        ({"tile_overlap": 0.8}, "inference tile_overlap must be in [0, 0.75], got 0.8"),
        ({"tile_overlap": -0.1}, "inference tile_overlap must be in [0, 0.75], got -0.1"),
        ({"flip_tta": "yes"}, "inference flip_tta must be true or false, got 'yes'"),
        ({"tta_scales": 1.25}, "inference tta_scales must be a list of numbers, got 1.25"),
        ({"tta_scales": [0.5, "1"]}, "inference tta_scales must be numbers, got '1'"),
        ({"tta_scales": [True]}, "inference tta_scales must be numbers, got True"),
        ({"tta_scales": [0.0]}, "inference tta_scales factor 0.0 times scale 1.0 must be in (0, 8.0]"),
        ({"scale": 4.0, "tta_scales": [1.0, 2.5]}, "inference tta_scales factor 2.5 times scale 4.0 must be in"),
        ({"tta_scales": [0.5, 0.75, 1, 1.25, 1.5]}, "inference tta_scales has 5 scales, over the limit of 4"),
        ({"tta_scales": [1, 1.0]}, "inference tta_scales repeats a factor: [1, 1.0]"),
        ({"shift": [0.5]}, "inference shift must be two numbers [dy, dx] in pixels, got [0.5]"),
        ({"shift": "up"}, "inference shift must be two numbers [dy, dx] in pixels, got 'up'"),
        ({"shift": [2.5, 0]}, "inference shift must lie within 2.0 px on each axis, got [2.5, 0]"),
        ({"shift": [0, math.nan]}, "inference shift must lie within 2.0 px on each axis, got [0, nan]"),
    ],
)
def test_inference_spec_rejects_bad_values_with_a_domain_error(kwargs, message):
    with pytest.raises(ModelConfigError) as info:
        InferenceSpec(**kwargs)
    assert str(info.value).startswith(message)


def test_inference_spec_round_trips_and_rejects_unknown_keys():
    spec = InferenceSpec(scale=0.5, interpolation="area", stride=32, min_input_size=64, tile_size=256,
                         tile_overlap=0.5, flip_tta=True)
    data = json.loads(json.dumps(spec.to_dict()))
    assert data == {"scale": 0.5, "interpolation": "area", "stride": 32, "min_input_size": 64, "tile_size": 256,
                    "tile_overlap": 0.5, "flip_tta": True, "backend": "torch"}
    assert InferenceSpec.from_dict(data) == spec
    assert InferenceSpec.from_dict({}) == InferenceSpec()
    multi = InferenceSpec(scale=0.5, tta_scales=[0.75, 1, 1.25])
    assert multi.tta_scales == (0.75, 1.0, 1.25) and multi.to_dict()["tta_scales"] == [0.75, 1.0, 1.25]
    assert InferenceSpec.from_dict(json.loads(json.dumps(multi.to_dict()))) == multi
    assert InferenceSpec(tta_scales=[1.0]) == InferenceSpec()  # one factor of 1 is no TTA
    assert multi.composed and not InferenceSpec(scale=0.5).composed
    assert InferenceSpec(scale=1).scale == 1.0 and isinstance(InferenceSpec(scale=1).scale, float)
    shifted = InferenceSpec(shift=[-0.63, -0.15])
    assert shifted.shift == (-0.63, -0.15) and shifted.to_dict()["shift"] == [-0.63, -0.15]
    assert InferenceSpec.from_dict(json.loads(json.dumps(shifted.to_dict()))) == shifted
    assert "shift" not in InferenceSpec(shift=(0, -0.0)).to_dict()  # older segsvc reads the manifest
    with pytest.raises(ModelConfigError, match=r"unknown keys \['resize'\]"):
        InferenceSpec.from_dict({"resize": "bicubic"})
    with pytest.raises(ModelConfigError, match="must be a mapping, got list"):
        InferenceSpec.from_dict([0.5])


# -- the manifest ------------------------------------------------------------------------


def test_manifest_records_the_contract_and_lineage(repo):
    _, full, half = repo
    manifest = read_manifest(half)
    assert manifest.inference == InferenceSpec(scale=0.5, stride=4, min_input_size=1)
    assert dict(manifest.lineage) == {"parent": "full:1", "dataset_sha256": "ab" * 32}
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    data = json.loads((half / MANIFEST_FILE).read_text())
    assert data["format_version"] == 2 and data["inference"]["scale"] == 0.5
    # without inference=, the model's own stride and minimum size are recorded, at full resolution
    assert read_manifest(full).inference == InferenceSpec(scale=1.0, stride=4, min_input_size=1)
    assert dict(read_manifest(full).lineage) == {}


def test_a_version_1_manifest_without_the_contract_still_loads_with_the_defaults(repo, tmp_path):
    root, full, _ = repo
    old = tmp_path / "old" / "1"
    old.mkdir(parents=True)
    for name in ("weights.safetensors", MANIFEST_FILE):
        (old / name).write_bytes((full / name).read_bytes())
    data = json.loads((old / MANIFEST_FILE).read_text())
    data.update(format_version=1, name="old")
    del data["inference"], data["lineage"]
    (old / MANIFEST_FILE).write_text(json.dumps(data))

    model, manifest = load_artifact(old)
    assert manifest.inference == InferenceSpec() and dict(manifest.lineage) == {}
    assert manifest.inference.scale == 1.0 and manifest.inference.tile_size == 0 and not manifest.inference.flip_tta
    predictor = Predictor(model, manifest)
    assert (predictor.stride, predictor.min_size) == (4, 1)  # from the model
    image = smooth_image(37, 45)
    assert np.array_equal(predictor.predict(image), engine_of(full).predictor.predict(image))


def test_a_manifest_with_a_bad_contract_is_an_artifact_error(repo, tmp_path):
    _, full, _ = repo
    bad = tmp_path / "bad" / "1"
    bad.mkdir(parents=True)
    for name in ("weights.safetensors", MANIFEST_FILE):
        (bad / name).write_bytes((full / name).read_bytes())
    data = json.loads((bad / MANIFEST_FILE).read_text())
    data.update(name="bad", inference={"scale": -1})
    (bad / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"manifest is invalid: inference scale must be in \(0, 8.0\]"):
        read_manifest(bad)
    # a stride the model cannot take is refused when the model is loaded for serving
    model, manifest = load_artifact(full)
    for inference, message in ((InferenceSpec(stride=6), "inference stride 6 is not a multiple of the model's "
                                                         "output stride 4"),
                               (InferenceSpec(stride=4, min_input_size=1), None)):
        m = Manifest.from_dict({**manifest.to_dict(), "inference": inference.to_dict()})
        if message is None:
            assert Predictor(model, m).stride == 4
        else:
            with pytest.raises(ArtifactError, match=message):
                Predictor(model, m)


def test_a_manifest_whose_geometry_would_allocate_without_bound_is_refused_when_read(repo, tmp_path):
    """Warm-up and the memory probe run a pass padded to min_input_size: 100000 would be 112 GiB at load."""
    _, full, _ = repo
    assert InferenceSpec(stride=1024, min_input_size=4096, tile_size=16384).min_input_size == 4096  # the limits
    for field, value, limit in (("stride", 4096, 1024), ("min_input_size", 100_000, 4096),
                                ("tile_size", 10**9, 16384)):
        bad = tmp_path / field / "1"
        bad.mkdir(parents=True)
        for name in ("weights.safetensors", MANIFEST_FILE):
            (bad / name).write_bytes((full / name).read_bytes())
        data = json.loads((bad / MANIFEST_FILE).read_text())
        data.update(name=field.replace("_", "-"), inference={**data["inference"], field: value})
        (bad / MANIFEST_FILE).write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=f"inference {field} must be at most {limit}, got {value}"):
            read_manifest(bad)


# -- applying it -------------------------------------------------------------------------


def reference_labels(model: torch.nn.Module, image: np.ndarray, scale: float, stride: int) -> np.ndarray:
    """The contract written out by hand: area-resize, normalise, pad, forward, crop, bilinear back, arg-max."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    x = preprocess(small, InputSpec())[None]
    sh, sw = x.shape[-2:]
    x = F.pad(x, (0, -sw % stride, 0, -sh % stride))
    with torch.no_grad():
        logits = model(x)[:, :, :sh, :sw]
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def test_a_half_scale_manifest_makes_the_engine_return_a_label_map_of_the_original_size(repo):
    _, full, half = repo
    engine = engine_of(half)
    images = [smooth_image(61, 83, seed=1), smooth_image(64, 86, seed=2)]
    prepared = [engine.prepare(im, InferenceOptions()) for im in images]
    assert [p.size for p in prepared] == [(30, 42), (32, 43)]  # the network sees half the size
    assert prepared[0].key == prepared[1].key == ("padded", 32, 44)  # and batches by the half-size padding
    outputs = engine.run(prepared)
    for image, out in zip(images, outputs):
        assert out.labels.shape == image.shape[:2] and out.labels.dtype == np.uint8
        expected = reference_labels(engine.backend.model, image, 0.5, 4)
        assert np.array_equal(out.labels, expected)
        assert np.array_equal(engine.predictor.predict(image), expected)  # the in-process reference agrees
        assert len(np.unique(out.labels)) > 1  # a constant map would agree for the wrong reason
    full_labels = engine_of(full).run([engine_of(full).prepare(images[0], InferenceOptions())])[0].labels
    assert not np.array_equal(full_labels, outputs[0].labels)  # the scale is applied, not ignored


def test_request_options_override_the_manifest_defaults_and_unset_means_the_manifest(repo, tmp_path):
    model = calibrated_model()
    tta = save_artifact(model, tmp_path, "tta", spec=TINY,
                        inference=InferenceSpec(scale=0.5, tile_size=16, tile_overlap=0.5, flip_tta=True))
    engine = engine_of(tta)
    image = smooth_image(50, 70, seed=3)
    default = engine.prepare(image, InferenceOptions())
    assert engine.resolve(InferenceOptions()) == engine.predictor.inference
    assert default.key == ("exact", 25, 35, 16, 0.5, True, ())
    plain = engine.prepare(image, InferenceOptions(tile_size=0, flip_tta=False))
    assert plain.key == ("padded", 28, 36) and plain.spec.scale == 0.5  # the scale is not a request option
    overlap = engine.prepare(image, InferenceOptions(tile_overlap=0.25))
    assert overlap.key == ("exact", 25, 35, 16, 0.25, True, ())
    out_default, out_plain = engine.run([default])[0], engine.run([plain])[0]
    assert out_default.labels.shape == out_plain.labels.shape == (50, 70)
    assert not np.array_equal(out_default.labels, out_plain.labels)
    assert np.array_equal(out_plain.labels, reference_labels(engine.backend.model, image, 0.5, 4))
    assert default.cost.passes == 2 * default.cost.tiles and plain.cost.passes == 1


def test_a_registered_shift_translates_every_input_before_the_network_and_the_labels_follow(tmp_path):
    """``InferenceSpec.shift`` (``data.register``): served label maps are those of the translated image."""
    model = calibrated_model()
    plain = engine_of(save_artifact(model, tmp_path, "plain", spec=TINY))
    shifted = engine_of(save_artifact(model, tmp_path, "shifted", spec=TINY, inference=InferenceSpec(shift=(2, -1))))
    image = smooth_image(128, 160, seed=4)
    moved = np.roll(image, (2, -1), axis=(0, 1))  # whole pixels: the bilinear translation is exact inside
    x_shifted, x_moved = shifted.predictor.input_tensor(image), plain.predictor.input_tensor(moved)
    assert torch.equal(x_shifted[:, 3:-3, 3:-3], x_moved[:, 3:-3, 3:-3])
    got = shifted.run([shifted.prepare(image, InferenceOptions())])[0].labels
    want = plain.run([plain.prepare(moved, InferenceOptions())])[0].labels
    inner = (slice(40, -40), slice(40, -40))  # beyond the border's reach, where mirroring and rolling differ
    assert np.array_equal(got[inner], want[inner]) and len(np.unique(got[inner])) > 1
    assert not np.array_equal(got, plain.run([plain.prepare(image, InferenceOptions())])[0].labels)
    assert np.array_equal(shifted.predictor.predict(image), got)  # the in-process path applies it too


def test_admission_cost_counts_the_pixels_the_network_sees(repo):
    _, full, half = repo
    e_full, e_half = engine_of(full), engine_of(half)
    e_full.bytes_per_pixel = e_half.bytes_per_pixel = 1000.0
    c_full, c_half = e_full.cost(512, 768, InferenceOptions()), e_half.cost(512, 768, InferenceOptions())
    assert (c_full.pixels, c_half.pixels) == (512 * 768, 256 * 384)
    assert c_half.work_pixels * 4 == c_full.work_pixels
    assert c_half.peak_bytes < c_full.peak_bytes / 3  # the network's share dominates; outputs stay full size
    # the full-size logits resized back and the original image are counted at a reduced scale
    lone = estimate(512, 768, tile_size=0, tile_overlap=0.25, flip_tta=False, stride=4, min_size=1, num_classes=3,
                    bytes_per_pixel=1000.0, channels=3, scale=0.5)
    at_half = estimate(256, 384, tile_size=0, tile_overlap=0.25, flip_tta=False, stride=4, min_size=1,
                       num_classes=3, bytes_per_pixel=1000.0, channels=3)
    assert lone.pixels == at_half.pixels and lone.peak_bytes == at_half.peak_bytes + 512 * 768 * (3 * 4 + 3 + 1)
    assert scaled_size(45, 53, 0.5) == (22, 26) and scaled_size(1, 1, 0.1) == (1, 1)


def test_a_multi_scale_manifest_averages_the_scales_and_batches_only_with_its_own_kind(repo, tmp_path):
    """Multi-scale TTA from the manifest: the label map is the argmax of the mean of the per-scale logits, each
    resized back to the network's input size; requests with it batch by exact size, and their cost adds the scales."""
    from segsvc.inference.tiling import rescale

    model = calibrated_model()
    spec = InferenceSpec(scale=0.5, tta_scales=(0.5, 1.0, 1.5))
    engine = engine_of(save_artifact(model, tmp_path, "multi", spec=TINY, inference=spec))
    image = smooth_image(50, 70, seed=4)
    prepared = engine.prepare(image, InferenceOptions())
    assert prepared.key == ("exact", 25, 35, 0, 0.25, False, (0.5, 1.0, 1.5))
    x = engine.predictor.input_tensor(image)[None]
    with torch.no_grad():
        mean = sum(rescale(engine.forward(rescale(x, (round(25 * f), round(35 * f)))), (25, 35))
                   for f in spec.tta_scales) / 3
    expected = F.interpolate(mean, size=(50, 70), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    labels = engine.run([prepared])[0].labels
    assert np.array_equal(labels, expected)
    plain = engine_of(save_artifact(model, tmp_path, "plain", spec=TINY, inference=InferenceSpec(scale=0.5)))
    assert not np.array_equal(plain.run([plain.prepare(image, InferenceOptions())])[0].labels, labels)
    engine.bytes_per_pixel = plain.bytes_per_pixel = 1000.0
    multi_cost, plain_cost = engine.cost(400, 600, InferenceOptions()), plain.cost(400, 600, InferenceOptions())
    assert multi_cost.pixels > plain_cost.pixels and multi_cost.peak_bytes > plain_cost.peak_bytes  # the 1.5x pass
    assert multi_cost.work_pixels >= (0.25 + 1 + 2.25) * plain_cost.work_pixels * 0.95


def test_requests_for_tiles_and_flips_of_different_sizes_cannot_share_a_batch(repo):
    from segsvc.inference.contract import Geometry, contract_logits

    spec = InferenceSpec(tile_size=16)
    with pytest.raises(InvalidArgument, match="must share a size"):
        contract_logits(lambda b: b[:, :2], [torch.zeros(3, 20, 20), torch.zeros(3, 24, 20)], [(20, 20), (24, 20)],
                        spec, Geometry(4, 1))
    with pytest.raises(InvalidArgument, match="one size per tensor"):
        contract_logits(lambda b: b[:, :2], [torch.zeros(3, 20, 20)], [], spec)
