"""``segsvc eval``'s report.png: a legend of the class colours, and the IoU bars in percent.

A class with IoU 0 (CamVid's Pole, Fence, Pedestrian, Bicyclist after a short run) has no visible bar, so
its palette colour appeared nowhere but in the ground-truth overlays, where nothing named it. The bar axis
read 0-1 while the bar labels and the title's mIoU are percentages. The figure is taken from
``plot_eval_report`` itself, just before it is closed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from training.report import plot_eval_report  # noqa: E402

NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
         "Bicyclist"]
PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [0, 0, 192], [128, 128, 0],
           [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
IOU = [0.62, 0.45, 0.0, 0.71, 0.33, 0.41, 0.05, 0.0, 0.12, 0.0, float("nan")]


def sample(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, len(NAMES), (24, 32))
    target[:2] = 255
    return rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), target, rng.integers(0, len(NAMES), (24, 32))


@pytest.fixture
def report(saved_figures, tmp_path):
    """Draws a report with ``samples`` sample rows; returns the figure it saved (kept open: ``saved_figures``)."""

    def draw(samples):
        path = plot_eval_report(tmp_path / "report.png", title="camvid-unet v1 on camvid/val: mIoU 24.56",
                                class_names=NAMES, iou=IOU, samples=samples, palette=PALETTE, ignore_index=255)
        assert path.read_bytes().startswith(b"\x89PNG")
        [fig] = saved_figures
        saved_figures.clear()
        fig.canvas.draw()
        return fig

    return draw


def legend_colours(fig) -> dict[str, tuple[float, float, float]]:
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None] + list(fig.legends)
    return {text.get_text(): to_rgb(handle.get_facecolor())
            for legend in legends for text, handle in zip(legend.get_texts(), legend.legend_handles)}


@pytest.mark.parametrize("samples", [2, 0])
def test_a_legend_names_every_class_in_its_palette_colour(report, samples):
    fig = report([sample(i) for i in range(samples)])
    colours = legend_colours(fig)
    for name, rgb in zip(NAMES, PALETTE):  # the classes without a visible bar too
        assert name in colours, f"{name} is not in the legend {sorted(colours)}"
        assert colours[name] == pytest.approx(tuple(c / 255 for c in rgb), abs=1e-6), name


def test_the_iou_axis_is_in_percent_like_the_bar_labels_and_the_title(report):
    fig = report([sample(0)])
    bars_ax = next(a for a in fig.axes if a.patches and a.get_ylabel())
    assert "%" in bars_ax.get_ylabel()
    assert bars_ax.get_ylim()[1] >= 100
    bars = [p for p in bars_ax.patches if p.get_width() < 1][: len(NAMES)]
    heights = [b.get_height() for b in bars]
    assert heights == pytest.approx([0.0 if v != v else 100 * v for v in IOU])
    labels = [t.get_text() for t in bars_ax.texts]
    assert labels == ["n/a" if v != v else f"{100 * v:.1f}" for v in IOU]
    for bar, label in zip(bars, labels):  # each label is the height of its bar on the axis
        if label != "n/a":
            assert float(label) == pytest.approx(bar.get_height(), abs=0.05)
