"""Training losses: cross-entropy, Dice, Focal and Lovasz, and weighted sums of them.

Dice, Focal and Lovasz come from ``segmentation_models_pytorch.losses`` (its
focal loss is one-vs-rest: a sigmoid focal term per class channel). Every
term skips pixels labelled with the ignore index, and every term is computed in
float32 even when the forward pass ran under autocast.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn
from tqdm import tqdm

from training.config import LossConfig


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy with ignore index and class weights.

    Unlike ``nn.CrossEntropyLoss`` it returns 0 (not NaN) for a batch whose
    pixels are all ignored, so a fully void crop cannot poison the weights.
    The value otherwise equals ``nn.CrossEntropyLoss(weight, ignore_index)``:
    the weighted sum divided by the sum of the weights of the counted pixels.
    """

    def __init__(
        self, ignore_index: int | None = 255, weight: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight.float() if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction="none", label_smoothing=self.label_smoothing,
        )
        valid = target != self.ignore_index
        if self.weight is None:
            denom = valid.sum()
        else:
            denom = self.weight[target.clamp(0, len(self.weight) - 1)].mul(valid).sum()
        return per_pixel.sum() / denom.clamp(min=1e-12)


class WeightedSum(nn.Module):
    """``sum_i weight_i * term_i(logits, target)``; ``last_terms`` keeps each term's value for logging."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a loss needs at least one term")
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([module for _, _, module in terms])
        self.last_terms: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        total = logits.new_zeros(())
        parts = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            value = term(logits, target)
            parts[name] = value.detach()
            total = total + weight * value
        self.last_terms = parts  # tensors; converted to floats only when logged
        return total


def build_loss(
    cfg: LossConfig,
    num_classes: int,
    ignore_index: int | None,
    class_weights: torch.Tensor | None = None,
) -> WeightedSum:
    """Build the configured weighted sum; ``class_weights`` (one per class) feed CE and Focal."""
    if class_weights is not None and class_weights.numel() != num_classes:
        raise ValueError(f"got {class_weights.numel()} class weights for {num_classes} classes")
    weights_list = class_weights.tolist() if class_weights is not None else None
    factories: dict[str, Callable[[], nn.Module]] = {
        "ce": lambda: CrossEntropy(ignore_index, class_weights, cfg.label_smoothing),
        "dice": lambda: smp_losses.DiceLoss("multiclass", ignore_index=ignore_index),
        "focal": lambda: smp_losses.FocalLoss(
            "multiclass", gamma=cfg.focal_gamma, ignore_index=ignore_index, class_weights=weights_list
        ),
        "lovasz": lambda: smp_losses.LovaszLoss("multiclass", ignore_index=ignore_index),
    }
    return WeightedSum([(t.name, t.weight, factories[t.name]()) for t in cfg.terms])


def class_pixel_counts(
    masks: Iterable[np.ndarray], num_classes: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: pixels of that class, and pixels of the images that contain it (void not counted)."""
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    for mask in tqdm(masks, desc="class frequencies", disable=not progress, leave=False):
        labels = np.asarray(mask).reshape(-1).astype(np.int64)
        labels = labels[(labels >= 0) & (labels < num_classes)]
        counts = np.bincount(labels, minlength=num_classes)
        class_pixels += counts
        image_pixels += np.where(counts > 0, labels.size, 0)
    return class_pixels, image_pixels


def median_frequency_weights(class_pixels: np.ndarray, image_pixels: np.ndarray) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus, ICCV 2015; SegNet's CamVid weights).

    ``freq(c)`` = pixels of class c / pixels of the images where c is present;
    ``weight(c) = median(freq) / freq(c)``. Classes never seen get weight 0
    (nothing to learn from, and no division by zero).
    """
    present = (class_pixels > 0) & (image_pixels > 0)
    if not present.any():
        raise ValueError("no labelled pixels: cannot compute median-frequency class weights")
    freq = np.zeros(len(class_pixels), dtype=np.float64)
    freq[present] = class_pixels[present] / image_pixels[present]
    median = np.median(freq[present])
    weights = np.zeros_like(freq)
    weights[present] = median / freq[present]
    return torch.tensor(weights, dtype=torch.float32)
