"""Pictures of a run: the training curve and the evaluation report (matplotlib, Agg backend).

Rendering happens after the numbers are saved, so a plotting problem can never
lose a metric. Each picture is rendered in memory and replaces its file in one
rename (``segsvc.files.write_atomic``): a run killed while it draws leaves the
previous picture, never half of one.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from segsvc.files import write_atomic  # noqa: E402


def plot_training_curve(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss (left) and validation mIoU / pixel accuracy (right) against epochs."""
    return save_figure(training_curve_figure(history, title), path, dpi=100)


def training_curve_figure(history: Sequence[dict[str, Any]], title: str = "") -> Any:
    """The figure of ``plot_training_curve`` (the caller closes it)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", ms=3, label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    val = [h for h in history if h.get("val_miou") is not None]
    if val:
        ax_val.plot([h["epoch"] for h in val], [h["val_miou"] for h in val], marker="o", ms=3, label="val mIoU")
        ax_val.plot(
            [h["epoch"] for h in val], [h["val_pixel_accuracy"] for h in val], marker="s", ms=3, label="val pixel acc"
        )
        ax_val.set_ylim(0, 1)
        ax_val.legend()
    ax_val.set_xlabel("epoch")
    ax_val.grid(alpha=0.3)
    for ax in (ax_loss, ax_val):  # whole epochs: one epoch's point once had ticks at 0.96 .. 1.04
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int | None) -> np.ndarray:
    """An RGB picture of a label map; ignored pixels are black."""
    lut = np.zeros((max(256, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    safe = np.where((labels >= 0) & (labels < len(lut)), labels, 0)
    rgb = lut[safe]
    if ignore_index is not None:
        rgb[labels == ignore_index] = 0
    return rgb


def overlay(image: np.ndarray, labels_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised label map over an RGB (or grey) image."""
    rgb = np.repeat(image, 3, axis=2) if image.ndim == 3 and image.shape[2] == 1 else image
    rgb = np.stack([rgb] * 3, axis=-1) if rgb.ndim == 2 else rgb
    return (rgb.astype(np.float32) * (1 - alpha) + labels_rgb.astype(np.float32) * alpha).astype(np.uint8)


LEGEND_COLUMNS = 6  # class colour entries per legend row
LEGEND_ROW_IN = 0.28


def plot_eval_report(
    path: Path,
    *,
    title: str,
    class_names: Sequence[str],
    iou: Sequence[float],
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: Sequence[Sequence[int]],
    ignore_index: int | None,
) -> Path:
    """Per-class IoU bars on top, the class colours, then one row per sample: image | ground truth | prediction.

    The bars and their labels are in percent, as the title's mIoU. The legend under the bars names
    every class in its palette colour: a class with IoU 0 has no visible bar, yet the ground truth
    overlays paint it.
    """
    colors = [tuple(np.asarray(c, dtype=float) / 255.0) for c in palette]
    handles = [Patch(facecolor=colour, edgecolor="black", label=name) for name, colour in zip(class_names, colors)]
    if ignore_index is not None:
        handles.append(Patch(facecolor="black", edgecolor="black", label="ignored (ground truth)"))
    legend_rows = max(1, math.ceil(len(handles) / LEGEND_COLUMNS))
    legend_in = 0.35 + LEGEND_ROW_IN * legend_rows  # the legend's title and rows
    heights = [3.2, legend_in] + [3.2] * len(samples)
    fig = plt.figure(figsize=(12, sum(heights)), layout="constrained")
    grid = fig.add_gridspec(len(heights), 3, height_ratios=heights)
    ax = fig.add_subplot(grid[0, :])
    values = [0.0 if math.isnan(v) else 100 * v for v in iou]
    bars = ax.bar(range(len(values)), values, color=colors[: len(values)], edgecolor="black")
    for bar, v in zip(bars, iou):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1,
                "n/a" if math.isnan(v) else f"{100 * v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(values)), list(class_names), rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    key.legend(handles=handles, loc="center", ncols=min(len(handles), LEGEND_COLUMNS), fontsize=9,
               title="class colours (bars, ground truth and prediction overlays)", title_fontsize=9, frameon=False)
    for r, (image, target, pred) in enumerate(samples, start=2):
        shown = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        cmap = "gray" if shown.ndim == 2 else None
        panels = [
            (shown, "image"),
            (overlay(image, colorize(target, palette, ignore_index)), "ground truth"),
            (overlay(image, colorize(pred, palette, None)), "prediction"),
        ]
        for c, (picture, name) in enumerate(panels):
            a = fig.add_subplot(grid[r, c])
            a.imshow(picture, cmap=cmap)
            a.set_title(name, fontsize=9)
            a.axis("off")
    return save_figure(fig, path, dpi=80)


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Render ``fig`` as PNG and put it at ``path`` in one rename; the figure is closed either way."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buffer.getvalue())
