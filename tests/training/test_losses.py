"""Loss terms: ignore index, class weights, median-frequency balancing, weighted sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.config import LossConfig, LossTerm
from training.losses import CrossEntropy, HardPixelCrossEntropy, build_loss, class_pixel_counts, median_frequency_weights


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[:, :2] = 255
    return logits, target


def test_cross_entropy_matches_torch_with_weights_and_ignore_index():
    logits, target = batch()
    weight = torch.tensor([0.5, 1.0, 2.0])
    ours = CrossEntropy(255, weight)(logits, target)
    ref = nn.CrossEntropyLoss(weight=weight, ignore_index=255)(logits, target)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_cross_entropy_of_a_fully_void_batch_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = CrossEntropy(255)(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz", "ohem"])
def test_every_term_of_a_fully_void_batch_is_a_zero_scalar(name):
    """One all-void crop must not end a run: focal gave NaN (check_finite then raised) and lovasz an empty
    (0, C) tensor that backward() refused, even beside ce."""
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = build_loss(LossConfig(terms=(LossTerm("ce"), LossTerm(name))), 3, 255)(logits, torch.full((2, 8, 8), 255))
    loss.backward()
    assert loss.shape == () and loss.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz", "ohem"])
def test_every_term_ignores_void_pixels(name):
    logits, target = batch()
    loss = build_loss(LossConfig(terms=(LossTerm(name),)), 3, 255)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn_like(changed[:, :, :2]) * 10  # only where the target is void
    a, b = loss(logits, target), loss(changed, target)
    assert torch.isfinite(a)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


def test_ohem_is_the_weighted_mean_over_the_hardest_counted_pixels():
    logits, target = batch(3)
    weight = torch.tensor([0.5, 1.0, 2.0])
    per_pixel = nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=255, reduction="none")
    counted = (target != 255).flatten()
    losses, labels = per_pixel.flatten()[counted], target.flatten()[counted]
    k = -(-counted.sum().item() // 4)  # keep 0.25, rounded up
    hard = losses.argsort(descending=True)[:k]
    expected = losses[hard].sum() / weight[labels[hard]].sum()
    assert HardPixelCrossEntropy(255, weight, keep=0.25)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    # keeping every pixel is plain cross-entropy; a fully void batch is 0, not NaN
    assert HardPixelCrossEntropy(255, weight, keep=1.0)(logits, target).item() == pytest.approx(
        CrossEntropy(255, weight)(logits, target).item(), rel=1e-5)
    assert HardPixelCrossEntropy(255)(logits, torch.full_like(target, 255)).item() == 0.0


def test_ohem_keep_must_be_a_fraction():
    with pytest.raises(ValueError, match="ohem_keep"):
        LossConfig(terms=(LossTerm("ohem"),), ohem_keep=0.0)
    with pytest.raises(ValueError, match="fraction"):
        HardPixelCrossEntropy(255, keep=1.5)


def test_weighted_sum_is_the_sum_of_weighted_terms():
    logits, target = batch(1)
    cfg = LossConfig(terms=(LossTerm("ce", 1.0), LossTerm("dice", 0.5), LossTerm("lovasz", 0.25)))
    total = build_loss(cfg, 3, 255)(logits, target)
    parts = [build_loss(LossConfig(terms=(LossTerm(n),)), 3, 255)(logits, target) for n in ("ce", "dice", "lovasz")]
    assert total.item() == pytest.approx(parts[0].item() + 0.5 * parts[1].item() + 0.25 * parts[2].item(), rel=1e-5)


def test_perfect_logits_give_lower_loss_than_random():
    _, target = batch(2)
    one_hot = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    perfect = (2 * one_hot - 1) * 20  # smp's focal loss is one-vs-rest (sigmoid per class)
    cfg = LossConfig(terms=(LossTerm("ce"), LossTerm("dice"), LossTerm("focal"), LossTerm("lovasz")))
    loss = build_loss(cfg, 3, 255)
    assert loss(perfect, target).item() < 0.05 < loss(torch.randn_like(perfect), target).item()


def test_median_frequency_weights_by_hand():
    # image 1: 6 px of class 0, 2 px of class 1; image 2: 4 px class 0, 4 px class 2 (+ void)
    masks = [np.array([0, 0, 0, 0, 0, 0, 1, 1]), np.array([0, 0, 0, 0, 2, 2, 2, 2, 255, 255])]
    class_pixels, image_pixels = class_pixel_counts(masks, 4)
    assert class_pixels.tolist() == [10, 2, 4, 0]
    assert image_pixels.tolist() == [16, 8, 8, 0]  # void pixels not counted
    weights = median_frequency_weights(class_pixels, image_pixels)
    freq = np.array([10 / 16, 2 / 8, 4 / 8])  # median 0.5
    assert weights.tolist() == pytest.approx([*(0.5 / freq), 0.0])


def test_median_frequency_needs_labelled_pixels():
    with pytest.raises(ValueError, match="no labelled pixels"):
        median_frequency_weights(np.zeros(3, np.int64), np.zeros(3, np.int64))


def test_class_weight_count_must_match():
    with pytest.raises(ValueError, match="class weights"):
        build_loss(LossConfig(), 3, 255, torch.ones(4))
