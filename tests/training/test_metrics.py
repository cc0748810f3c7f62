"""The confusion matrix and every metric derived from it, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from training.metrics import ConfusionMatrix, format_table, metrics_from_confusion

# 8 pixels, 3 classes; the 6th pixel is void (255) and must not count.
TARGET = torch.tensor([[0, 0, 1, 1], [2, 255, 2, 0]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])


def small_matrix() -> ConfusionMatrix:
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(TARGET, PRED)
    return cm


def test_confusion_matrix_counts_by_hand_and_skips_void():
    # rows = target, columns = prediction
    assert small_matrix().mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_metrics_equal_hand_computed_values():
    m = small_matrix().compute()
    assert m.pixels == 7
    assert m.pixel_accuracy == pytest.approx(5 / 7)
    assert m.class_accuracy == pytest.approx([2 / 3, 1.0, 1 / 2])
    assert m.mean_class_accuracy == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    # IoU = tp / (target + pred - tp): 2/(3+3-2), 2/(2+3-2), 1/(2+1-1)
    assert m.iou == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert m.miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    # Dice = 2 tp / (target + pred)
    assert m.dice == pytest.approx([4 / 6, 4 / 5, 2 / 3])
    assert m.mean_dice == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)


def test_void_pixels_do_not_change_any_metric():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(TARGET, PRED)
    before = cm.mat.clone()
    # a batch that is entirely void, with predictions of every class
    cm.update(torch.full((4, 4), 255), torch.randint(0, 3, (4, 4)))
    assert torch.equal(cm.mat, before)


def test_absent_class_is_nan_and_left_out_of_the_means():
    cm = ConfusionMatrix(4, ignore_index=255)  # class 3 appears nowhere
    cm.update(TARGET, PRED)
    m = cm.compute()
    assert math.isnan(m.iou[3]) and math.isnan(m.class_accuracy[3]) and math.isnan(m.dice[3])
    assert m.miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m.mean_class_accuracy == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert m.to_dict(["a", "b", "c", "d"])["per_class_iou"]["d"] is None


def test_class_predicted_but_absent_from_targets_scores_zero_iou():
    cm = ConfusionMatrix(3, ignore_index=None)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]))
    m = cm.compute()
    assert m.iou[2] == 0.0  # a false positive class is a real mistake
    assert math.isnan(m.class_accuracy[2])  # but its recall is undefined
    assert m.miou == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_update_accumulates_and_reset_clears():
    cm = small_matrix()
    cm.update(TARGET, PRED)
    assert int(cm.mat.sum()) == 14
    cm.reset()
    assert int(cm.mat.sum()) == 0


def test_shape_mismatch_and_out_of_range_predictions_are_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="predictions"):
        cm.update(torch.zeros(3), torch.tensor([0, 1, 3]))


def test_empty_matrix_gives_nan_not_an_exception():
    m = metrics_from_confusion(torch.zeros(2, 2, dtype=torch.int64))
    assert math.isnan(m.pixel_accuracy) and math.isnan(m.miou)


def test_table_lists_every_class_and_the_summary():
    text = format_table(small_matrix().compute(), ["sky", "road", "car"])
    for word in ("sky", "road", "car", "mIoU", "global pixel accuracy", "mean class accuracy", "mean Dice"):
        assert word in text
    assert "55.56" in text  # mIoU in percent
