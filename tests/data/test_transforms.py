"""Augmentation presets: image and mask stay aligned, masks are never blended, padding is ignored."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest

from segsvc.data.transforms import PRESETS, ClassUniformCrop, train_transform
from segsvc.errors import InvalidArgument

COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], np.uint8)


def block_labels(seed: int, h: int = 64, w: int = 80, block: int = 8) -> np.ndarray:
    """Random 3-class labels in 8x8 blocks: asymmetric, so a flip or turn of one side only shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (h // block, w // block), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)


def assert_aligned(image: np.ndarray, mask: np.ndarray) -> None:
    """Every mask region is one flat colour, distinct per label.

    Regions are first shrunk by 3 px (also from the image edge): linear
    interpolation blends the image across a boundary, and an elastic
    deformation may stretch that blend over a couple of pixels.
    """
    colours = {}
    kernel = np.ones((7, 7), np.uint8)
    for label in np.unique(mask):
        region = (mask == label).astype(np.uint8)
        inner = cv2.erode(region, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        if inner.sum() < 10:
            continue
        pixels = image[inner].reshape(-1, image.shape[2] if image.ndim == 3 else 1).astype(int)
        spread = pixels.max(axis=0) - pixels.min(axis=0)
        assert spread.max() <= 3, f"label {label} covers several image colours: misaligned"
        colours[int(label)] = tuple(np.median(pixels, axis=0))
    assert len(set(colours.values())) == len(colours), "two labels map to one colour: misaligned"


@pytest.mark.parametrize("preset", ["street", "em", "synthetic", "none"])
def test_presets_keep_image_and_mask_aligned(preset: str) -> None:
    transform = train_transform(preset, crop_hw=(48, 64), ignore_index=255, seed=0)
    for seed in range(8):
        labels = block_labels(seed)
        out = transform(image=COLOURS[labels], mask=labels)
        assert out["image"].shape == (48, 64, 3) and out["mask"].shape == (48, 64)
        assert out["image"].dtype == np.uint8 and out["mask"].dtype == np.uint8
        assert_aligned(out["image"], out["mask"])


def test_em_preset_on_grey_images() -> None:
    transform = train_transform("em", crop_hw=(64, 64), seed=1)
    for seed in range(4):
        labels = block_labels(seed, 64, 64)
        grey = np.array([40, 130, 220], np.uint8)[labels]
        out = transform(image=grey, mask=labels)
        assert out["image"].shape == (64, 64)
        assert_aligned(out["image"][:, :, None], out["mask"])


@pytest.mark.parametrize("preset", ["street", "em", "synthetic", "none"])
def test_masks_are_never_blended(preset: str) -> None:
    """Labels 0/100/200 never produce in-between values such as 50 or 150."""
    transform = train_transform(preset, crop_hw=(48, 64), seed=2)
    for seed in range(6):
        labels = block_labels(seed) * 100
        out = transform(image=COLOURS[labels // 100], mask=labels)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 100, 200, 255}


@pytest.mark.parametrize("preset", ["em", "synthetic", "none"])
def test_padding_is_ignore_index_exactly(preset: str) -> None:
    transform = train_transform(preset, crop_hw=(64, 64), ignore_index=254, seed=3)
    out = transform(image=np.zeros((20, 30, 3), np.uint8), mask=np.zeros((20, 30), np.uint8))
    assert int((out["mask"] == 254).sum()) == 64 * 64 - 20 * 30


def test_street_pads_small_images_with_ignore() -> None:
    transform = train_transform("street", crop_hw=(128, 128), ignore_index=255, seed=4)
    out = transform(image=np.zeros((30, 40, 3), np.uint8), mask=np.ones((30, 40), np.uint8))
    # even at the top scale (2x) a 30x40 image cannot fill the 128x128 crop
    assert 0 < int((out["mask"] == 1).sum()) <= 60 * 80 + 2 * (60 + 80)
    assert set(np.unique(out["mask"]).tolist()) == {1, 255}


def test_street_scale_jitter_spans_half_to_double() -> None:
    street = train_transform("street", crop_hw=(8, 8), seed=0)
    scale = A.Compose([t for t in street.transforms if isinstance(t, A.RandomScale)], seed=0)
    heights = [scale(image=np.zeros((100, 100), np.uint8))["image"].shape[0] for _ in range(40)]
    assert 50 <= min(heights) < 70 and 170 < max(heights) <= 200


def test_seed_makes_the_stream_reproducible() -> None:
    labels = block_labels(5)
    a = train_transform("street", crop_hw=(48, 64), seed=7)(image=COLOURS[labels], mask=labels)
    b = train_transform("street", crop_hw=(48, 64), seed=7)(image=COLOURS[labels], mask=labels)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])


def test_bad_arguments_are_explained() -> None:
    with pytest.raises(InvalidArgument, match="valid: street, em, synthetic, none"):
        train_transform("city")
    with pytest.raises(InvalidArgument, match="give crop_hw"):
        train_transform("street")
    with pytest.raises(InvalidArgument, match="crop_hw must be"):
        train_transform("em", crop_hw=(0, 10))
    with pytest.raises(InvalidArgument, match="has none"):
        train_transform("em", crop_hw=(10, 10), ignore_index=None)
    with pytest.raises(InvalidArgument, match="differ"):
        train_transform("em", crop_hw=(10, 10), crop=(12, 12))


def test_contract_name_crop_is_accepted() -> None:
    out = train_transform("none", crop=(16, 16))(image=np.zeros((8, 8, 3), np.uint8), mask=np.zeros((8, 8), np.uint8))
    assert out["mask"].shape == (16, 16)


def test_without_crop_sizes_are_kept() -> None:
    assert set(PRESETS) == {"street", "em", "synthetic", "none"}
    out = train_transform("synthetic", seed=0)(image=COLOURS[block_labels(0)], mask=block_labels(0))
    assert out["image"].shape == (64, 80, 3)


def test_alignment_check_catches_a_one_sided_transform() -> None:
    """The check above is not vacuous: flipping or shifting only the image fails it."""
    labels = block_labels(0)
    for moved in (COLOURS[labels][:, ::-1], np.roll(COLOURS[labels], 4, axis=1)):
        with pytest.raises(AssertionError, match="misaligned"):
            assert_aligned(moved, labels)


def rare_pixel_crops(fraction: float, n: int = 200) -> float:
    """Share of 8x8 crops of a 64x64 mask that contain its one pixel of class 1."""
    mask = np.zeros((64, 64), np.uint8)
    mask[60, 2] = 1
    image = np.zeros((64, 64, 3), np.uint8)
    t = A.Compose([ClassUniformCrop(8, 8, fraction, ignore_index=255)], seed=3)
    return sum(bool((t(image=image, mask=mask)["mask"] == 1).any()) for _ in range(n)) / n


def test_class_uniform_crops_find_a_rare_class_as_often_as_a_common_one() -> None:
    # two classes present: class 1 is drawn half the time, and its one pixel is then always in the crop
    assert 0.4 < rare_pixel_crops(1.0) < 0.6
    assert rare_pixel_crops(0.0) < 0.05  # uniform crops: 1 in 57 on average
    assert 0.15 < rare_pixel_crops(0.5) < 0.35


def test_class_uniform_crops_never_draw_the_ignore_index_and_keep_image_and_mask_aligned() -> None:
    mask = np.full((40, 50), 255, np.uint8)
    mask[35:37, 44:46] = 2
    image = np.dstack([np.arange(40 * 50).reshape(40, 50) % 251] * 3).astype(np.uint8)
    t = A.Compose([ClassUniformCrop(8, 16, 1.0, ignore_index=255)], seed=0)
    for _ in range(30):
        out = t(image=image, mask=mask)
        assert (out["mask"] == 2).any()  # the only class; void is never the drawn one
        y, x = np.argwhere(out["mask"] == 2)[0]
        ys, xs = np.argwhere((image[..., 0] == out["image"][y, x, 0]) & (mask == 2))[0]
        assert (mask[ys - y: ys - y + 8, xs - x: xs - x + 16] == out["mask"]).all()


def test_class_uniform_crops_in_a_preset_and_their_errors() -> None:
    t = train_transform("street", crop_hw=(32, 48), class_uniform=1.0, seed=0)
    out = t(image=np.zeros((20, 30, 3), np.uint8), mask=np.ones((20, 30), np.uint8))
    assert out["image"].shape == (32, 48, 3) and out["mask"].shape == (32, 48)
    with pytest.raises(InvalidArgument, match="fraction"):
        ClassUniformCrop(8, 8, 1.5, ignore_index=255)
    with pytest.raises(InvalidArgument, match="crop size"):
        train_transform("none", class_uniform=0.5)
    with pytest.raises(InvalidArgument, match="smaller than the crop"):
        A.Compose([ClassUniformCrop(8, 8, 1.0, 255)])(image=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 4), np.uint8))


