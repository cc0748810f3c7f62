"""Review 3: the run's learning-curve picture with a single epoch, or none validated.

With one epoch matplotlib spread the epoch axis over 0.96 .. 1.04: ticks at epochs that do not exist.
The epoch axes now tick whole epochs only; an empty history or one without validation still draws.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from training.report import plot_training_curve, training_curve_figure

ONE = [{"epoch": 1, "train_loss": 0.5, "val_miou": 0.3, "val_pixel_accuracy": 0.4}]


@pytest.mark.parametrize("history", [ONE, [*ONE, {"epoch": 2, "train_loss": 0.4}], [{"epoch": 1, "train_loss": 0.5}]])
def test_the_epoch_axes_tick_whole_epochs(history):
    fig = training_curve_figure(history, "t")
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


@pytest.mark.parametrize("history", [[], [{"epoch": 1, "train_loss": float("nan")}]])
def test_no_epoch_or_a_nan_loss_still_draws(history, tmp_path):
    path = plot_training_curve(history, tmp_path / "c.png", title="t")
    assert path.read_bytes().startswith(b"\x89PNG")
