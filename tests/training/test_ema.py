"""The weight average of ``train.ema_decay``: the decay's warm-up, parameters and buffers, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.ema import WeightAverage, warmed_decay


def test_the_decay_warms_up_then_stays_at_its_ceiling():
    assert warmed_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_decay(0.999, 8) == pytest.approx(0.5)
    assert warmed_decay(0.9, 1000) == 0.9
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(nn.Linear(1, 1), 1.0)


def test_the_average_follows_the_formula_and_leaves_the_model_alone():
    model = nn.Linear(2, 1, bias=False)
    values = [0.0, 1.0, 3.0, -2.0]
    model.weight.data.fill_(values[0])
    ema = WeightAverage(model, decay=0.6)
    expected = None
    for t, v in enumerate(values):
        model.weight.data.fill_(v)
        ema.update(model)
        d = warmed_decay(0.6, t)  # t updates before this one
        expected = v if expected is None else d * expected + (1 - d) * v
        assert ema.module.weight.data.flatten().tolist() == pytest.approx([expected, expected])
    assert model.weight.data.tolist() == [[-2.0, -2.0]]
    assert ema.module is not model


def test_batch_norm_statistics_are_averaged_and_the_batch_count_copied():
    model = nn.BatchNorm2d(1)
    ema = WeightAverage(model, decay=0.5)
    ema.update(model)  # copies: mean 0
    model.train()
    model(torch.full((4, 1, 2, 2), 10.0))  # running mean 0 -> 1 (momentum 0.1), one batch tracked
    ema.update(model)
    d = warmed_decay(0.5, 1)
    assert ema.module.running_mean.item() == pytest.approx(d * 0.0 + (1 - d) * 1.0)
    assert ema.module.num_batches_tracked.item() == 1


def test_state_dict_round_trip_continues_the_same_average():
    model = nn.Linear(3, 2)
    a = WeightAverage(model, 0.8)
    for _ in range(3):
        model.weight.data.add_(1.0)
        a.update(model)
    b = WeightAverage(nn.Linear(3, 2), 0.8)
    b.load_state_dict(a.state_dict())
    model.weight.data.add_(1.0)
    a.update(model)
    b.update(model)
    assert b.updates == a.updates == 4
    assert torch.equal(a.module.weight, b.module.weight)
