"""Segmentation metrics from one confusion matrix.

Every figure the trainer and ``segsvc eval`` report comes from the same
``ConfusionMatrix`` (torchvision ``references/segmentation/utils.py``): pixels
whose target is the ignore index are dropped before counting, and classes that
never occur in the targets nor the predictions are left out of the means (NaN
per class) instead of counting as 0 or 1. ``isbi_metrics`` adds the membrane figures:
the share of wrong pixels, the ISBI 2012 EM challenge's pixel error (1 - F-score of the
non-membrane pixels, which is another number) and the membrane class's IoU.
``BoundaryErrors`` says how many of the wrong pixels lie on a label boundary's band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from segsvc.errors import InvalidArgument


@dataclass(frozen=True)
class SegmentationMetrics:
    """Summary of a confusion matrix; per-class lists hold NaN for absent classes.

    ``pixel_accuracy`` is the global accuracy (correct / counted pixels);
    ``mean_class_accuracy`` the mean per-class recall; ``miou`` the mean
    intersection-over-union; ``mean_dice`` the mean per-class F1.
    """

    pixel_accuracy: float
    mean_class_accuracy: float
    miou: float
    mean_dice: float
    iou: list[float]
    class_accuracy: list[float]
    dice: list[float]
    pixels: int

    @property
    def pixel_error(self) -> float:
        """``1 - pixel_accuracy``: the share of wrong pixels among the labelled ones.

        For binary labels this is the mean squared difference the challenge's Fiji script also computes, but not
        the pixel error its leaderboard ranks (``isbi_pixel_error``).
        """
        return 1.0 - self.pixel_accuracy

    def to_dict(self, class_names: list[str] | None = None) -> dict[str, object]:
        """JSON-friendly dict; NaN becomes ``None`` and per-class values are keyed by name."""
        names = class_names or [str(i) for i in range(len(self.iou))]

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {
            "pixel_accuracy": clean(self.pixel_accuracy),
            "mean_class_accuracy": clean(self.mean_class_accuracy),
            "miou": clean(self.miou),
            "mean_dice": clean(self.mean_dice),
            "per_class_iou": {n: clean(v) for n, v in zip(names, self.iou)},
            "per_class_accuracy": {n: clean(v) for n, v in zip(names, self.class_accuracy)},
            "per_class_dice": {n: clean(v) for n, v in zip(names, self.dice)},
            "pixels": self.pixels,
        }


class ConfusionMatrix:
    """Accumulates a ``K x K`` confusion matrix (rows: target, columns: prediction).

    Args:
        num_classes: number of classes ``K``.
        ignore_index: target value that marks void/padding pixels; they are not counted.

    Example:
        >>> cm = ConfusionMatrix(2, ignore_index=255)
        >>> cm.update(torch.tensor([[0, 1, 255]]), torch.tensor([[0, 0, 1]]))
        >>> cm.mat.tolist()
        [[1, 0], [1, 0]]
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Count one batch of integer label maps of equal shape."""
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
        n = self.num_classes
        target = target.reshape(-1).to(torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        keep = (target >= 0) & (target < n)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        bad = pred[keep]
        if bad.numel() and (bad.min() < 0 or bad.max() >= n):
            raise ValueError(f"predictions must lie in [0, {n}), got values up to {int(bad.max())}")
        counts = torch.bincount(n * target[keep] + pred[keep], minlength=n * n)
        self.mat += counts.reshape(n, n).to(self.mat.device)

    def reset(self) -> None:
        self.mat.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks of the default process group (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            mat = self.mat.to(device)
            dist.all_reduce(mat)
            self.mat = mat.cpu()

    def compute(self) -> SegmentationMetrics:
        return metrics_from_confusion(self.mat)


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if bool(valid.any()) else float("nan")


def metrics_from_confusion(mat: torch.Tensor) -> SegmentationMetrics:
    """Compute every reported metric from a confusion matrix (rows: target, columns: prediction).

    A class with no target pixels has undefined accuracy (NaN); a class that is
    neither in the targets nor the predictions has undefined IoU and Dice (NaN).
    A class predicted but absent from the targets gets IoU 0: those pixels are
    real mistakes.
    """
    m = mat.to(torch.float64)
    tp = torch.diag(m)
    target_sum = m.sum(dim=1)
    pred_sum = m.sum(dim=0)
    union = target_sum + pred_sum - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    total = m.sum()
    class_acc = torch.where(target_sum > 0, tp / target_sum.clamp(min=1), nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    denom = target_sum + pred_sum
    dice = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), nan)
    return SegmentationMetrics(
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_class_accuracy=_nanmean(class_acc),
        miou=_nanmean(iou),
        mean_dice=_nanmean(dice),
        iou=iou.tolist(),
        class_accuracy=class_acc.tolist(),
        dice=dice.tolist(),
        pixels=int(total),
    )


def require_counted(metrics: SegmentationMetrics, where: str, ignore_index: int | None) -> SegmentationMetrics:
    """``metrics`` when they counted a pixel; else ``InvalidArgument`` naming ``where`` (a split) and why.

    A split whose masks are all void (or hold only values that are no class) counts nothing: every figure
    is NaN, which ``segsvc eval`` would print as a result and the trainer would rank as a validation.

    Example:
        >>> require_counted(metrics_from_confusion(torch.tensor([[1]])), "split 'val' of d", 255).pixels
        1
    """
    if metrics.pixels > 0:
        return metrics
    raise nothing_counted(where, ignore_index, len(metrics.iou))


def nothing_counted(where: str, ignore_index: int | None, num_classes: int) -> InvalidArgument:
    """The error of a split that counted no pixel (``require_counted``)."""
    void = f"void (ignore_index {ignore_index})" if ignore_index is not None else "void"
    return InvalidArgument(f"{where} counted no pixel: every mask pixel is {void} or no class index "
                           f"(0..{num_classes - 1}), so there is nothing to measure: check its masks "
                           "(segsvc data check) or choose a labelled split")


class BoundaryErrors:
    """Counts the wrong pixels on the band within ``band_px`` of a ground-truth label boundary, and off it.

    A boundary pixel has a 4-neighbour with another target value (void included: the edge of a labelled
    region is a boundary); the band holds every pixel within ``band_px`` of one (Chebyshev distance).
    Pixels are counted as by ``ConfusionMatrix`` (void and out-of-range targets left out). Wrong pixels
    in the band are boundary placement (a membrane a pixel wider or narrower than annotated); wrong
    pixels off it are structure missed or invented.

    Example:
        >>> be = BoundaryErrors(num_classes=2, ignore_index=255)
        >>> be.update(torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1, 1, 0]]))
        >>> be.to_dict()
        {'band_px': 1, 'band_pixels': 0.666667, 'errors_in_band': 0.5, 'pixel_error_off_band': 0.5}
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, band_px: int = 1) -> None:
        if band_px < 0:
            raise ValueError(f"band_px must be at least 0, got {band_px}")
        self.num_classes, self.ignore_index, self.band_px = num_classes, ignore_index, band_px
        self.pixels = self.band = self.wrong = self.wrong_in_band = 0

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Count one ``H x W`` label map against its target."""
        if target.dim() != 2 or target.shape != pred.shape:
            raise ValueError(f"expected two H x W maps of one shape, got {tuple(target.shape)} and {tuple(pred.shape)}")
        target = target.to(torch.int64)
        edge = torch.zeros(target.shape, dtype=torch.bool)
        rows, cols = target[1:] != target[:-1], target[:, 1:] != target[:, :-1]
        edge[1:] |= rows
        edge[:-1] |= rows
        edge[:, 1:] |= cols
        edge[:, :-1] |= cols
        k = 2 * self.band_px + 1
        band = F.max_pool2d(edge[None, None].float(), k, stride=1, padding=self.band_px)[0, 0] > 0
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        wrong = keep & (pred.to(torch.int64) != target)
        self.pixels += int(keep.sum())
        self.band += int((keep & band).sum())
        self.wrong += int(wrong.sum())
        self.wrong_in_band += int((wrong & band).sum())

    def to_dict(self) -> dict[str, object]:
        """``band_pixels``: the band's share of the counted pixels; ``errors_in_band``: the share of the wrong
        pixels that lie in it; ``pixel_error_off_band``: the pixel error of the pixels off it (NaN: None)."""
        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 6) if b else None

        return {"band_px": self.band_px, "band_pixels": ratio(self.band, self.pixels),
                "errors_in_band": ratio(self.wrong_in_band, self.wrong),
                "pixel_error_off_band": ratio(self.wrong - self.wrong_in_band, self.pixels - self.band)}


def membrane_class(class_names: Sequence[str]) -> int | None:
    """The index of the one class named like membrane (``membrane``, ``Membranes``, ``cell_membrane``), else None."""
    found = [i for i, name in enumerate(class_names) if "membrane" in name.lower()]
    return found[0] if len(found) == 1 else None


def isbi_pixel_error(metrics: SegmentationMetrics, class_names: Sequence[str]) -> float | None:
    """The ISBI 2012 challenge's pixel error of these labels: 1 - F-score of the non-membrane pixels.

    The challenge defines its pixel error as "1 - the maximal F-score of pixel similarity" (its evaluation page,
    brainiac2.mit.edu/isbi_challenge/evaluation). Its Fiji script (Trainable Weka Segmentation's
    ``PixelError.getPixelErrorMaximalFScore``) counts a pixel as positive where the label is non-zero, which in
    the ISBI labels is cell interior, thresholds a submitted probability map at 0.0, 0.1, ... 1.0 and keeps the
    best F-score. Label maps give one threshold, so this is the challenge's figure for the labels a client gets;
    a search over thresholds could only lower it. F-score of a class is its Dice, so this is
    ``1 - dice[non-membrane]`` (NaN when no pixel was counted). None unless there are two classes and one is
    named like membrane.

    Example (8 labelled pixels: 4 cell pixels found, 2 membrane pixels taken for cell, none missed):
        >>> m = metrics_from_confusion(torch.tensor([[2, 2], [0, 4]]))
        >>> round(isbi_pixel_error(m, ["membrane", "cell"]), 6), m.pixel_error
        (0.2, 0.25)
    """
    k = membrane_class(class_names)
    if k is None or len(class_names) != 2 or len(metrics.dice) != 2:
        return None
    return 1.0 - metrics.dice[1 - k]


def isbi_metrics(metrics: SegmentationMetrics, class_names: Sequence[str]) -> dict[str, object]:
    """``pixel_error`` (the share of wrong pixels); when a class is named like membrane, also ``membrane_class``
    and ``membrane_iou``, and with two classes the challenge's ``isbi_pixel_error`` (1 - F).

    JSON-friendly like ``to_dict`` (NaN becomes ``None``).

    Example:
        >>> m = metrics_from_confusion(torch.tensor([[3, 1], [0, 4]]))
        >>> isbi_metrics(m, ["membrane", "cell"])
        {'pixel_error': 0.125, 'isbi_pixel_error': 0.111111, 'membrane_class': 'membrane', 'membrane_iou': 0.75}
    """
    out: dict[str, object] = {"pixel_error": _clean(metrics.pixel_error)}
    challenge = isbi_pixel_error(metrics, class_names)
    if challenge is not None:
        out["isbi_pixel_error"] = _clean(challenge)
    k = membrane_class(class_names)
    if k is not None and k < len(metrics.iou):
        out.update(membrane_class=class_names[k], membrane_iou=_clean(metrics.iou[k]))
    return out


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def format_table(metrics: SegmentationMetrics, class_names: list[str], isbi: bool = False) -> str:
    """A plain-text table: one row per class, then the summary figures.

    ``isbi`` adds the share of wrong pixels and, when a class is named like membrane, the challenge's pixel error
    (two classes) and the membrane IoU (``isbi_metrics``).
    """

    def pct(x: float) -> str:
        return "   -  " if math.isnan(x) else f"{100 * x:6.2f}"

    width = max([len("class")] + [len(n) for n in class_names])
    lines = [f"{'class':<{width}}    IoU    Acc   Dice"]
    for name, iou, acc, dice in zip(class_names, metrics.iou, metrics.class_accuracy, metrics.dice):
        lines.append(f"{name:<{width}} {pct(iou)} {pct(acc)} {pct(dice)}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'global pixel accuracy':<28} {pct(metrics.pixel_accuracy)}")
    lines.append(f"{'mean class accuracy':<28} {pct(metrics.mean_class_accuracy)}")
    lines.append(f"{'mIoU':<28} {pct(metrics.miou)}")
    lines.append(f"{'mean Dice':<28} {pct(metrics.mean_dice)}")
    if isbi:
        lines.append(f"{'pixel error (wrong pixels)':<28} {pct(metrics.pixel_error)}")
        k = membrane_class(class_names)
        challenge = isbi_pixel_error(metrics, class_names)
        if challenge is not None:
            lines.append(f"{'ISBI pixel error (1 - F)':<28} {pct(challenge)}")
        if k is not None and k < len(metrics.iou):
            lines.append(f"{'membrane IoU (' + class_names[k] + ')':<28} {pct(metrics.iou[k])}")
    lines.append(f"{'pixels counted':<28} {metrics.pixels}")
    return "\n".join(lines)
