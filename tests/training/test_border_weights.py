"""The U-Net paper's border weight map and the ``weighted_ce`` loss that uses it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from torch import nn

from segsvc.config import InputSpec
from segsvc.models.artifact import load_artifact
from training.config import BorderWeightConfig, ConfigError, LossConfig, LossTerm, load_config
from training.data import TrainSamples, stack_batch
from training.losses import border_weight_function, border_weights, build_loss, unet_weight_map
from training.train import main

MEMBRANE, CELL = 0, 1
W0, SIGMA = 10.0, 5.0


def two_cells(h: int = 100, w: int = 120, gap: int = 2) -> np.ndarray:
    """Two rectangular cells side by side, separated by a ``gap``-pixel membrane, in a wide membrane margin."""
    mask = np.full((h, w), MEMBRANE, np.uint8)
    mask[38:62, 30:58] = CELL
    mask[38:62, 58 + gap : 90] = CELL
    return mask


def brute_force(mask: np.ndarray, cells: list[np.ndarray], class_weights: list[float]) -> np.ndarray:
    """The formula pixel by pixel: distances to every pixel of every cell, the two smallest."""
    ys, xs = np.indices(mask.shape)
    pixels = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.float64)
    per_cell = []
    for cell in cells:
        cy, cx = np.nonzero(cell)
        points = np.stack([cy, cx], 1).astype(np.float64)
        per_cell.append(np.sqrt(((pixels[:, None] - points[None]) ** 2).sum(-1)).min(1))
    dist = np.sort(np.stack(per_cell, 1), axis=1)
    d1, d2 = dist[:, 0], dist[:, 1]
    border = W0 * np.exp(-((d1 + d2) ** 2) / (2 * SIGMA**2))
    return np.asarray(class_weights)[mask] + border.reshape(mask.shape)


def tiny_cells() -> tuple[np.ndarray, list[np.ndarray]]:
    """Four cells of irregular shape on 13x15 px; two of them touch only at a corner (separate cells)."""
    shapes = [
        [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1)],
        [(1, 6), (2, 6), (2, 7), (2, 8), (3, 8), (4, 8)],
        [(5, 9), (6, 9), (6, 10), (6, 11), (7, 11)],  # touches the second cell diagonally at (4,8)-(5,9)
        [(9, 2), (9, 3), (10, 2), (10, 3), (10, 4), (11, 4), (11, 5), (11, 6)],
    ]
    mask = np.zeros((13, 15), np.uint8)
    cells = []
    for shape in shapes:
        cell = np.zeros_like(mask, dtype=bool)
        cell[tuple(np.array(shape).T)] = True
        mask[cell] = CELL
        cells.append(cell)
    return mask, cells


# -- the weight map ----------------------------------------------------------------------------
def test_weight_is_highest_on_the_membrane_between_two_cells() -> None:
    mask = two_cells()
    border = border_weights(mask, CELL, W0, SIGMA)
    gap = np.zeros_like(mask, dtype=bool)
    gap[38:62, 58:60] = True
    # every pixel between the cells has d1 + d2 = 3 (the gap + 1), the smallest possible
    assert border[gap] == pytest.approx(W0 * math.exp(-9 / (2 * SIGMA**2)))
    assert border.max() == pytest.approx(border[gap].min())
    other_membrane = (mask == MEMBRANE) & ~gap
    assert border[other_membrane].max() < border[gap].min() - 0.5
    # with the membrane the rarer (heavier) class, the full map peaks only there
    full = unet_weight_map(mask, [2.0, 0.5], CELL, W0, SIGMA)
    assert set(zip(*np.nonzero(full == full.max()))) == set(zip(*np.nonzero(gap)))


def test_weight_equals_the_class_weight_far_from_cells() -> None:
    mask = two_cells()
    full = unet_weight_map(mask, [2.0, 0.5], CELL, W0, SIGMA)
    assert (full[:10] == 2.0).all() and (full[:, :5] == 2.0).all()  # membrane margin, > 30 px from both cells
    assert (full[45:55, 85:90] == 0.5).all()  # the far side of the right cell: d1 + d2 >= 28 px
    assert (unet_weight_map(mask, None, CELL, W0, SIGMA)[:10] == 1.0).all()


def test_weight_map_matches_brute_force_on_a_tiny_mask() -> None:
    mask, cells = tiny_cells()
    expected = brute_force(mask, cells, [1.5, 0.7])
    ours = unet_weight_map(mask, [1.5, 0.7], CELL, W0, SIGMA)
    assert ours.dtype == np.float32 and ours.shape == mask.shape
    assert np.abs(ours - expected).max() < 1e-3  # terms below tol=1e-3 are truncated to 0
    exact = np.asarray([1.5, 0.7])[mask] + border_weights(mask, CELL, W0, SIGMA, tol=1e-12)
    assert np.allclose(exact, expected, atol=1e-5)


def test_component_cap_keeps_the_largest_cells() -> None:
    mask, cells = tiny_cells()
    largest = sorted(cells, key=lambda c: -c.sum())[:2]
    kept = brute_force(mask, largest, [0.0, 0.0])
    assert np.allclose(border_weights(mask, CELL, W0, SIGMA, max_components=2, tol=1e-12), kept, atol=1e-5)


def test_fewer_than_two_cells_or_w0_zero_give_no_border_weight() -> None:
    one = np.zeros((20, 20), np.uint8)
    one[5:10, 5:10] = CELL
    assert not border_weights(one, CELL).any()
    assert not border_weights(two_cells(), CELL, w0=0.0).any()
    with pytest.raises(ValueError, match="2-D"):
        border_weights(np.zeros((2, 3, 4)), CELL)


# -- the loss ----------------------------------------------------------------------------------
def weighted_ce_config(w0: float = W0, cell_class: int = CELL) -> LossConfig:
    return LossConfig(terms=(LossTerm("weighted_ce"),), border_weight=BorderWeightConfig(cell_class, w0, SIGMA))


def batch_of_masks() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    masks = np.stack([two_cells()[30:70, 20:100]] * 2)  # both cells and the gap between them
    masks[1, :, :5] = 2
    masks[0, :3] = 255  # void
    logits = torch.randn(2, 3, *masks.shape[1:], generator=torch.Generator().manual_seed(0))
    return logits, torch.from_numpy(masks.astype(np.int64)), masks


def test_weighted_ce_with_w0_zero_is_class_weighted_cross_entropy() -> None:
    logits, target, masks = batch_of_masks()
    weight = torch.tensor([0.5, 1.0, 2.0])
    cfg = weighted_ce_config(w0=0.0)
    border = torch.from_numpy(np.stack([border_weight_function(cfg)(m) for m in masks]))
    ours = build_loss(cfg, 3, 255, weight)(logits, target, border)
    ref = nn.CrossEntropyLoss(weight=weight, ignore_index=255)(logits, target)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    unweighted = build_loss(cfg, 3, 255)(logits, target, border)
    assert unweighted.item() == pytest.approx(nn.CrossEntropyLoss(ignore_index=255)(logits, target).item(), rel=1e-5)


def test_weighted_ce_is_the_weight_map_average_of_the_pixel_losses() -> None:
    logits, target, masks = batch_of_masks()
    weights = [0.5, 1.0, 2.0]
    cfg = weighted_ce_config()
    border = torch.from_numpy(np.stack([border_weight_function(cfg)(m) for m in masks]))
    assert border.max() > 5  # the gap between the cells is in the crop
    ours = build_loss(cfg, 3, 255, torch.tensor(weights))(logits, target, border)
    w = np.stack([unet_weight_map(m, weights, CELL, W0, SIGMA) for m in masks])
    w = torch.from_numpy(w) * (target != 255)
    ce = nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")
    assert ours.item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)


def test_weighted_ce_needs_its_weight_maps_and_a_valid_cell_class() -> None:
    logits, target, _ = batch_of_masks()
    with pytest.raises(ValueError, match="border weight map"):
        build_loss(weighted_ce_config(), 3, 255)(logits, target)
    with pytest.raises(ValueError, match="cell_class 3"):
        build_loss(weighted_ce_config(cell_class=3), 3, 255)


@pytest.mark.parametrize(
    "loss,message",
    [
        ({"terms": [{"name": "weighted_ce"}]}, "weighted_ce term needs border_weight"),
        ({"border_weight": {"cell_class": 1}}, "only used by a weighted_ce term"),
        ({"terms": [{"name": "weighted_ce"}], "border_weight": {"w0": 10}}, "cell_class: missing required key"),
        ({"terms": [{"name": "weighted_ce"}], "border_weight": {"cell_class": 1, "sigma": 0}}, "sigma > 0"),
    ],
)
def test_recipe_errors_name_the_problem(tmp_path: Path, loss: dict, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"arch": "unet"}, "data": {"spec": "synthetic"}, "loss": loss}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


# -- the data pipeline -------------------------------------------------------------------------
class OneSample:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((*self.mask.shape, 1), np.uint8), self.mask


def test_weights_follow_the_augmented_mask() -> None:
    mask = two_cells()
    mask[38:62, 58:62] = MEMBRANE  # an asymmetric gap, so the flip changes the map
    weights = border_weight_function(weighted_ce_config())
    transform = A.Compose([A.HorizontalFlip(p=1.0), A.RandomCrop(64, 96)])
    samples = TrainSamples(OneSample(mask), [0, 0], transform, InputSpec(1, (0.5,), (0.25,)), seed=0,
                           pixel_weights=weights)
    image, target, border = samples[0]
    assert border.dtype == torch.float32 and border.shape == target.shape == image.shape[1:]
    assert torch.equal(border, torch.from_numpy(weights(target.numpy())))
    assert not torch.equal(border, torch.from_numpy(weights(mask))[: 64, : 96])
    images, masks, borders = stack_batch([samples[0], samples[1]])
    assert images.shape == (2, 1, 64, 96) and masks.shape == borders.shape == (2, 64, 96)


# -- a tiny training run -----------------------------------------------------------------------
def test_one_epoch_with_weighted_ce_and_bed_of_nails_upsampling(tiny_recipe: Path) -> None:
    overrides = [
        "model.params.upsample=bed_of_nails",
        "loss.terms=[{name: weighted_ce}, {name: dice, weight: 0.5}]",
        "loss.border_weight={cell_class: 1, w0: 10, sigma: 5}",
        "loss.class_weights=median_frequency",
        "data.train_limit=8",
        "output.run_name=border",
    ]
    artifact = main(load_config(tiny_recipe, overrides))
    run_dir = Path(json.loads((artifact / "manifest.json").read_text())["training"]["run_dir"])
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train_weighted_ce"]) and math.isfinite(row["val_miou"])
    model, manifest = load_artifact(artifact)
    assert manifest.spec.params["upsample"] == "bed_of_nails"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_the_map_is_the_same_on_every_call() -> None:
    """OpenCV's precise distance transform varied by ~4e-6 between calls, so the map (and the augmented-mask
    test above) changed from run to run; the distances are now exact."""
    mask = two_cells()
    mask[38:62, 58:62] = MEMBRANE
    weights = border_weight_function(weighted_ce_config())
    crop = np.ascontiguousarray(mask[:64, :96][:, ::-1])
    first = weights(crop)
    assert all(np.array_equal(first, weights(crop.copy())) for _ in range(200))
