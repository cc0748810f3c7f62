"""Optimisers and learning-rate schedules: AdamW or SGD; linear warm-up, then poly, cosine or constant.

The schedule runs per optimiser step over a ``Horizon`` of steps: ``train.epochs``
worth, or with ``schedule.horizon: time`` the epochs that fit the run's time
budget, re-estimated before every epoch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from training.config import OptimConfig, ScheduleConfig, TrainConfig
from training.distributed import DistEnv, broadcast_from_main


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, total: int, warmup: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base LR at optimiser step ``step``: linear warm-up, then poly/cosine/constant."""
    if step < warmup:
        alpha = step / warmup
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.name == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    if cfg.name == "poly":
        decay = (1 - progress) ** cfg.power
    else:
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


class Horizon:
    """The number of optimiser steps the LR decays over; the time horizon moves it between epochs."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def set(self, total_steps: int, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Change the horizon and recompute the current LR with it."""
        if total_steps == self.total_steps:
            return
        self.total_steps = total_steps
        step = scheduler.last_epoch
        for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * fn(step)


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, horizon: Horizon
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, horizon.total_steps, min(warmup, horizon.total_steps), cfg)
    )


def planned_epochs(cfg: TrainConfig, history: list[dict[str, Any]], elapsed_s: float, env: DistEnv) -> int:
    """``train.epochs``, or with ``schedule.horizon: time`` the epochs that fit the time budget.

    The epochs so far plus the budget left over the mean time of an epoch (validation and
    bookkeeping included, the one-off setup not: ``mean_epoch_s``); before the first epoch it
    is ``train.epochs``. Rank 0 decides for all ranks.
    """
    loop = cfg.train
    if cfg.schedule.horizon != "time" or loop.max_time_min is None or not history:
        return loop.epochs
    left_s = 60 * loop.max_time_min - elapsed_s
    planned = min(loop.epochs, max(len(history), len(history) + int(left_s / mean_epoch_s(history, elapsed_s))))
    return broadcast_from_main(env, planned)


def mean_epoch_s(history: list[dict[str, Any]], elapsed_s: float) -> float:
    """The mean time of the epochs in ``history`` (``elapsed_s`` in all), less the set-up time the rows record
    (``setup_s``: once per start, in the first row after it). Set-up is paid once, not every epoch: dividing it
    among the first epochs made a run with a slow start plan a fraction of the epochs its budget fits."""
    setup_s = sum(float(row.get("setup_s", 0.0)) for row in history)
    return max(elapsed_s - setup_s, 1e-6) / len(history)

