"""The confusion matrix and every metric derived from it, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from training.metrics import BoundaryErrors, ConfusionMatrix, format_table, metrics_from_confusion

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


def test_num_classes_must_be_positive_and_void_defaults_to_255():
    with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
        ConfusionMatrix(0)
    one = ConfusionMatrix(1)
    assert one.ignore_index == 255 and one.mat.tolist() == [[0]]
    one.update(torch.tensor([0, 255, 0]), torch.tensor([0, 0, 0]))
    assert one.mat.tolist() == [[2]]


def test_an_ignore_index_inside_the_class_range_drops_that_class():
    cm = ConfusionMatrix(3, ignore_index=0)
    # class 0 is void here (e.g. "unlabelled"): its pixels count nowhere, whatever was predicted
    cm.update(torch.tensor([0, 1, 2, 1, 0]), torch.tensor([1, 1, 0, 2, 2]))
    assert cm.mat.tolist() == [[0, 0, 0], [0, 1, 1], [1, 0, 0]]
    m = cm.compute()
    assert m.pixels == 3
    assert math.isnan(m.class_accuracy[0]) and m.iou[0] == 0.0  # predicted, never a target


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_targets_outside_the_class_range_are_not_counted(ignore_index):
    cm = ConfusionMatrix(3, ignore_index=ignore_index)
    # -1 and 3 (== num_classes) and 7 are not classes: their pixels, and whatever was
    # predicted there (even out-of-range values), are left out
    cm.update(torch.tensor([-1, 3, 0, 2, 7, 3]), torch.tensor([0, 1, 0, 2, 99, -5]))
    assert cm.mat.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert cm.compute().pixels == 2


def test_uint8_label_maps_are_counted_without_overflow():
    # label PNGs decode to uint8; n * target + pred must not be computed in uint8 (20 * 19 + 18 > 255)
    cm = ConfusionMatrix(20, ignore_index=255)
    cm.update(torch.tensor([19, 0, 255, 19], dtype=torch.uint8), torch.tensor([18, 1, 3, 19], dtype=torch.uint8))
    assert int(cm.mat.sum()) == 3
    assert (int(cm.mat[19, 18]), int(cm.mat[0, 1]), int(cm.mat[19, 19])) == (1, 1, 1)


def test_negative_predictions_are_errors():
    cm = ConfusionMatrix(3, ignore_index=None)
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\)"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\), got values up to 5"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([5, 0, 0]))
    assert int(cm.mat.sum()) == 0  # a refused batch counts nothing


def test_metrics_are_computed_in_float64():
    m = small_matrix().compute()
    # exact: float32 would give 0.6666666865348816 and 0.7142857313156128
    assert m.iou[1] == 2 / 3 and m.dice[1] == 4 / 5 and m.class_accuracy[0] == 2 / 3
    assert m.pixel_accuracy == 5 / 7


def test_a_class_only_predicted_once_has_dice_zero_not_nan():
    m = metrics_from_confusion(torch.tensor([[1, 1], [0, 0]]))  # class 1: no target pixel, one predicted
    assert m.dice == [2 / 3, 0.0] and m.iou == [0.5, 0.0]
    assert m.class_accuracy[0] == 0.5 and math.isnan(m.class_accuracy[1])


def test_one_pixel_classes_score_exactly():
    m = metrics_from_confusion(torch.tensor([[1]]))
    assert (m.pixel_accuracy, m.miou, m.mean_dice, m.mean_class_accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert m.iou == [1.0] and m.class_accuracy == [1.0] and m.dice == [1.0] and m.pixels == 1
    # one pixel of class 0 predicted as 1, one pixel of class 1 predicted as 0
    m = metrics_from_confusion(torch.tensor([[0, 1], [1, 0]]))
    assert m.iou == [0.0, 0.0] and m.class_accuracy == [0.0, 0.0] and m.dice == [0.0, 0.0]
    assert m.pixel_accuracy == 0.0 and m.pixels == 2


def test_to_dict_rounds_to_six_places_names_classes_and_writes_none_for_nan():
    cm = ConfusionMatrix(4, ignore_index=255)  # class 3 appears nowhere
    cm.update(TARGET, PRED)
    m = cm.compute()
    assert m.to_dict(["sky", "road", "car", "bicycle"]) == {
        "pixel_accuracy": 0.714286,
        "mean_class_accuracy": 0.722222,
        "miou": 0.555556,
        "mean_dice": 0.711111,
        "per_class_iou": {"sky": 0.5, "road": 0.666667, "car": 0.5, "bicycle": None},
        "per_class_accuracy": {"sky": 0.666667, "road": 1.0, "car": 0.5, "bicycle": None},
        "per_class_dice": {"sky": 0.666667, "road": 0.8, "car": 0.666667, "bicycle": None},
        "pixels": 7,
    }
    unnamed = m.to_dict()
    assert list(unnamed["per_class_iou"]) == ["0", "1", "2", "3"]
    assert unnamed["per_class_dice"]["1"] == 0.8 and unnamed["per_class_accuracy"]["3"] is None
    empty = metrics_from_confusion(torch.zeros(2, 2, dtype=torch.int64)).to_dict()
    assert empty["pixel_accuracy"] is None and empty["miou"] is None and empty["pixels"] == 0


def test_table_text_is_exact():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(TARGET, PRED)
    assert format_table(cm.compute(), ["sky", "road", "car", "bicycle"]).split("\n") == [
        "class      IoU    Acc   Dice",
        "sky      50.00  66.67  66.67",
        "road     66.67 100.00  80.00",
        "car      50.00  50.00  66.67",
        "bicycle    -      -      -  ",
        "----------------------------",
        "global pixel accuracy         71.43",
        "mean class accuracy           72.22",
        "mIoU                          55.56",
        "mean Dice                     71.11",
        "pixels counted               7",
    ]


def test_all_reduce_is_a_no_op_without_a_process_group():
    cm = small_matrix()
    cm.all_reduce()
    assert cm.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_all_reduce_over_a_one_process_gloo_group_keeps_the_counts(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        cm = small_matrix()
        cm.all_reduce()
    finally:
        dist.destroy_process_group()
    assert cm.mat.device.type == "cpu" and cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_boundary_errors_split_wrong_pixels_by_the_band_around_label_edges():
    # A 6 x 6 map: class 1 fills the right half. Edge pixels are columns 2 and 3; the 1 px band is columns 1-4.
    target = torch.zeros(6, 6, dtype=torch.int64)
    target[:, 3:] = 1
    target[5, 5] = 255  # void: never counted, but the edge of the labelled region around it is a boundary
    pred = target.clone()
    pred[0, 2] = 1  # boundary placement: in the band
    pred[5, 0] = 1  # invented structure: off the band
    pred[1, 5] = 0  # missed structure: off the band
    be = BoundaryErrors(num_classes=2, ignore_index=255)
    be.update(target, pred)
    # counted: 35 pixels. Band: columns 1-4 (24 pixels), plus (3, 5) and (4, 5) next to the void pixel.
    assert (be.pixels, be.band, be.wrong, be.wrong_in_band) == (35, 26, 3, 1)
    assert be.to_dict() == {"band_px": 1, "band_pixels": round(26 / 35, 6), "errors_in_band": round(1 / 3, 6),
                            "pixel_error_off_band": round(2 / 9, 6)}


def test_boundary_errors_with_a_wider_band_and_without_errors():
    target = torch.zeros(1, 9, dtype=torch.int64)
    target[0, 4:] = 1
    be = BoundaryErrors(num_classes=2, ignore_index=None, band_px=2)
    be.update(target, target)
    assert (be.band, be.wrong) == (6, 0)  # columns 1-6
    assert be.to_dict()["errors_in_band"] is None and be.to_dict()["pixel_error_off_band"] == 0.0
    with pytest.raises(ValueError, match="two H x W maps"):
        be.update(target[None], target[None])
    with pytest.raises(ValueError, match="band_px"):
        BoundaryErrors(2, band_px=-1)
