"""An exponential moving average (EMA) of a model's weights, the recipe lever ``train.ema_decay``.

After every optimiser step the averaged copy moves towards the trained
weights: ``avg = d * avg + (1 - d) * w``. Its floating-point buffers (batch-norm
running statistics) are averaged the same way and integer buffers are copied,
as torchvision's reference scripts do with ``AveragedModel(use_buffers=True)``.
The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` (t: updates so
far), so a short run's average is not dominated by its random initial weights.
Validation, the best checkpoint and the published artifact use the average.

Example:
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> _ = model.weight.data.fill_(0.0)
    >>> ema = WeightAverage(model, decay=0.5)
    >>> ema.update(model)   # the first update copies the weights
    >>> _ = model.weight.data.fill_(1.0)
    >>> ema.update(model)   # then d = min(0.5, (1 + 1) / (10 + 1))
    >>> round(ema.module.weight.item(), 4)
    0.8182
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The EMA of ``model``'s parameters and buffers (``model`` unwrapped from DDP)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self._averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=True)
        self._averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model, an independent copy of the trained one."""
        return self._averaged.module

    @torch.no_grad()
    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        d = warmed_decay(self.decay, self.updates - 1)  # AveragedModel's first call only copies
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (num_batches_tracked): a count, not a quantity to average
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimiser step)."""
        self.updates += 1
        self._averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self._averaged.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])