# -- independent random choices ------------------------------------------------------------
QUADRANTS = np.kron(np.array([[0, 1], [3, 2]], np.uint8), np.ones((32, 32), np.uint8))  # 0,1,2,3 clockwise


def orientation(mask: np.ndarray) -> tuple[int, ...]:
    """The quadrant labels read clockwise from the top left (the majority label of each quarter): one of the
    8 flips and turns of the square, deformations aside."""
    h, w = mask.shape[0] // 2, mask.shape[1] // 2
    quarters = (mask[:h, :w], mask[:h, w:], mask[h:, w:], mask[h:, :w])
    return tuple(int(np.bincount(q.ravel()).argmax()) for q in quarters)


def test_reseeded_em_preset_gives_all_eight_flips_and_turns() -> None:
    """``Compose.set_random_seed`` started every transform from the same seed: its two flips were always both
    done or both skipped, so half the orientations (every mirror image) never occurred in training."""
    from segsvc.data.transforms import reseed

    em = train_transform("em", ignore_index=255)
    seen = set()
    for seed in range(200):
        reseed(em, seed)
        seen.add(orientation(em(image=QUADRANTS * 60, mask=QUADRANTS)["mask"]))
    assert len(seen) == 8, sorted(seen)


def test_reseeded_street_preset_draws_scale_and_flip_independently() -> None:
    """With one seed per transform, the scale was the flip's draw again: only unflipped crops were zoomed in."""
    from segsvc.data.transforms import reseed

    street = train_transform("street", crop_hw=(64, 64), ignore_index=255)
    street.save_applied_params = True
    image, mask = np.full((96, 128, 3), 120, np.uint8), np.zeros((96, 128), np.uint8)
    zoomed_and_flipped = 0
    for seed in range(200):
        reseed(street, seed)
        applied = dict(street(image=image, mask=mask)["applied_transforms"])
        zoomed_and_flipped += "HorizontalFlip" in applied and applied["LabelScale"]["scale"] > 1.5
    assert zoomed_and_flipped > 10  # about a quarter of 200 when independent; 0 when tied


