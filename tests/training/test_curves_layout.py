"""The layout of ``segsvc curves``' picture with several datasets: one x label, legends that hide no data.

Each panel had its own x label "CPU-minutes (wall minutes × CPU threads)" and neighbouring ones ran into
each other; the legend sat inside the panel (lower right) and hid the points of early runs with a low mIoU
(camvid-unet at 1.189 CPU-min / 0.113, camvid-segnet at 1.461 / 0.036). The figure is taken from
``plot_curves`` itself, just before it is closed, and measured with matplotlib's renderer.
"""

from __future__ import annotations

from itertools import combinations

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from training import curves as curves_module  # noqa: E402
from training.curves import CurvePoint, RunCurve, plot_curves  # noqa: E402

X_LABEL = "CPU-minutes (wall minutes × CPU threads)"


def run(name: str, dataset: str, points: list[tuple[float, float]], threads: int = 2) -> RunCurve:
    return RunCurve(name, name.split("/")[0], [CurvePoint(i + 1, m / threads, threads, m, "recorded", v)
                                               for i, (m, v) in enumerate(points)], dataset)


SEVERAL_DATASETS = [
    run("camvid-unet/a", "camvid", [(0.6, 0.05), (1.189, 0.113)]),
    run("camvid-segnet/a", "camvid", [(0.7, 0.02), (1.461, 0.036)]),
    run("isbi-fpn/a", "isbi", [(0.5, 0.30), (1.0, 0.55)]),
    run("membrane-unet/old", "membrane", [(0.3, 0.40), (0.6, 0.62), (0.9, 0.70)]),
]
MANY_RUNS = [run(f"camvid-fpn/r{i:02d}", "camvid", [(1.0 + i, 0.02 * i)]) for i in range(22)] + [
    run("membrane-unet/m", "membrane", [(0.5, 0.05), (3.0, 0.8)])]


@pytest.fixture
def drawn(saved_figures, tmp_path):
    """The figure ``plot_curves`` saved, drawn (kept open: ``saved_figures``), and its renderer."""

    def draw(runs):
        plot_curves(runs, tmp_path / "curves.png")
        [fig] = saved_figures
        saved_figures.clear()
        fig.canvas.draw()
        return fig, fig.canvas.get_renderer()

    return draw


def visible_texts(fig, text: str) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text() == text]


@pytest.mark.parametrize("runs", [SEVERAL_DATASETS, MANY_RUNS], ids=["several-datasets", "22-runs"])
def test_the_panels_share_one_x_label(drawn, runs):
    fig, _ = drawn(runs)
    assert len(fig.axes) > 1
    assert len(visible_texts(fig, X_LABEL)) == 1
    assert [ax.get_xlabel() for ax in fig.axes] == [""] * len(fig.axes)


@pytest.mark.parametrize("runs", [SEVERAL_DATASETS, MANY_RUNS], ids=["several-datasets", "22-runs"])
def test_legends_stay_out_of_every_data_area_and_inside_the_picture(drawn, runs):
    fig, renderer = drawn(runs)
    picture = fig.bbox
    legends = [ax.get_legend() for ax in fig.axes]
    assert all(legend is not None for legend in legends)
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend.get_texts()[0].get_text(), ax.get_title())
        assert picture.x0 <= box.x0 and box.x1 <= picture.x1 and picture.y0 <= box.y0 and box.y1 <= picture.y1
    # so every point, the low ones of the first camvid runs included, is in its panel and under no legend
    for ax in fig.axes:
        for line in ax.get_lines():
            for x, y in ax.transData.transform(line.get_xydata()):
                assert ax.get_window_extent(renderer).contains(x, y)
                assert not any(legend.get_window_extent(renderer).contains(x, y) for legend in legends)


@pytest.mark.parametrize("runs", [SEVERAL_DATASETS, MANY_RUNS], ids=["several-datasets", "22-runs"])
def test_no_labels_titles_tick_labels_or_legends_overlap(drawn, runs):
    fig, renderer = drawn(runs)
    boxes = []  # (what, window extent)
    for i, ax in enumerate(fig.axes):
        low, high = ax.get_xlim()
        ticks = [t for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if t.get_text() and low <= x <= high]
        boxes += [(f"panel {i} x tick {t.get_text()}", t.get_window_extent(renderer)) for t in ticks]
        boxes += [(f"panel {i} legend", ax.get_legend().get_window_extent(renderer))]
        boxes += [(f"panel {i} {what}", t.get_window_extent(renderer))
                  for what, t in (("title", ax.title), ("x label", ax.xaxis.label), ("y label", ax.yaxis.label))
                  if t.get_visible() and t.get_text()]
    boxes += [(text, t.get_window_extent(renderer)) for text in (X_LABEL, "validation mIoU against compute")
              for t in visible_texts(fig, text) if t.figure is fig and t not in [a.xaxis.label for a in fig.axes]]
    clashes = [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]
    assert clashes == []


def test_the_base_picture_keeps_its_size(tmp_path):
    import matplotlib.image

    png = plot_curves(SEVERAL_DATASETS, tmp_path / "curves.png")
    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (curves_module.FIGSIZE_IN[0] * curves_module.DPI,
                               curves_module.FIGSIZE_IN[1] * curves_module.DPI)
