"""Training losses: cross-entropy, Dice, Focal and Lovasz, and weighted sums of them.

Dice, Focal and Lovasz come from ``segmentation_models_pytorch.losses`` (its
focal loss is one-vs-rest: a sigmoid focal term per class channel). Every
term skips pixels labelled with the ignore index, and every term is computed in
float32 even when the forward pass ran under autocast. ``weighted_ce`` is the
U-Net paper's weighted cross-entropy: its per-pixel border weights are computed
from each augmented training mask by ``border_weights`` (in the data loader,
``training.data.TrainSamples``) and passed to the loss with the batch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn
from tqdm import tqdm

from training.config import BorderWeightConfig, LossConfig


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


class HardPixelCrossEntropy(CrossEntropy):
    """Online hard example mining (Shrivastava et al., CVPR 2016, per pixel as in semantic segmentation):
    cross-entropy over the ``keep`` fraction of a batch's counted pixels with the highest loss.

    Easy pixels (most of the road and sky) stop contributing once learnt, so a short
    budget is spent on the hard ones: thin classes and object borders. Class weights
    and label smoothing apply as in ``CrossEntropy``; the value is the weighted mean
    over the kept pixels. ``keep=1`` is plain ``CrossEntropy``.
    """

    def __init__(
        self, ignore_index: int | None = 255, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
        keep: float = 0.25,
    ) -> None:
        super().__init__(ignore_index, weight, label_smoothing)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"the ohem term keeps a fraction of the pixels in (0, 1], got {keep}")
        self.keep = keep

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction="none", label_smoothing=self.label_smoothing,
        ).flatten()
        valid = (target != self.ignore_index).flatten()
        counted = int(valid.sum())
        if counted == 0:
            return per_pixel.sum() * 0.0
        k = max(1, math.ceil(self.keep * counted))
        # ignored pixels have loss 0 and must never be picked before a counted one
        ranked = torch.where(valid, per_pixel.detach(), torch.full_like(per_pixel, -1.0))
        hard = ranked.topk(k, sorted=False).indices
        if self.weight is None:
            denom = torch.tensor(float(k), device=per_pixel.device)
        else:
            denom = self.weight[target.flatten()[hard].clamp(0, len(self.weight) - 1)].sum()
        return per_pixel[hard].sum() / denom.clamp(min=1e-12)


class BorderWeightedCrossEntropy(CrossEntropy):
    """Cross-entropy weighted per pixel by the U-Net paper's ``w(x) = w_c(x) + border(x)``.

    ``w_c`` is the class weight of the pixel's label (1 without class weights)
    and ``border`` the map ``border_weights`` computed from the training mask.
    The value is ``sum(w * ce) / sum(w)`` over the counted pixels, so with
    ``border = 0`` it equals ``CrossEntropy(ignore_index, weight)``. Label
    smoothing, if any, smooths the unweighted per-pixel term before weighting.
    Its settings are ``CrossEntropy``'s.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor, border: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        per_pixel = F.cross_entropy(
            logits, target, ignore_index=self.ignore_index, reduction="none", label_smoothing=self.label_smoothing
        )
        valid = target != self.ignore_index
        class_weight = 1.0 if self.weight is None else self.weight[target.clamp(0, len(self.weight) - 1)]
        weight = (class_weight + border.float()) * valid
        return (per_pixel * weight).sum() / weight.sum().clamp(min=1e-12)


class WeightedSum(nn.Module):
    """``sum_i weight_i * term_i(logits, target)``; ``last_terms`` keeps each term's value for logging.

    ``border`` (``[N, H, W]``, the batch's border weight maps) goes to the ``weighted_ce`` term.
    """

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a loss needs at least one term")
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([module for _, _, module in terms])
        self.last_terms: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, border: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        total = logits.new_zeros(())
        parts = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            if isinstance(term, BorderWeightedCrossEntropy):
                if border is None:
                    raise ValueError(
                        "the weighted_ce term needs the border weight map of every training mask: "
                        "build TrainSamples with pixel_weights=border_weight_function(loss config)"
                    )
                value = term(logits, target, border)
            else:
                value = term(logits, target)
            parts[name] = value.detach()
            total = total + weight * value
        self.last_terms = parts  # tensors; converted to floats only when logged
        return total


class CountedPixelsOnly(nn.Module):
    """A term that is 0 (a scalar, with zero gradients) on a batch whose pixels are all ``ignore_index``.

    smp's terms do not guard that case: FocalLoss averages over no pixel (NaN, which ``check_finite`` then
    turns into a failed run) and LovaszLoss returns an empty ``(0, C)`` tensor; one all-void crop is enough.
    """

    def __init__(self, term: nn.Module, ignore_index: int | None) -> None:
        super().__init__()
        self.term, self.ignore_index = term, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_index is not None and not bool((target != self.ignore_index).any()):
            return logits.sum() * 0.0
        return self.term(logits, target)


