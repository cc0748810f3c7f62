"""``data.register``: the label offset is measured on the training split, removed in training, and published."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segsvc.cli import main as segsvc_main
from segsvc.config import InputSpec
from segsvc.data.registration import shift_image
from segsvc.data.transforms import preprocess
from segsvc.errors import InvalidArgument
from segsvc.models.artifact import read_manifest
from tests.data.helpers import image_of, membranes
from training.config import load_config
from training.data import TrainSamples
from training.train import main as train_main

OFFSET = (0.5, 0.25)  # the images show every membrane this far below and right of its label


@pytest.fixture(scope="module")
def offset_membranes(tmp_path_factory) -> Path:
    """A grey [membrane, cell] data set of 6 slices whose labels are drawn OFFSET away from the image's membranes."""
    root = tmp_path_factory.mktemp("offset-membranes")
    for split, seeds in (("train", range(4)), ("val", range(4, 6))):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True)
        for seed in seeds:
            mask = membranes(seed, size=64)
            cv2.imwrite(str(root / split / "images" / f"{seed}.png"), image_of(mask, OFFSET, seed=seed))
            cv2.imwrite(str(root / split / "masks" / f"{seed}.png"), np.where(mask == 1, 0, 1).astype(np.uint8))
    spec = root / "offset-membranes.yaml"
    spec.write_text(f"name: offset-membranes\nformat: folder\nroot: {root}\nchannels: 1\nclasses: [membrane, cell]\n"
                    "ignore_index: 255\nsplits:\n  train: {images: train/images, masks: train/masks}\n"
                    "  val: {images: val/images, masks: val/masks}\n")
    return spec


def test_a_run_with_data_register_trains_on_shifted_images_and_publishes_the_shift(
    tmp_path, make_recipe, offset_membranes, capsys
):
    recipe = make_recipe(tmp_path)
    cfg = load_config(recipe, [f"data.spec={offset_membranes}", "data.preset=em", "data.register=membrane"])
    artifact = train_main(cfg)
    dy, dx = read_manifest(artifact).inference.shift
    assert dy == pytest.approx(-OFFSET[0], abs=0.1) and dx == pytest.approx(-OFFSET[1], abs=0.1)
    assert f"data.register: the membrane labels are offset by ({dy:+.2f}, {dx:+.2f}) px" in capsys.readouterr().err
    # `segsvc eval` runs the published contract, shift included, and measures what validation measured
    out = tmp_path / "eval"
    assert segsvc_main(["eval", "--model", str(artifact), "--data", str(offset_membranes), "--out", str(out),
                        "--no-progress", "--device", "cpu", "--samples", "0"]) == 0
    assert f"inputs shifted by ({dy:+.2f}, {dx:+.2f}) px (manifest)]" in capsys.readouterr().out
    measured = json.loads((out / "metrics.json").read_text())["metrics"]
    assert measured["miou"] == pytest.approx(read_manifest(artifact).metrics["miou"], abs=1e-6)
    plain = train_main(load_config(recipe, [f"data.spec={offset_membranes}", "data.preset=em"]))
    assert read_manifest(plain).inference.shift == (0.0, 0.0)  # only when asked


def test_data_register_must_name_a_class_of_the_dataset(tmp_path, make_recipe, offset_membranes):
    cfg = load_config(make_recipe(tmp_path), [f"data.spec={offset_membranes}", "data.register=membranes"])
    with pytest.raises(InvalidArgument, match="names class 'membranes'; offset-membranes has membrane, cell"):
        train_main(cfg)


def test_training_samples_are_shifted_before_augmentation():
    image = image_of(membranes(1, size=32), (0.0, 0.0))

    class OneSample:
        def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            return image, np.zeros(image.shape, np.int64)

    spec = InputSpec.default_for(1)
    item, _ = TrainSamples(OneSample(), [0], None, spec, seed=0, shift=(-0.5, 0.25))[0]
    assert torch.equal(item, preprocess(shift_image(image, (-0.5, 0.25)), spec))
    assert not torch.equal(item, preprocess(image, spec))


def test_training_samples_are_mirrored_as_well_as_turned():
    """Each item is reseeded by position; with ``set_random_seed`` the ``em`` preset's flips were one coin,
    so no training sample was ever a mirror image of its slice."""
    from segsvc.data.transforms import train_transform
    from tests.data.test_transforms import QUADRANTS, orientation

    class Quadrants:
        def read(self, index: int):  # type: ignore[no-untyped-def]
            return np.repeat((QUADRANTS * 60)[..., None], 3, axis=2), QUADRANTS

    samples = TrainSamples(Quadrants(), [0] * 100, train_transform("em", ignore_index=255),
                           InputSpec(3, (0.5,) * 3, (0.25,) * 3), seed=0)
    seen = set()
    for epoch in range(2):
        samples.set_epoch(epoch)
        seen.update(orientation(samples[i][1].numpy()) for i in range(len(samples)))
    assert len(seen) == 8, sorted(seen)