def test_a_seeded_preset_draws_its_choices_independently() -> None:
    """``train_transform(seed=...)`` is reseeded the same way (``A.Compose(seed=...)`` had the same flaw)."""
    seen = {orientation(train_transform("em", ignore_index=255, seed=seed)(image=QUADRANTS * 60,
                                                                           mask=QUADRANTS)["mask"])
            for seed in range(200)}
    assert len(seen) == 8, sorted(seen)


# -- label maps resized in register with their images ---------------------------------------------
def squares(offset: int, size: int = 96) -> np.ndarray:
    """Class 1 on a square whose edges fall at odd and even positions as ``offset`` varies."""
    labels = np.zeros((size, size), np.uint8)
    labels[20 + offset:61 + offset, 17 + offset:58 + offset] = 1
    return labels


def mean_offset(transform: A.BasicTransform) -> np.ndarray:
    """Mean (dy, dx) of the scaled mask's class-1 centroid from the scaled image's, over 12 placements."""
    offsets = []
    for offset in range(12):
        labels = squares(offset)
        out = A.Compose([transform], seed=0)(image=labels * 200, mask=labels)
        image, mask = out["image"].astype(float), out["mask"].astype(float)
        ys, xs = np.mgrid[:mask.shape[0], :mask.shape[1]]
        offsets.append([(mask * ys).sum() / mask.sum() - (image * ys).sum() / image.sum(),
                        (mask * xs).sum() / mask.sum() - (image * xs).sum() / image.sum()])
    return np.mean(offsets, axis=0)