def build_loss(
    cfg: LossConfig,
    num_classes: int,
    ignore_index: int | None,
    class_weights: torch.Tensor | None = None,
) -> WeightedSum:
    """Build the configured weighted sum; ``class_weights`` (one per class) feed CE, weighted CE and Focal."""
    if class_weights is not None and class_weights.numel() != num_classes:
        raise ValueError(f"got {class_weights.numel()} class weights for {num_classes} classes")
    if cfg.border_weight is not None and not 0 <= cfg.border_weight.cell_class < num_classes:
        raise ValueError(f"loss.border_weight.cell_class {cfg.border_weight.cell_class} is not one of the "
                         f"{num_classes} classes")
    weights_list = class_weights.tolist() if class_weights is not None else None
    factories: dict[str, Callable[[], nn.Module]] = {
        "ce": lambda: CrossEntropy(ignore_index, class_weights, cfg.label_smoothing),
        "dice": lambda: CountedPixelsOnly(smp_losses.DiceLoss("multiclass", ignore_index=ignore_index), ignore_index),
        "focal": lambda: CountedPixelsOnly(smp_losses.FocalLoss(
            "multiclass", gamma=cfg.focal_gamma, ignore_index=ignore_index, class_weights=weights_list
        ), ignore_index),
        "lovasz": lambda: CountedPixelsOnly(smp_losses.LovaszLoss("multiclass", ignore_index=ignore_index),
                                            ignore_index),
        "ohem": lambda: HardPixelCrossEntropy(ignore_index, class_weights, cfg.label_smoothing, cfg.ohem_keep),
        "weighted_ce": lambda: BorderWeightedCrossEntropy(ignore_index, class_weights, cfg.label_smoothing),
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


# -- the U-Net paper's border weights -----------------------------------------------------
def border_weights(
    mask: np.ndarray,
    cell_class: int,
    w0: float = 10.0,
    sigma: float = 5.0,
    max_components: int = 1024,
    tol: float = 1e-3,
) -> np.ndarray:
    """The border term ``w0 * exp(-(d1 + d2)**2 / (2 * sigma**2))`` of the U-Net weight map (float32, mask's shape).

    Ronneberger et al. 2015, eq. 2: ``d1``/``d2`` are the Euclidean distances
    to the nearest and second-nearest cell, the cells being the 4-connected
    components of ``cell_class`` (4-connected, so a one-pixel diagonal membrane
    still separates two cells). Inside a cell ``d1 = 0``. With fewer than two
    cells ``d2`` is infinite and the term is 0 everywhere.

    Cost: one exact distance transform (``cv2.DIST_MASK_PRECISE``) per cell,
    restricted to the cell's bounding box grown by ``R = sigma * sqrt(2 ln(w0 / tol))``
    pixels (21.5 px for the paper's ``w0=10, sigma=5``): beyond ``R`` from its
    second-nearest cell a pixel's term is below ``tol`` and is set to 0. The two
    smallest distances are kept by a running minimum over the cells, so memory is
    two float maps whatever the number of cells, and time is about
    ``sum over cells of (box + 2R)**2`` pixel operations; at most
    ``max_components`` cells count (the largest: specks of a noisy mask are dropped first).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"border_weights expects a 2-D label mask, got shape {mask.shape}")
    h, w = mask.shape
    out = np.zeros((h, w), np.float32)
    if w0 <= tol:
        return out
    radius = sigma * math.sqrt(2.0 * math.log(w0 / tol))
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == cell_class).astype(np.uint8), connectivity=4)
    cells = np.arange(1, n)  # label 0 is everything that is not a cell
    if len(cells) < 2:
        return out
    if len(cells) > max_components:
        cells = cells[np.argsort(-stats[cells, cv2.CC_STAT_AREA], kind="stable")[:max_components]]
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    grow = int(math.ceil(radius)) + 1
    for k in cells:
        x, y, bw, bh = stats[k, :4]
        window = (slice(max(y - grow, 0), min(y + bh + grow, h)), slice(max(x - grow, 0), min(x + bw + grow, w)))
        # distance of every window pixel to cell k (its zeros); exact, as cell k lies inside the window
        d = cv2.distanceTransform((labels[window] != k).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        # OpenCV's "precise" result wobbles by ~4e-6 from call to call (5.0.0); the true distance is
        # sqrt(integer), so snapping the square makes it exact and the map the same on every call.
        d = np.sqrt(np.rint(d * d))
        near, second = d1[window], d2[window]
        np.minimum(second, np.maximum(near, d), out=second)
        np.minimum(near, d, out=near)
    total = d1 + d2
    close = total <= radius  # far pixels stay 0 (their term is below tol)
    out[close] = w0 * np.exp(-(total[close] ** 2) / (2.0 * sigma**2))
    return out


def unet_weight_map(
    mask: np.ndarray, class_weights: np.ndarray | None, cell_class: int, w0: float = 10.0, sigma: float = 5.0,
    max_components: int = 1024,
) -> np.ndarray:
    """The paper's full map ``w(x) = w_c(x) + border(x)``; ``weighted_ce`` computes this from the batch.

    ``class_weights`` gives ``w_c`` per class (``None``: 1); labels outside it (void) get ``w_c = 0``.
    """
    mask = np.asarray(mask)
    if class_weights is None:
        wc = np.ones(mask.shape, np.float32)
    else:
        table = np.asarray(class_weights, np.float32)
        valid = (mask >= 0) & (mask < len(table))
        wc = np.where(valid, table[np.clip(mask, 0, len(table) - 1)], 0.0).astype(np.float32)
    return wc + border_weights(mask, cell_class, w0, sigma, max_components)


def border_weight_function(cfg: LossConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """What ``TrainSamples`` applies to every augmented mask: the border term, or None without ``weighted_ce``."""
    border: BorderWeightConfig | None = cfg.border_weight
    if border is None:
        return None
    return partial(border_weights, cell_class=border.cell_class, w0=border.w0, sigma=border.sigma,
                   max_components=border.max_components)
