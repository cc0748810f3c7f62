"""The synthetic shapes task: determinism, exact labels, the right geometry per class, folder export."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segsvc.data import synthetic
from segsvc.data.datasets import build_dataset
from segsvc.data.io import read_image, read_mask
from segsvc.data.spec import load_dataset_spec
from segsvc.data.synthetic import SyntheticConfig, generate_sample, synthetic_spec, write_synthetic_dataset
from segsvc.errors import AlreadyExists, DatasetError

SMALL = SyntheticConfig(size_hw=(64, 64))


def test_same_seed_and_index_give_identical_samples() -> None:
    a_img, a_lab = generate_sample(3, 17, SMALL)
    b_img, b_lab = generate_sample(3, 17, SMALL)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)


def test_other_index_or_seed_gives_other_samples() -> None:
    base = generate_sample(3, 17, SMALL)[0]
    assert not np.array_equal(base, generate_sample(3, 18, SMALL)[0])
    assert not np.array_equal(base, generate_sample(4, 17, SMALL)[0])


def test_shapes_and_types() -> None:
    image, labels = generate_sample(0, 0, SyntheticConfig(size_hw=(64, 96)))
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    assert labels.shape == (64, 96) and labels.dtype == np.uint8


def test_labels_are_exactly_the_painted_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pixel noise, every pixel's colour is the texture of the shape its label names."""
    drawn: list[tuple[str, np.ndarray]] = []
    fills: list[np.ndarray] = []
    original_draw, original_texture = synthetic._draw_shape, synthetic._texture

    def record_draw(rng, kind, h, w):  # type: ignore[no-untyped-def]
        region = original_draw(rng, kind, h, w)
        drawn.append((kind, region))
        return region

    def record_texture(rng, h, w, base, strength=1.0):  # type: ignore[no-untyped-def]
        fills.append(original_texture(rng, h, w, base, strength))
        return fills[-1]

    monkeypatch.setattr(synthetic, "_draw_shape", record_draw)
    monkeypatch.setattr(synthetic, "_texture", record_texture)
    config = SyntheticConfig(size_hw=(64, 64), min_shapes=3, max_shapes=4, pixel_noise=0.0)
    for index in range(10):
        drawn.clear()
        fills.clear()
        image, labels = generate_sample(5, index, config)
        expected_image, expected_labels = fills[0].copy(), np.zeros_like(labels)
        for (kind, region), fill in zip(drawn, fills[1:]):
            expected_image[region] = fill[region]
            expected_labels[region] = config.shapes.index(kind) + 1
        assert np.array_equal(labels, expected_labels)
        assert np.array_equal(image, np.clip(np.rint(expected_image), 0, 255).astype(np.uint8))


def _inner(mask: np.ndarray) -> bool:
    """The region is away from the image border (so its outline is the whole shape)."""
    return not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _single_shape_regions(kind: str, wanted: int = 4) -> list[np.ndarray]:
    config = SyntheticConfig(size_hw=(96, 96), shapes=(kind,), min_shapes=1, max_shapes=1)
    regions = []
    for index in range(60):
        region = generate_sample(11, index, config)[1] == 1
        if _inner(region):
            regions.append(region.astype(np.uint8))
        if len(regions) == wanted:
            break
    assert len(regions) == wanted
    return regions


def test_each_class_has_its_geometry() -> None:
    for region in _single_shape_regions("ring"):
        _, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        assert (hierarchy[0][:, 3] >= 0).any(), "a ring has a hole"
    for kind, corners in (("triangle", 3), ("rectangle", 4)):
        for region in _single_shape_regions(kind):
            contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            assert len(contours) == 1
            approx = cv2.approxPolyDP(contours[0], 0.04 * cv2.arcLength(contours[0], True), True)
            assert len(approx) == corners, kind
    for region in _single_shape_regions("circle"):
        contours, _ = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        (_, _), radius = cv2.minEnclosingCircle(contours[0])
        assert len(contours) == 1 and region.sum() == pytest.approx(np.pi * radius**2, rel=0.15)


def test_every_class_appears_across_a_few_samples() -> None:
    seen = np.zeros(5, dtype=int)
    for index in range(40):
        image, labels = generate_sample(0, index, SMALL)
        seen += np.bincount(labels.ravel(), minlength=5) > 0
    assert (seen >= 5).all(), seen


def test_config_validation() -> None:
    with pytest.raises(DatasetError, match="at least 32x32"):
        SyntheticConfig(size_hw=(16, 16))
    with pytest.raises(DatasetError, match="shapes must be distinct"):
        SyntheticConfig(shapes=("circle", "hexagon"))
    with pytest.raises(DatasetError, match="min_shapes"):
        SyntheticConfig(min_shapes=3, max_shapes=2)
    with pytest.raises(DatasetError, match="non-negative"):
        generate_sample(-1, 0)


def test_config_follows_the_spec_classes_and_options() -> None:
    spec = synthetic_spec(SyntheticConfig(size_hw=(64, 80), shapes=("ring", "circle")))
    assert spec.class_names == ("background", "ring", "circle")
    config = SyntheticConfig.from_spec(spec)
    assert config.size_hw == (64, 80) and config.shapes == ("ring", "circle")


def test_in_memory_dataset_needs_no_files() -> None:
    spec = synthetic_spec(SMALL)
    dataset = build_dataset(spec, "val")
    assert len(dataset) == spec.splits["val"].count
    image, labels = dataset.read(2)
    assert np.array_equal(image, generate_sample(spec.splits["val"].seed, 2, SMALL)[0])
    x, y = dataset[2]
    assert tuple(x.shape) == (3, 64, 64) and y.dtype.is_floating_point is False
    assert np.array_equal(y.numpy(), labels)


def test_write_folder_dataset_reads_back_identically(tmp_path: Path) -> None:
    yaml_path = write_synthetic_dataset(tmp_path / "syn", count=5, config=SMALL, seed=9, val_fraction=0.4)
    spec = load_dataset_spec(tmp_path / "syn")
    assert yaml_path == tmp_path / "syn" / "dataset.yaml" and spec.format == "folder"
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    assert train.names == ["000000", "000001", "000002"] and val.names == ["000003", "000004"]
    image, labels = generate_sample(9, 3, SMALL)
    assert np.array_equal(read_image(tmp_path / "syn" / "images" / "val" / "000003.png"), image)
    assert np.array_equal(read_mask(tmp_path / "syn" / "masks" / "val" / "000003.png"), labels)
    assert np.array_equal(val.read(0)[1], labels)


def test_write_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(AlreadyExists, match="not empty"):
        write_synthetic_dataset(tmp_path, count=4, config=SMALL)