@pytest.mark.parametrize("scale", [0.5, 0.73, 1.37, 2.0])
@pytest.mark.parametrize("area", [None, "image"])
def test_scaled_masks_stay_in_register_with_their_images(scale: float, area: str | None) -> None:
    """``INTER_NEAREST`` left masks about 0.5 output px below and right of their images (0.25 at x0.5)."""
    from segsvc.data.transforms import LabelScale

    shift = mean_offset(LabelScale(scale_limit=(scale - 1.0, scale - 1.0), area_for_downscale=area))
    assert np.abs(shift).max() < 0.06, shift


def test_the_scaling_transforms_of_the_presets_and_recipes_keep_masks_in_register() -> None:
    from training.data import rescale_transform

    street = [t for t in train_transform("street", crop_hw=(8, 8)).transforms if isinstance(t, A.RandomScale)]
    assert len(street) == 1
    for transform in (*street, rescale_transform((0.5, 0.5))):
        transform.scale_limit = (-0.5, -0.5)  # the fixed x0.5 of the CamVid recipes
        assert np.abs(mean_offset(transform)).max() < 0.06, type(transform).__name__


def test_reduced_labels_take_the_majority_and_break_ties_at_random() -> None:
    from segsvc.data.transforms import resize_labels

    rng = np.random.default_rng(0)
    majority = np.kron(np.array([[0, 2], [1, 3]], np.uint8), np.ones((4, 4), np.uint8))
    majority[0, 0] = 5  # one pixel in 16 loses its block's vote
    assert resize_labels(majority, (2, 2), rng).tolist() == [[0, 2], [1, 3]]
    halves = np.tile(np.array([[0, 1]], np.uint8), (200, 200))  # every 2x2 block is half 0, half 1
    out = resize_labels(halves, (100, 200), rng)
    assert set(np.unique(out).tolist()) == {0, 1}
    assert 0.45 < out.mean() < 0.55  # a fixed order would give one class every tie
    again = resize_labels(halves, (100, 200), np.random.default_rng(0))
    assert np.array_equal(resize_labels(halves, (100, 200), np.random.default_rng(0)), again)


def test_enlarged_labels_repeat_each_pixel_exactly() -> None:
    from segsvc.data.transforms import resize_labels

    labels = np.random.default_rng(1).integers(0, 12, (15, 20), dtype=np.uint8)
    assert np.array_equal(resize_labels(labels, (30, 40), np.random.default_rng(0)),
                          np.kron(labels, np.ones((2, 2), np.uint8)))
    wide = resize_labels(labels.astype(np.uint16) * 1000, (45, 60), np.random.default_rng(0))
    assert np.array_equal(wide, np.kron(labels.astype(np.uint16) * 1000, np.ones((3, 3), np.uint16)))


def test_a_large_reduction_still_takes_the_majority() -> None:
    """At x1/80 one source pixel is 1/6400 of an output pixel: a tie-break of fixed size would outweigh it."""
    from segsvc.data.transforms import resize_labels

    labels = np.zeros((80, 80), np.uint8)
    labels[:, :40] = 1
    labels[0, 40] = 1  # class 1 holds 3201 of the 6400 pixels
    assert [resize_labels(labels, (1, 1), np.random.default_rng(seed)).item() for seed in range(20)] == [1] * 20
